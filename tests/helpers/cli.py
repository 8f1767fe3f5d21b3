"""Helpers the command-line tests in several folders share: fast calibration flags, a character-level tokenizer, a
tiny Llama config and a way to run ``wanda-lightning`` in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from wanda_lightning.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

PRUNE_FAST = ["--samples", "4", "--seqlen", "32", "--batch-size", "4"]


def char_tokenizer():
    """A character-level tokenizer with 98 ids, so that a model with vocab 128 can read any ASCII text."""
    vocab = {"[UNK]": 0}
    for char in [chr(i) for i in range(32, 127)] + ["\n", "\t"]:
        vocab[char] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def run_cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
