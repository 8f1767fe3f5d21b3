"""llama.cpp's ``gemma3`` architecture: Gemma 3 text models (``Gemma3ForCausalLM``).

What differs from Llama, and how it is written:

- norms: transformers stores ``w`` and scales by ``1 + w`` (``Gemma3RMSNorm``); llama.cpp scales by the stored
  value, so every norm (query/key norms included) is written as ``w + 1``;
- sliding-window layers: which layers slide is written per layer (``attention.sliding_window_pattern``, one bool
  each), so a model with blocks removed keeps each block's kind; local layers use ``rope.freq_base_swa``;
- the embedding scale ``sqrt(hidden)`` is applied by llama.cpp itself; the attention scale is fixed by llama.cpp
  (``1/sqrt(head_dim)``, or ``1/sqrt(hidden/heads)`` for 62 blocks), so a ``query_pre_attn_scalar`` that differs is
  refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .architecture import GGUFArchitecture, check_rope_type, rope_parameters
from .quantization import require_gguf

__all__ = ["Gemma3Architecture"]

_SLIDING, _FULL = "sliding_attention", "full_attention"


class Gemma3Architecture(GGUFArchitecture):
    """llama.cpp's ``gemma3``: ``Gemma3ForCausalLM`` (``model_type`` ``gemma3_text``).

    Example::

        model = AutoModelForCausalLM.from_pretrained("google/gemma-3-270m")
        save_gguf(model, "gemma.gguf", tokenizer=AutoTokenizer.from_pretrained("google/gemma-3-270m"))
    """

    name = "gemma3"
    model_types = ("gemma3_text",)
    bias_tensors = frozenset({"attn_q", "attn_k", "attn_v"})
    full_attention_type = _FULL

    def check(self) -> None:
        """Refuses what llama.cpp's ``gemma3`` computes differently: the activation, the attention scale, attention
        logit soft-capping, bidirectional attention, rope scalings other than linear on global layers, and layer
        kinds that do not match the blocks."""
        config, shape = self.config, self.shape
        activation = getattr(config, "hidden_activation", "gelu_pytorch_tanh")
        if activation != "gelu_pytorch_tanh":
            self._refuse(f"its MLP activation is {activation!r}; llama.cpp's `gemma3` computes tanh-approximated GELU")
        scalar = float(getattr(config, "query_pre_attn_scalar", shape.head_dim))
        expected = shape.hidden // shape.heads if shape.blocks == 62 else shape.head_dim
        if not math.isclose(scalar, expected):
            self._refuse(
                f"it scales attention by query_pre_attn_scalar={scalar:g}, and llama.cpp's `gemma3` scales a model of "
                f"{shape.blocks} blocks by {expected} (the head size, or hidden/heads for 62 blocks)"
            )
        if getattr(config, "attn_logit_softcapping", None) is not None:
            self._refuse("it soft-caps attention logits, which llama.cpp's `gemma3` does not")
        if getattr(config, "use_bidirectional_attention", False):
            self._refuse("it uses bidirectional attention; llama.cpp's `gemma3` is causal")
        check_rope_type(self, rope_parameters(config, _FULL), ("default", "linear"))
        check_rope_type(self, rope_parameters(config, _SLIDING), ("default",))
        kinds = list(getattr(config, "layer_types", None) or ())
        if len(kinds) != shape.blocks or not set(kinds) <= {_SLIDING, _FULL}:
            self._refuse(f"its config's layer_types {kinds} do not give one kind per block ({shape.blocks} blocks)")
        if _SLIDING in kinds and not getattr(config, "sliding_window", None):
            self._refuse("it has sliding-window layers but no `sliding_window` in its config")

    def modify_tensor(self, name: str, values: np.ndarray) -> np.ndarray:
        """Norm weights ``w`` become ``w + 1`` (llama.cpp multiplies by the stored value)."""
        return values + np.float32(1.0) if name.endswith("norm.weight") else values

    def write_metadata(self, writer: Any) -> None:
        """The common keys, the local rope base, the sliding window and its per-layer pattern, soft-capping and a
        linear rope scaling of the global layers."""
        super().write_metadata(writer)
        config = self.config
        kinds = list(config.layer_types)
        if _SLIDING in kinds:
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_sliding_window_pattern([kind == _SLIDING for kind in kinds])
            local_theta = rope_parameters(config, _SLIDING).get("rope_theta")
            if local_theta is not None:
                writer.add_rope_freq_base_swa(float(local_theta))
        softcap = getattr(config, "final_logit_softcapping", None)
        if softcap:
            writer.add_final_logit_softcapping(float(softcap))
        full = rope_parameters(config, _FULL)
        if str(full.get("rope_type") or "default") == "linear":
            writer.add_rope_scaling_type(require_gguf().RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
