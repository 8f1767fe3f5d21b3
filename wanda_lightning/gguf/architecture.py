"""The base of the per-architecture writers: what every llama.cpp decoder architecture needs from a transformers causal
LM, and the few things a subclass (:mod:`.llama`, :mod:`.qwen2`, :mod:`.gemma3`) changes.

A subclass provides, as class attributes:

- ``name``: llama.cpp's architecture name (``general.architecture``), one of ``gguf.MODEL_ARCH_NAMES``;
- ``model_types``: the transformers ``config.model_type`` values it writes;
- ``bias_tensors``: the GGUF tensors (``attn_q`` for ``blk.N.attn_q`` ...) whose ``.bias`` llama.cpp's loader reads for
  it;

and may override :meth:`~GGUFArchitecture.check` (refuse what llama.cpp cannot run exactly),
:meth:`~GGUFArchitecture.modify_tensor` (the few tensors llama.cpp stores differently),
:meth:`~GGUFArchitecture.extra_tensors` (tensors transformers computes at run time) and
:meth:`~GGUFArchitecture.write_metadata` (call ``super()`` first).

Shapes are read from the modules, never from the config alone, so that a model ``shrink()`` made is written as it
is: every kept width must be the same in all blocks (llama.cpp's ``llama``, ``qwen2`` and ``gemma3`` read one width
from the file).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from .quantization import require_gguf

__all__ = ["DecoderShape", "GGUFArchitecture", "PlannedTensor", "rope_parameters"]


@dataclass(frozen=True)
class DecoderShape:
    """The sizes llama.cpp reads from a decoder-only model's GGUF metadata, measured on its modules.

    Attributes:
        blocks: Decoder blocks.
        hidden: Hidden size (embedding length).
        heads: Query heads per block.
        kv_heads: Key/value heads per block.
        head_dim: Channels per head (key and value length, rotary dimensions).
        intermediate: MLP hidden units per block.
        vocab: Rows of the token embedding.
        context: Trained context length (``max_position_embeddings``).

    Example::

        shrink(model, batches, mlp=0.5, layers=0.2)
        DecoderShape.of(model)  # DecoderShape(blocks=24, hidden=576, heads=9, kv_heads=3, intermediate=768, ...)
    """

    blocks: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int

    @classmethod
    def of(cls, model: nn.Module) -> DecoderShape:
        """Measures ``model`` (a transformers causal LM with ``model.model.layers``).

        Raises:
            ValueError: If the model has no decoder blocks in the usual place, or if a width differs across blocks.
        """
        decoder = getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        embed = getattr(decoder, "embed_tokens", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or not isinstance(embed, nn.Embedding):
            raise ValueError(
                f"{type(model).__name__} has no `model.layers` decoder blocks and `model.embed_tokens` embedding, "
                "which save_gguf needs"
            )
        widths: list[tuple[int, int, int, int]] = []
        for index, layer in enumerate(layers):
            attention: Any = layer.self_attn
            head_dim = int(attention.head_dim)
            query, key = int(attention.q_proj.weight.shape[0]), int(attention.k_proj.weight.shape[0])
            value = int(attention.v_proj.weight.shape[0])
            if query % head_dim or key % head_dim or value != key:
                raise ValueError(
                    f"block {index}: q/k/v projections of {query}/{key}/{value} rows do not hold whole heads of "
                    f"{head_dim} channels"
                )
            mlp: Any = layer.mlp
            widths.append((query // head_dim, key // head_dim, head_dim, int(mlp.gate_proj.weight.shape[0])))
        if len(set(widths)) > 1:
            described = ", ".join(
                f"block {i}: {w[0]} heads, {w[1]} kv heads, {w[3]} MLP units" for i, w in enumerate(widths)
            )
            raise ValueError(
                f"the blocks have different widths ({described}); llama.cpp's architectures read one width for all "
                "blocks (per-block widths need its `deci` architecture, which save_gguf does not write): shrink "
                "every block to the same width"
            )
        heads, kv_heads, head_dim, intermediate = widths[0]
        config: Any = model.config
        return cls(
            blocks=len(layers),
            hidden=int(embed.weight.shape[1]),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=intermediate,
            vocab=int(embed.weight.shape[0]),
            context=int(getattr(config, "max_position_embeddings", 0) or 0),
        )


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file, planned before anything is written.

    Attributes:
        name: Its GGUF name (``blk.0.attn_q.weight``).
        source: The transformers parameter it comes from (``model.layers.0.self_attn.q_proj.weight``), or a
            description for a tensor computed here (``"rope frequency factors"``).
        shape: Its shape, torch order (rows last).
        load: Returns its float32 values as llama.cpp expects them (a new array: the model is never touched).
        generated: Whether it is computed here rather than one of the model's parameters.

    Example::

        >>> import numpy as np
        >>> PlannedTensor("rope_freqs.weight", "rope factors", (32,), lambda: np.ones(32, np.float32), True).shape
        (32,)
    """

    name: str
    source: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    generated: bool = False


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rotary settings of ``config`` (transformers' ``rope_parameters``, or the older ``rope_theta`` /
    ``rope_scaling``), for one layer type when the config keeps one set per type (Gemma 3).

    Example::

        >>> from types import SimpleNamespace
        >>> rope_parameters(SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
        {'rope_type': 'default', 'rope_theta': 10000.0}
    """
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    parameters = dict(parameters)
    if layer_type is not None and isinstance(parameters.get(layer_type), dict):
        parameters = dict(parameters[layer_type])
    if "rope_theta" not in parameters and getattr(config, "rope_theta", None) is not None:
        parameters["rope_theta"] = config.rope_theta
    if "rope_type" not in parameters and "type" in parameters:
        parameters["rope_type"] = parameters["type"]
    return parameters


class GGUFArchitecture:
    """Writes one transformers causal LM as one llama.cpp architecture; see the module docstring for what a subclass
    provides.

    Args:
        model: The transformers causal LM (never changed).
        shape: Its measured sizes.

    Example::

        class DoubledValues(GGUFArchitecture):  # a llama whose value projections llama.cpp should read doubled
            name = "llama"
            model_types = ("llama",)
            bias_tensors = frozenset({"attn_q", "attn_k", "attn_v"})

            def modify_tensor(self, name, values):
                return values * 2 if name.endswith("attn_v.weight") else values
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    bias_tensors: ClassVar[frozenset[str]] = frozenset()
    #: The key under which a per-layer-type ``rope_parameters`` keeps the full-attention settings (Gemma 3).
    full_attention_type: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, shape: DecoderShape) -> None:
        self.model = model
        self.config: Any = model.config
        self.shape = shape

    @classmethod
    def choose(cls, shape: DecoderShape) -> type[GGUFArchitecture]:
        """The architecture that writes a model of this family and ``shape``: ``cls`` itself unless llama.cpp's
        architecture of that name cannot hold the shape and another one holds it exactly."""
        return cls

    @property
    def gguf_arch(self) -> Any:
        """The ``gguf.MODEL_ARCH`` member of :attr:`name`."""
        gguf = require_gguf()
        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == self.name)

    def check(self) -> None:
        """Raises ``ValueError`` naming what llama.cpp's architecture cannot run exactly (the base checks nothing)."""

    def _refuse(self, reason: str) -> NoReturn:
        family = getattr(self.config, "model_type", type(self.model).__name__)
        raise ValueError(f"save_gguf cannot write this {family} model as llama.cpp's `{self.name}`: {reason}")

    def modify_tensor(self, name: str, values: np.ndarray) -> np.ndarray:
        """``values`` of the GGUF tensor ``name`` as llama.cpp stores them (the base returns them as they are)."""
        return values

    def extra_tensors(self) -> Iterator[PlannedTensor]:
        """Tensors that transformers computes at run time but llama.cpp reads from the file (none in the base)."""
        return iter(())

    def tensors(self) -> list[PlannedTensor]:
        """Every tensor of the file, in the model's parameter order, then :meth:`extra_tensors`.

        Tied weights are written once (llama.cpp reuses ``token_embd`` when ``output`` is absent); an all-zero bias
        that llama.cpp's architecture does not read is left out (exact), any other one is refused.

        Raises:
            ValueError: Naming a parameter that has no GGUF name in this architecture, or a non-zero bias llama.cpp
                would ignore.
        """
        gguf = require_gguf()
        names = gguf.get_tensor_name_map(self.gguf_arch, self.shape.blocks)
        planned: list[PlannedTensor] = []
        for source, parameter in self.model.named_parameters():
            base, _, suffix = source.rpartition(".")
            mapped = names.get_name(base)
            if mapped is None or suffix not in ("weight", "bias"):
                self._refuse(f"parameter {source!r} has no tensor name in llama.cpp's `{self.name}` architecture")
            if suffix == "bias" and mapped.rpartition(".")[2] not in self.bias_tensors:
                if not bool(torch.any(parameter.detach() != 0)):
                    continue  # llama.cpp would not read it, and a zero bias changes nothing
                self._refuse(
                    f"{source!r} is a non-zero bias, and llama.cpp's `{self.name}` architecture reads no bias there"
                )
            name = f"{mapped}.{suffix}"
            planned.append(PlannedTensor(name, source, tuple(parameter.shape), self._loader(name, parameter)))
        planned.extend(self.extra_tensors())
        return planned

    def _loader(self, name: str, parameter: Tensor) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            values = parameter.detach().to(device="cpu", dtype=torch.float32).numpy()
            return self.modify_tensor(name, np.array(values, dtype=np.float32, copy=True))

        return load

    def write_metadata(self, writer: Any) -> None:
        """Writes the ``{arch}.*`` keys every decoder architecture reads, from :attr:`shape` and the config."""
        shape = self.shape
        if shape.context:
            writer.add_context_length(shape.context)
        writer.add_embedding_length(shape.hidden)
        writer.add_block_count(shape.blocks)
        writer.add_feed_forward_length(shape.intermediate)
        writer.add_head_count(shape.heads)
        writer.add_head_count_kv(shape.kv_heads)
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_layer_norm_rms_eps(float(self.config.rms_norm_eps))
        writer.add_vocab_size(shape.vocab)
        theta = rope_parameters(self.config, self.full_attention_type).get("rope_theta")
        if theta is not None:
            writer.add_rope_freq_base(float(theta))

    def model_name(self) -> str:
        """``general.name``: the last part of the config's ``name_or_path``, else the model class."""
        name = str(getattr(self.config, "name_or_path", "") or getattr(self.config, "_name_or_path", "") or "")
        return Path(name).name or type(self.model).__name__


def check_rope_type(architecture: GGUFArchitecture, parameters: dict[str, Any], allowed: tuple[str, ...]) -> str:
    """The rope type of ``parameters`` (``"default"`` when unset) if it is in ``allowed`` (with a positive ``factor``
    when it scales), else refuses through ``architecture``.

    Example::

        check_rope_type(self, rope_parameters(self.config), ("default", "linear"))  # in a subclass's check()
    """
    rope_type = str(parameters.get("rope_type") or "default")
    if rope_type not in allowed:
        architecture._refuse(
            f"its rope scaling {rope_type!r} is not one this writer carries over (only {list(allowed)})"
        )
    factor = parameters.get("factor")
    if rope_type != "default" and (not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0):
        architecture._refuse(f"its rope scaling {rope_type!r} has no positive `factor` (got {factor!r})")
    return rope_type
