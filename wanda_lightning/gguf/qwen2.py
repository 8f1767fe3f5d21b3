"""llama.cpp's ``qwen2`` architecture: Qwen2 and Qwen2.5 models (query/key/value biases, no row permutation).

llama.cpp's ``qwen2`` loader sizes the query and output projections by the hidden size, so it cannot hold a model
whose heads were removed (``heads x head_dim < hidden``). Such a model is written as ``llama`` instead, which is the
same computation: ``llama`` reads the query/key/value biases too, and its rope rotates interleaved pairs, which the
row permutation of :class:`~wanda_lightning.gguf.llama.LlamaArchitecture` makes exact.
"""

from __future__ import annotations

from .architecture import DecoderShape, GGUFArchitecture, check_rope_type, rope_parameters
from .llama import LlamaArchitecture

__all__ = ["Qwen2Architecture"]


class Qwen2Architecture(GGUFArchitecture):
    """llama.cpp's ``qwen2``: Qwen2 models whose heads fill the hidden size; others go to ``llama``.

    Example::

        shrink(qwen, batches, heads=0.5)
        save_gguf(qwen, "small.gguf", tokenizer=tokenizer).architecture  # 'llama': the same computation
    """

    name = "qwen2"
    model_types = ("qwen2",)
    bias_tensors = frozenset({"attn_q", "attn_k", "attn_v"})

    @classmethod
    def choose(cls, shape: DecoderShape) -> type[GGUFArchitecture]:
        """``qwen2`` when ``heads x head_dim`` equals the hidden size, else ``llama`` (see the module docstring)."""
        return cls if shape.heads * shape.head_dim == shape.hidden else LlamaArchitecture

    def check(self) -> None:
        """Refuses an activation other than SiLU, any rope scaling and sliding-window layers (llama.cpp's ``qwen2``
        has neither)."""
        activation = getattr(self.config, "hidden_act", "silu")
        if activation != "silu":
            self._refuse(f"its MLP activation is {activation!r}; llama.cpp's `qwen2` computes SiLU")
        check_rope_type(self, rope_parameters(self.config), ("default",))
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            self._refuse("some of its layers use sliding-window attention, which llama.cpp's `qwen2` does not have")
