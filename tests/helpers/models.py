"""Tiny random Hugging Face models and calibration batches, all seeded and fast."""

from __future__ import annotations

import types

import torch
import transformers

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


def tiny_gpt2():
    """A tiny random GPT-2 (2 blocks, Conv1D layers, lm_head tied to wte), seeded, in eval mode."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def make_batches(num_batches: int = 2, batch: int = 4, seq_len: int = SEQ_LEN, seed: int = 1) -> list[dict]:
    """``num_batches`` mapping batches of ``batch`` random sequences of ``seq_len`` tokens, no padding."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB, (batch, seq_len), generator=generator),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
        }
        for _ in range(num_batches)
    ]


class _ByteTokenizer:
    """Bytes as tokens: what the snippets need of a tokenizer (``tokenizer(text, return_tensors="pt").input_ids``)."""

    def __call__(self, text: str, return_tensors: str | None = None) -> types.SimpleNamespace:
        return types.SimpleNamespace(input_ids=torch.tensor([list(text.encode())], dtype=torch.long))


def tiny_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, _ByteTokenizer]:
    """``load_smollm2()``'s stand-in: a tiny random Llama with SmolLM2's layout (5 blocks, GQA, tied embeddings) and a
    byte tokenizer, for the README snippets (``test_docs.py``) and the training examples (``test_examples.py``)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), _ByteTokenizer()
