"""Writing a shrunk transformers model as a plain folder that stock ``from_pretrained`` loads."""

from __future__ import annotations

import copy
import os
from typing import Any, cast

from torch import nn

__all__ = ["plain_copy", "save_plain_pretrained"]


def plain_copy(model: nn.Module) -> nn.Module:
    """``model`` itself, or, for a model loaded from a GGUF file (whose ``save_pretrained`` transformers refuses), the
    same weights in a model built from its config without the GGUF quantization entry."""
    config = getattr(model, "config", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return model
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    if "gguf" not in str(method).lower():
        raise ValueError(f"the model is quantized with {method!s}; only full-precision models can be saved plainly")
    plain_config = copy.deepcopy(config)
    delattr(plain_config, "quantization_config")
    from transformers.initialization import no_init_weights

    dtype = next(model.parameters()).dtype
    with no_init_weights():
        rebuilt: Any = type(model)(plain_config).to(dtype)
    rebuilt.tie_weights()  # as from_pretrained does; the state dict then fills the tied tensor once
    rebuilt.load_state_dict(model.state_dict())
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        rebuilt.generation_config = copy.deepcopy(generation)
    return cast(nn.Module, rebuilt.eval())


def save_plain_pretrained(model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any = None) -> None:
    """``model.save_pretrained(directory)`` (and the tokenizer's), also for GGUF-loaded models.

    Example::

        shrink(model, batches, mlp=0.5)
        save_plain_pretrained(model, "small/", tokenizer)  # AutoModelForCausalLM.from_pretrained("small/")
    """
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise TypeError(f"{type(model).__name__} has no save_pretrained(): it is not a transformers model")
    cast(Any, plain_copy(model)).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
