"""The GGUF tensor types :func:`~wanda_lightning.gguf.save_gguf` writes, which tensors stay float32, and the encoding
itself (the ``gguf`` package's quantizers).

llama.cpp's convention, followed here: norms, biases and every other 1-D tensor stay float32; each 2-D weight
(embedding and output included) takes the chosen type. Quantized types pack each row in blocks (32 values for q8_0
and q4_0), so a row length that is not a multiple of the block is refused before anything is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from ..core.validation import check_choice

if TYPE_CHECKING:
    from types import ModuleType

__all__ = [
    "GGUF_TYPES",
    "GGUFType",
    "block_size",
    "check_gguf_type",
    "encode",
    "encoded_nbytes",
    "file_type",
    "ggml_type",
    "keeps_float32",
    "require_gguf",
]

#: The tensor types :func:`~wanda_lightning.gguf.save_gguf` writes.
GGUFType = Literal["f32", "f16", "bf16", "q8_0", "q4_0"]
GGUF_TYPES: tuple[GGUFType, ...] = get_args(GGUFType)


def require_gguf() -> ModuleType:
    """The ``gguf`` package, or a ``ModuleNotFoundError`` that says how to install it.

    Example::

        >>> require_gguf().__name__
        'gguf'
    """
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is in the [demo] extra
        raise ModuleNotFoundError(
            "writing GGUF files needs the `gguf` package: pip install gguf (or wanda-lightning[demo])"
        ) from None
    return gguf


def check_gguf_type(value: Any, name: str = "dtype") -> GGUFType:
    """Returns ``value`` if it is one of :data:`GGUF_TYPES` (case-insensitive), else raises ``ValueError``.

    Example::

        >>> check_gguf_type("Q8_0")
        'q8_0'
        >>> check_gguf_type("q4_k")
        Traceback (most recent call last):
        ...
        ValueError: `dtype` must be one of ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'], got 'q4_k'
    """
    return check_choice(value, name, GGUF_TYPES)  # type: ignore[return-value]


def ggml_type(dtype: GGUFType) -> Any:
    """The ``gguf.GGMLQuantizationType`` of ``dtype`` (``"q8_0"`` -> ``Q8_0``).

    Example::

        >>> ggml_type("q4_0").name
        'Q4_0'
    """
    return require_gguf().GGMLQuantizationType[dtype.upper()]


def file_type(dtype: GGUFType) -> Any:
    """The ``gguf.LlamaFileType`` a file of ``dtype`` declares in ``general.file_type``.

    Example::

        >>> file_type("f16").name
        'MOSTLY_F16'
    """
    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    return require_gguf().LlamaFileType[names[dtype]]


def block_size(qtype: Any) -> int:
    """How many values of a row one block of ``qtype`` (a ``GGMLQuantizationType``) holds: 1 for float types.

    Example::

        >>> block_size(ggml_type("q8_0")), block_size(ggml_type("f16"))
        (32, 1)
    """
    return int(require_gguf().GGML_QUANT_SIZES[qtype][0])


def keeps_float32(name: str, ndim: int) -> bool:
    """Whether the GGUF tensor ``name`` stays float32 whatever the file's type: 1-D tensors (norms, biases, rope
    factors) and norms, as llama.cpp's converter and its kernels expect.

    Example::

        >>> keeps_float32("blk.0.attn_norm.weight", 1), keeps_float32("blk.0.ffn_down.weight", 2)
        (True, False)
    """
    return ndim <= 1 or name.endswith("_norm.weight")


def encoded_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    """Bytes a tensor of ``shape`` (torch order, rows last) takes in ``qtype``.

    Example::

        >>> encoded_nbytes((4, 64), ggml_type("q8_0"))  # 2 blocks of 34 bytes per row
        272
    """
    values_per_block, bytes_per_block = require_gguf().GGML_QUANT_SIZES[qtype]
    count = int(np.prod(shape, dtype=np.int64))
    return count // values_per_block * bytes_per_block


def encode(values: np.ndarray, qtype: Any) -> np.ndarray:
    """``values`` (float32) in ``qtype``, as the array the GGUF writer stores: float32/float16 values, or the raw bytes
    of bf16 and quantized blocks. Zeros stay exactly zero in every type (q8_0 and q4_0 are symmetric).

    Example::

        >>> import numpy as np
        >>> encode(np.zeros((1, 32), dtype=np.float32), ggml_type("q8_0")).shape  # one block: scale + 32 bytes
        (1, 34)
    """
    gguf = require_gguf()
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype))
