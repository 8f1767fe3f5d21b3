"""Shared fixtures: tiny random Hugging Face models and calibration batches, all seeded and fast."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 128
SEQ_LEN = 16


def tiny_llama(**config_overrides):
    """A tiny random Llama (2 decoder layers, 64 hidden, GQA 4/2 heads), seeded, in eval mode."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = transformers.LlamaConfig(**{**settings, **config_overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(autouse=True)
def _fresh_master_port(monkeypatch):
    """Every test gets its own free ``MASTER_PORT``: Lightning keeps the port it picked in ``os.environ``, and a later
    ``ddp_spawn`` test on the same port fails to listen while anything still holds it (EADDRINUSE)."""
    from wanda_lightning.distributed.testing import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))


@pytest.fixture
def single_thread():
    """Runs a test on one intra-op thread: the models are tiny, and on a busy 2-core machine thread hand-offs cost
    far more than they save (results do not depend on it: library and references run under the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _llama_base():
    return tiny_llama()


@pytest.fixture(scope="session")
def _gpt2_base():
    return _tiny_gpt2()


@pytest.fixture
def llama(_llama_base):
    """A fresh copy of a tiny random Llama (2 decoder layers, 64 hidden, GQA 4/2 heads), in eval mode."""
    return copy.deepcopy(_llama_base)


@pytest.fixture
def gpt2(_gpt2_base):
    """A fresh copy of a tiny random GPT-2 (2 blocks, Conv1D layers, lm_head tied to wte), in eval mode."""
    return copy.deepcopy(_gpt2_base)


@pytest.fixture
def tiny_model(request, _llama_base, _gpt2_base):
    """Parametrise indirectly with "llama" or "gpt2"."""
    return copy.deepcopy({"llama": _llama_base, "gpt2": _gpt2_base}[request.param])


def make_batches(num_batches: int = 2, batch: int = 4, seq_len: int = SEQ_LEN, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (batch, seq_len), generator=generator),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        }
        for _ in range(num_batches)
    ]


@pytest.fixture
def calibration_batches():
    """Two mapping batches of 4 sequences x 16 tokens, no padding."""
    return make_batches()
