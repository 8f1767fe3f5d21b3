"""A weight selected for pruning, :class:`TargetLayer`: the one type every part of the engine passes around.

A leaf module (it imports only :mod:`.layers`), so that the modules that find targets (:mod:`.targets`,
:mod:`.attention`) and those that use them can all import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

from .layers import local_tensor

__all__ = ["TargetLayer"]


@dataclass
class TargetLayer:
    """A weight selected for pruning: a layer's ``weight``, or rows of another 2-D parameter of a module.

    Attributes:
        name: Name in reports, patterns and ``on_layer_pruned``: the module name of a linear layer
            (``"model.layers.0.mlp.up_proj"``); for the query/key/value thirds of a ``MultiheadAttention``,
            ``"<module>.in_proj_weight.q"`` (packed) or ``"<module>.q_proj_weight"`` (separate weights).
        module: The module holding the weight (``nn.Linear``, transformers' ``Conv1D``, ``nn.MultiheadAttention``).
        transposed: True for ``Conv1D``, whose weight is stored ``(in_features, out_features)``.
        parameter: Attribute of ``module`` holding the weight (``"weight"``, ``"in_proj_weight"``, ...).
        rows: ``(start, stop)`` rows of that parameter, for a packed weight; ``None`` for all of it.
        position: Which positional argument of ``module``'s forward is the input the weight multiplies.
        keyword: The same argument's name, when it is passed by keyword (``"key"``); ``None``: the first keyword.
        module_name: Module name of ``module`` (default: ``name``).
        attention: For the ``out_proj`` of a ``MultiheadAttention``, the attention module, whose forward is split
            around the projection while statistics are collected (:mod:`~wanda_lightning.core.attention`).

    Example::

        >>> layer = TargetLayer("fc", nn.Linear(3, 2))
        >>> layer.shape, layer.parameter_name
        ((2, 3), 'fc.weight')
    """

    name: str
    module: nn.Module
    transposed: bool = False
    parameter: str = "weight"
    rows: tuple[int, int] | None = None
    position: int = 0
    keyword: str | None = None
    module_name: str | None = None
    attention: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.module_name is None:
            self.module_name = self.name

    @property
    def tensor(self) -> Tensor:
        """The parameter holding the weight (all of it, also when the target is some of its rows)."""
        return cast(Tensor, getattr(self.module, self.parameter))

    @property
    def parameter_name(self) -> str:
        """Name of :attr:`tensor` in ``model.named_parameters()`` (``"model.layers.0.mlp.up_proj.weight"``)."""
        return f"{self.module_name}.{self.parameter}" if self.module_name else self.parameter

    @property
    def weight_2d(self) -> Tensor:
        """The weight as ``(out_features, in_features)``: a view that writes through to the parameter.

        For a DTensor weight (FSDP2), this rank's shard: its own output rows under ``Shard(0)``.
        """
        return self.as_layer(local_tensor(self.tensor.data))

    def as_layer(self, shaped_like_parameter: Tensor) -> Tensor:
        """A tensor shaped like the parameter (the weight, a mask of it) seen as this target's ``(out_features,
        in_features)`` view: transposed for ``Conv1D``, this target's rows of a packed parameter."""
        view = shaped_like_parameter.t() if self.transposed else shaped_like_parameter
        return view if self.rows is None else view[self.rows[0] : self.rows[1]]

    @property
    def in_features(self) -> int:
        # From the module's own attributes when it has them: FSDP1 flattens the weight outside its forward.
        known = getattr(self.module, "nx" if self.transposed else "in_features", None) if self._whole_layer else None
        return int(known) if isinstance(known, int) else int(self.weight_2d.shape[1])

    @property
    def out_features(self) -> int:
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        known = getattr(self.module, "nf" if self.transposed else "out_features", None) if self._whole_layer else None
        return int(known) if isinstance(known, int) else int(self.weight_2d.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the whole weight (of all shards, for a DTensor or under FSDP1)."""
        weight = self.tensor
        if weight.dim() != 2:  # flattened by FSDP1
            return (self.out_features, self.in_features)
        rows, columns = (int(d) for d in weight.shape)
        if self.rows is not None:
            return (self.rows[1] - self.rows[0], columns)
        return (columns, rows) if self.transposed else (rows, columns)

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def _whole_layer(self) -> bool:
        return self.parameter == "weight" and self.rows is None

    def input_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The input this weight multiplies, from the arguments of ``module``'s forward (as a pre-hook sees them)."""
        if len(args) > self.position:
            return cast(Tensor, args[self.position])
        if self.keyword is not None and self.keyword in kwargs:
            return cast(Tensor, kwargs[self.keyword])
        return cast(Tensor, next(iter(kwargs.values())))
