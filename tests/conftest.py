"""Shared fixtures: tiny random Hugging Face models and calibration batches, all seeded and fast."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from helpers.models import make_batches, tiny_gpt2, tiny_llama
from helpers.processes import free_port


@pytest.fixture(autouse=True)
def _fresh_master_port(monkeypatch):
    """Every test gets its own free ``MASTER_PORT``: Lightning keeps the port it picked in ``os.environ``, and a later
    ``ddp_spawn`` test on the same port fails to listen while anything still holds it (EADDRINUSE)."""
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
    return tiny_gpt2()


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


@pytest.fixture
def calibration_batches():
    """Two mapping batches of 4 sequences x 16 tokens, no padding."""
    return make_batches()
