"""Which architecture writes a model: the families :func:`~wanda_lightning.gguf.save_gguf` supports, by
``config.model_type``."""

from __future__ import annotations

from typing import Any

from .architecture import DecoderShape, GGUFArchitecture
from .gemma3 import Gemma3Architecture
from .llama import LlamaArchitecture
from .qwen2 import Qwen2Architecture

__all__ = ["FAMILIES", "architecture_for", "supported_model_types"]

#: The supported families, one architecture class each.
FAMILIES: tuple[type[GGUFArchitecture], ...] = (LlamaArchitecture, Qwen2Architecture, Gemma3Architecture)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values :func:`architecture_for` accepts.

    Example::

        >>> supported_model_types()
        ['llama', 'mistral', 'qwen2', 'gemma3_text']
    """
    return [model_type for family in FAMILIES for model_type in family.model_types]


def architecture_for(model: Any) -> GGUFArchitecture:
    """The checked architecture writer for the transformers causal LM ``model``.

    Raises:
        ValueError: If its family is not supported, or llama.cpp's architecture cannot run it exactly (the message
            says why).

    Example::

        architecture_for(smollm2).name  # 'llama'
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    if family is None or not type(model).__name__.endswith("ForCausalLM"):
        raise ValueError(
            f"save_gguf writes Llama-family (LlamaForCausalLM, MistralForCausalLM), Qwen2ForCausalLM and "
            f"Gemma3ForCausalLM models (model_type {supported_model_types()}); {type(model).__name__} with model_type "
            f"{model_type!r} is not one of them. Nothing was written"
        )
    shape = DecoderShape.of(model)
    architecture = family.choose(shape)(model, shape)
    architecture.check()
    return architecture
