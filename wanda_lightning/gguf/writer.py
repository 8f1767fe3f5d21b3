""":func:`save_gguf`: a transformers causal LM (dense, masked or shrunk) as a GGUF file llama.cpp and Ollama load, and
its :class:`GGUFSummary`."""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..core.layers import find_pretrained
from ..core.validation import check_bool
from .architecture import GGUFArchitecture, PlannedTensor
from .families import architecture_for
from .modelfile import MODELFILE, modelfile_text
from .quantization import (
    GGUFType,
    block_size,
    check_gguf_type,
    encode,
    encoded_nbytes,
    file_type,
    ggml_type,
    keeps_float32,
    require_gguf,
)
from .vocab import Vocabulary, resolve_vocabulary

__all__ = ["GGUFSummary", "check_destination", "save_gguf"]


@dataclass
class GGUFSummary:
    """What :func:`save_gguf` wrote.

    Attributes:
        path: The GGUF file (absolute).
        architecture: llama.cpp's architecture name written (``"llama"``, ``"qwen2"``, ``"gemma3"``).
        dtype: The type of its 2-D weights (norms, biases and other 1-D tensors are float32).
        file_bytes: Its size in bytes.
        tensor_count: Tensors in it.
        parameters: Model parameters in it (tied weights counted once).
        modelfile: The Ollama ``Modelfile`` written beside it, or ``None``.
        tokenizer: Where its tokenizer came from.
    """

    path: str
    architecture: str
    dtype: GGUFType
    file_bytes: int
    tensor_count: int
    parameters: int
    modelfile: str | None
    tokenizer: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the fields.

        Example::

            >>> GGUFSummary("m.gguf", "llama", "q8_0", 10, 2, 5, None).to_dict()["architecture"]
            'llama'
        """
        return asdict(self)

    def __str__(self) -> str:
        text = (
            f"wrote {self.path}: llama.cpp `{self.architecture}`, {self.dtype}, {self.file_bytes / 2**20:.1f} MiB, "
            f"{self.tensor_count} tensors, {self.parameters / 1e6:.1f}M parameters; tokenizer {self.tokenizer}"
        )
        if self.modelfile:
            text += f"\nwrote {self.modelfile} (ollama create NAME -f {self.modelfile})"
        return text


def _tensor_types(planned: list[PlannedTensor], dtype: GGUFType) -> list[Any]:
    """The ggml type of each tensor, refusing a row length the type cannot hold."""
    chosen = ggml_type(dtype)
    block = block_size(chosen)
    types = []
    for tensor in planned:
        if keeps_float32(tensor.name, len(tensor.shape)):
            types.append(ggml_type("f32"))
            continue
        if tensor.shape[-1] % block:
            layer = tensor.source.removesuffix(".weight")
            raise ValueError(
                f"layer {layer!r} has rows of {tensor.shape[-1]} values, and `dtype`={dtype!r} packs rows in blocks of "
                f"{block}: its width must be a multiple of {block} (shrink with multiple_of={block}, or use "
                "dtype='f16'). Nothing was written"
            )
        types.append(chosen)
    return types


def check_destination(path: Any, overwrite: bool, modelfile: bool = True) -> tuple[Path, Path | None]:
    """The absolute GGUF path and its ``Modelfile`` (``None`` without ``modelfile``), checked before any work.

    Raises:
        TypeError: If ``path`` is not a path.
        ValueError: If it does not end in ``.gguf``, is a directory, cannot be created, or it (or the Modelfile)
            exists and ``overwrite`` is false.

    Example::

        >>> check_destination("out/small.gguf", overwrite=False)[0].name
        'small.gguf'
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"`path` must be a file path ending in .gguf, got {path!r}")
    target = Path(path).expanduser().absolute()
    if target.suffix.lower() != ".gguf":
        raise ValueError(f"`path` must end in .gguf, got {str(path)!r}")
    if target.is_dir():
        raise ValueError(f"`path` {str(target)!r} is a directory; give the .gguf file to write")
    if target.exists() and not overwrite:
        raise ValueError(f"`path` {str(target)!r} exists; pass overwrite=True (--overwrite) to replace it")
    beside = target.parent / MODELFILE if modelfile else None
    if beside is not None and beside.exists() and not overwrite:
        raise ValueError(
            f"{str(beside)!r} exists; pass overwrite=True (--overwrite) to replace it, or modelfile=False "
            "(--no-modelfile) to write no Modelfile"
        )
    for ancestor in [target.parent, *target.parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(
                    f"`path` {str(target)!r} cannot be created: {str(ancestor)!r} is not a writable folder"
                )
            break
    return target, beside


def _write(
    target: Path, architecture: GGUFArchitecture, dtype: GGUFType, vocabulary: Vocabulary, planned: list[PlannedTensor]
) -> None:
    """Writes the file next to ``target`` under a temporary name, then renames it into place."""
    gguf = require_gguf()
    types = _tensor_types(planned, dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_name(target)
    writer = gguf.GGUFWriter(temporary, architecture.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(architecture.model_name())
        architecture.write_metadata(writer)
        writer.add_file_type(int(file_type(dtype)))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocabulary.write(writer)
        for tensor, qtype in zip(planned, types, strict=True):
            nbytes = encoded_nbytes(tensor.shape, qtype)
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, qtype in zip(planned, types, strict=True):
            writer.write_tensor_data(encode(tensor.load(), qtype))
        writer.close()
        os.replace(temporary, target)
    except BaseException:
        writer.close()
        temporary.unlink(missing_ok=True)
        raise


def _temporary_name(target: Path) -> Path:
    """A new hidden name beside ``target`` (created by the writer, so with the user's usual permissions)."""
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.partial"


def _write_text(target: Path, text: str) -> None:
    temporary = _temporary_name(target)
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    dtype: GGUFType = "q8_0",
    tokenizer: Any = None,
    overwrite: bool = False,
    modelfile: bool = True,
) -> GGUFSummary:
    """Writes ``model`` as a GGUF file that stock llama.cpp (and Ollama, LM Studio, llama-server) loads as its own
    architecture, and a ``Modelfile`` beside it for ``ollama create``.

    Supported: Llama-family models (``llama``: Llama, Mistral, SmolLM2), Qwen2 (``qwen2``, or ``llama`` when heads
    were removed, which ``qwen2`` cannot hold) and Gemma 3 text models (``gemma3``); dense, masked (zeros stay exactly
    zero in every type) and every shape ``shrink()`` makes (narrower MLPs, fewer heads, removed blocks, FLAP's bias
    compensation on Llama). The model is not changed. Everything is checked before anything is written, and the file
    is written under a temporary name and renamed into place.

    Args:
        model: A transformers causal LM, or a module holding exactly one (a LightningModule).
        path: The ``.gguf`` file to write; missing folders are created.
        dtype: Type of the 2-D weights: ``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"`` or ``"q4_0"`` (norms, biases and
            other 1-D tensors stay float32, as in llama.cpp). q8_0 and q4_0 need rows of a multiple of 32 values.
        tokenizer: Where the vocabulary comes from: the path of a GGUF file (its ``tokenizer.*`` keys are copied:
            pre-tokenizer name and chat template included), a tokenizer folder or a transformers tokenizer (byte-level
            BPE as llama.cpp's ``gpt2``, byte-fallback BPE as its ``llama``; see :mod:`wanda_lightning.gguf.vocab`),
            or ``"placeholder"``: timing-only, a vocabulary of the model's size with dummy tokens; llama.cpp loads it,
            text is meaningless.
        overwrite: Replace an existing ``path`` (and ``Modelfile``).
        modelfile: Also write ``Modelfile`` in the same folder (``FROM ./<name>.gguf``, plus the prompt template and
            stop token of ChatML and Gemma chat templates).

    Returns:
        A :class:`GGUFSummary`.

    Raises:
        ValueError: For an unknown ``dtype``, a row length ``dtype`` cannot hold (naming the layer and the multiple it
            needs), an unsupported family or setting (naming why), a missing or unusable ``tokenizer``, or an existing
            ``path`` or ``Modelfile`` without ``overwrite=True``. Nothing is written then.
        TypeError: If ``model`` holds no transformers model, or an argument has the wrong type.

    Example::

        model, tokenizer = load_smollm2()
        shrink(model, batches, mlp=0.5, multiple_of=32)
        save_gguf(model, "small.gguf", dtype="q8_0", tokenizer=smollm2_path() / GGUF_FILE)
        # llama-cli -m small.gguf   |   ollama create small -f Modelfile
    """
    dtype = check_gguf_type(dtype)
    check_bool(overwrite, "overwrite")
    check_bool(modelfile, "modelfile")
    target, beside = check_destination(path, overwrite, modelfile)
    found = find_pretrained(model)
    if found is None:
        raise TypeError(f"`model` must be a transformers causal LM or a module holding one, got {type(model).__name__}")
    pretrained = found[0]
    adapters = [name for name, _ in pretrained.named_parameters() if ".base_layer." in name or ".lora_" in name]
    if adapters:
        raise ValueError(
            f"`model` holds adapter layers ({adapters[0]!r}, ...): merge them first, with "
            "wanda_lightning.merge_adapters(copy.deepcopy(model)) (pruned weights stay zero) or peft's "
            "merge_and_unload()"
        )
    architecture = architecture_for(pretrained)
    planned = architecture.tensors()
    _tensor_types(planned, dtype)  # refuses a row length the type cannot hold, before the tokenizer's work
    vocabulary = resolve_vocabulary(tokenizer, architecture.shape.vocab, architecture.config)
    _write(target, architecture, dtype, vocabulary, planned)
    if beside is not None:
        _write_text(beside, modelfile_text(target.name, vocabulary.chat_template()))
    return GGUFSummary(
        path=str(target),
        architecture=architecture.name,
        dtype=dtype,
        file_bytes=target.stat().st_size,
        tensor_count=len(planned),
        parameters=sum(math.prod(t.shape) for t in planned if not t.generated),
        modelfile=str(beside) if beside is not None else None,
        tokenizer=vocabulary.source,
    )
