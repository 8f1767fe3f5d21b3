"""llama.cpp's ``llama`` architecture: Llama, Mistral and SmolLM2 models, and the shapes ``shrink()`` makes of them.

Two things only llama.cpp's converter knew, written here from what llama.cpp computes:

- the query/key row order: transformers rotates the first half of each head's channels with the second half
  (``rotate_half``), llama.cpp's ``llama`` rope rotates adjacent pairs, so each head's rows are interleaved
  (:func:`interleave_rotary_rows`), biases too;
- Llama 3's rope scaling, which llama.cpp reads as a ``rope_freqs`` tensor of per-frequency divisors.

llama.cpp's ``llama`` loader reads an optional bias on every projection (q, k, v, output; gate, up, down), so the bias
compensation of ``shrink(method="flap")`` (``attention_bias`` / ``mlp_bias`` configs) is written as it is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from .architecture import GGUFArchitecture, PlannedTensor, check_rope_type, rope_parameters
from .quantization import require_gguf

__all__ = ["LlamaArchitecture", "interleave_rotary_rows", "llama3_rope_factors"]


def interleave_rotary_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """Reorders the rows of each head from transformers' rotate-half layout to the interleaved pairs llama.cpp's
    ``llama`` rope rotates: within a head of ``d`` rows, rows ``i`` and ``i + d/2`` become rows ``2i`` and ``2i + 1``.

    Args:
        values: A query or key projection's weight ``(heads * d, in)`` or bias ``(heads * d,)``.
        heads: Its number of heads.

    Example::

        >>> import numpy as np
        >>> interleave_rotary_rows(np.arange(8.0), heads=2)  # two heads of 4: (0 1 | 2 3), (4 5 | 6 7)
        array([0., 2., 1., 3., 4., 6., 5., 7.])
    """
    head_dim = values.shape[0] // heads
    grouped = values.reshape(heads, 2, head_dim // 2, *values.shape[1:])  # (heads, half, d/2, ...)
    return np.ascontiguousarray(np.swapaxes(grouped, 1, 2).reshape(values.shape))


def llama3_rope_factors(parameters: dict[str, Any], head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor of Llama 3's rope scaling: for each rotary frequency, what llama.cpp divides it by
    (1 for short wavelengths, ``factor`` for long ones, a smooth blend between).

    Args:
        parameters: The config's rope parameters (``rope_theta``, ``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``).
        head_dim: Channels per head.

    Example::

        >>> p = {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        ...      "original_max_position_embeddings": 8192}
        >>> factors = llama3_rope_factors(p, 64)
        >>> float(factors[0]), float(factors[-1])
        (1.0, 8.0)
    """
    base = float(parameters.get("rope_theta", 10000.0))
    factor = float(parameters["factor"])
    low = float(parameters.get("low_freq_factor", 1.0))
    high = float(parameters.get("high_freq_factor", 4.0))
    original = float(parameters.get("original_max_position_embeddings", 8192))
    frequencies = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelengths = 2 * math.pi / frequencies
    smooth = (original / wavelengths - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, blended))
    return factors.astype(np.float32)


class LlamaArchitecture(GGUFArchitecture):
    """llama.cpp's ``llama``: Llama, Mistral and SmolLM2 (and Qwen2 shapes ``qwen2`` cannot hold, see
    :class:`~wanda_lightning.gguf.qwen2.Qwen2Architecture`).

    Example::

        architecture = architecture_for(model)  # a LlamaForCausalLM -> LlamaArchitecture, checked
        [t.name for t in architecture.tensors()][:2]  # ['token_embd.weight', 'blk.0.attn_q.weight']
    """

    name = "llama"
    model_types = ("llama", "mistral")
    bias_tensors = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"})
    rope_type = "default"  # set by check()

    def check(self) -> None:
        """Refuses an activation other than SiLU, rope scalings other than linear and Llama 3's, and sliding-window
        layers (llama.cpp's ``llama`` attends to the whole context); warns for Mistral's sliding window."""
        activation = getattr(self.config, "hidden_act", "silu")
        if activation != "silu":
            self._refuse(f"its MLP activation is {activation!r}; llama.cpp's `llama` computes SiLU")
        self.rope_type = check_rope_type(self, rope_parameters(self.config), ("default", "linear", "llama3"))
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            self._refuse("some of its layers use sliding-window attention, which llama.cpp's `llama` does not have")
        window = getattr(self.config, "sliding_window", None)
        if getattr(self.config, "model_type", "") == "mistral" and window and window < self.shape.context:
            warnings.warn(
                f"this Mistral model attends to the last {window} tokens only; llama.cpp's `llama` attends to the "
                f"whole context, so its outputs differ from transformers' beyond {window} tokens",
                stacklevel=3,
            )

    def modify_tensor(self, name: str, values: np.ndarray) -> np.ndarray:
        """Interleaves the rotary rows of the query and key projections (weights and biases)."""
        kind = name.split(".")[-2]
        if kind == "attn_q":
            return interleave_rotary_rows(values, self.shape.heads)
        if kind == "attn_k":
            return interleave_rotary_rows(values, self.shape.kv_heads)
        return values

    def extra_tensors(self) -> Iterator[PlannedTensor]:
        """Llama 3's ``rope_freqs`` when the config scales rope that way."""
        if self.rope_type == "llama3":
            factors = llama3_rope_factors(rope_parameters(self.config), self.shape.head_dim)
            yield PlannedTensor(
                "rope_freqs.weight", "Llama 3 rope frequency factors", factors.shape, factors.copy, generated=True
            )

    def write_metadata(self, writer: Any) -> None:
        """The common keys, and a linear rope scaling when the config has one."""
        super().write_metadata(writer)
        if self.rope_type == "linear":
            writer.add_rope_scaling_type(require_gguf().RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope_parameters(self.config)["factor"]))
