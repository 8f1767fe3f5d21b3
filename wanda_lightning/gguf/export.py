""":class:`GGUFExport`: the GGUF export a callback (or any caller) repeats, as one YAML-friendly value."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from .quantization import GGUFType, check_gguf_type
from .writer import GGUFSummary, save_gguf

__all__ = ["GGUFExport"]


@dataclass(frozen=True)
class GGUFExport:
    """Where and how to write a model as GGUF, checked when made; :meth:`save` writes it (replacing the file).

    The pruning and shrinking callbacks take one (``gguf=GGUFExport("small.gguf")``) and write the file on rank zero
    each time they act and again at the end of fit.

    Args:
        path: The ``.gguf`` file to write.
        dtype: Type of the 2-D weights: ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"`` or ``"q4_0"``.
        tokenizer: Path of a GGUF file or tokenizer folder to take the vocabulary from, or ``"placeholder"``
            (timing-only dummy tokens); ``None`` takes the tokenizer given to :meth:`save`.

    Raises:
        ValueError: If ``path`` does not end in ``.gguf`` or ``dtype`` is not one of the types above.
        TypeError: If ``path`` or ``tokenizer`` is not a path.

    Example::

        >>> GGUFExport("small.gguf", dtype="q4_0")
        GGUFExport(path='small.gguf', dtype='q4_0', tokenizer=None)
        >>> GGUFExport("small.bin")
        Traceback (most recent call last):
        ...
        ValueError: `path` must end in .gguf, got 'small.bin'
    """

    path: str
    dtype: GGUFType = "q8_0"
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise TypeError(f"`path` must be a file path ending in .gguf, got {self.path!r}")
        path = os.fspath(self.path)
        if not path.lower().endswith(".gguf"):
            raise ValueError(f"`path` must end in .gguf, got {path!r}")
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "dtype", check_gguf_type(self.dtype))
        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, (str, os.PathLike)) or not str(self.tokenizer):
                raise TypeError(
                    f"`tokenizer` must be the path of a GGUF file or tokenizer folder, 'placeholder' or None, "
                    f"got {self.tokenizer!r}"
                )
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))

    def save(self, model: nn.Module, tokenizer: Any = None) -> GGUFSummary:
        """Writes ``model`` to :attr:`path`, replacing the file and its ``Modelfile``.

        Args:
            model: A transformers causal LM or a module holding one.
            tokenizer: Used when :attr:`tokenizer` is ``None``: a transformers tokenizer or a path (see
                :func:`~wanda_lightning.gguf.save_gguf`).

        Returns:
            The :class:`~wanda_lightning.gguf.GGUFSummary`.

        Example::

            export = GGUFExport("small.gguf", tokenizer="SmolLM2-135M-Instruct.Q4_1.gguf")
            export.save(model)
        """
        chosen = self.tokenizer if self.tokenizer is not None else tokenizer
        return save_gguf(model, self.path, dtype=self.dtype, tokenizer=chosen, overwrite=True)
