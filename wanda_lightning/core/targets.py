"""Which layers get pruned: discovery of Linear / Conv1D layers, name patterns, and tied-weight detection."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from torch import Tensor, nn

from .layers import is_conv1d, is_linear_layer, local_tensor

__all__ = ["TargetLayer", "find_targets", "matches_any", "validate_patterns"]

DEFAULT_IGNORE: tuple[str, ...] = ("lm_head",)


@dataclass
class TargetLayer:
    """A layer selected for pruning.

    Attributes:
        name: Fully qualified module name in the model passed to ``prune()``.
        module: The module (``nn.Linear`` or transformers' ``Conv1D``).
        transposed: True for ``Conv1D``, whose weight is stored ``(in_features, out_features)``.
    """

    name: str
    module: nn.Module
    transposed: bool = False

    @property
    def weight_2d(self) -> Tensor:
        """The weight as ``(out_features, in_features)``: a view that writes through to the parameter.

        For a DTensor weight (FSDP2), this rank's shard: its own output rows under ``Shard(0)``.
        """
        weight = local_tensor(cast(Tensor, self.module.weight).data)
        return weight.t() if self.transposed else weight

    @property
    def in_features(self) -> int:
        # From the module's own attributes when it has them: FSDP1 flattens the weight outside its forward.
        known = getattr(self.module, "nx" if self.transposed else "in_features", None)
        return int(known) if isinstance(known, int) else int(self.weight_2d.shape[1])

    @property
    def out_features(self) -> int:
        known = getattr(self.module, "nf" if self.transposed else "out_features", None)
        return int(known) if isinstance(known, int) else int(self.weight_2d.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the whole weight (of all shards, for a DTensor or under FSDP1)."""
        weight = cast(Tensor, self.module.weight)
        if weight.dim() != 2:  # flattened by FSDP1
            return (self.out_features, self.in_features)
        rows, columns = (int(d) for d in weight.shape)
        return (columns, rows) if self.transposed else (rows, columns)

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def _storage_key(weight: Tensor) -> int:
    """Identifies a weight's memory, to find tied weights; a DTensor by its local shard (its own pointer is 0); a weight
    without memory (meta, or FSDP1's freed unsharded views) by the tensor object."""
    local = local_tensor(weight)
    if local.numel() == 0 or local.is_meta or local.untyped_storage().nbytes() == 0:
        return id(weight)
    return local.data_ptr()


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        body = pattern[3:]
    else:
        body = fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(")\\Z")
    # A pattern matches the full name or any dotted suffix of it ("lm_head" matches "model.lm_head").
    return re.compile(rf"(?:.*\.)?(?:{body})", re.DOTALL)


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether ``name`` matches one of ``patterns``.

    A pattern is a glob (``"*.mlp.*"``) or a regular expression prefixed with ``re:`` (``"re:.*\\.(q|k)_proj"``),
    matched against the whole module name or any dotted suffix of it.

    Example::

        >>> matches_any("model.lm_head", ["lm_head"]), matches_any("model.layers.0.mlp.up_proj", ["*.mlp.*"])
        (True, True)
        >>> matches_any("model.layers.0.self_attn.q_proj", ["re:layers\\\\.1\\\\..*"])
        False
    """
    return any(_compile(p).fullmatch(name) is not None for p in patterns)


def validate_patterns(patterns: Sequence[str] | str | None, argument: str) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    result = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"`{argument}` must be a sequence of non-empty name patterns, got {pattern!r}")
        try:
            _compile(pattern)
        except re.error as error:
            raise ValueError(f"`{argument}` pattern {pattern!r} is not a valid regular expression: {error}") from None
        result.append(pattern)
    return tuple(result)


def _embedding_weights(model: nn.Module) -> dict[int, str]:
    found: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            found[_storage_key(module.weight)] = name
    get_input = getattr(model, "get_input_embeddings", None)
    if callable(get_input):
        try:
            embedding = get_input()
        except (NotImplementedError, AttributeError):
            embedding = None
        if embedding is not None and getattr(embedding, "weight", None) is not None:
            found.setdefault(_storage_key(embedding.weight), "input embeddings")
    return found


def find_targets(
    model: nn.Module, targets: Sequence[str] | str | None = None, ignore: Sequence[str] | str | None = None
) -> tuple[list[TargetLayer], list[tuple[str, str]]]:
    """Lists the layers to prune and the prunable layers left alone, with the reason.

    Args:
        model: Any module.
        targets: Name patterns of layers to prune (glob or ``re:`` regex); ``None`` means every ``nn.Linear`` and
            ``Conv1D``.
        ignore: Name patterns to leave alone; ``None`` means ``["lm_head"]``. Weights shared with an embedding are
            always left alone.

    Returns:
        ``(targets, skipped)`` where ``skipped`` holds ``(name, reason)`` pairs.

    Raises:
        ValueError: If no layer matches (the message lists the patterns and a few layer names).

    Example::

        >>> layers, skipped = find_targets(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), ignore=["2"])
        >>> [t.name for t in layers], skipped
        (['0'], [('2', 'matches `ignore`')])
    """
    target_patterns = validate_patterns(targets, "targets")
    ignore_patterns = validate_patterns(ignore, "ignore")
    if ignore_patterns is None:
        ignore_patterns = DEFAULT_IGNORE
    embeddings = _embedding_weights(model)
    selected: list[TargetLayer] = []
    skipped: list[tuple[str, str]] = []
    candidates: list[str] = []
    seen_weights: set[int] = set()
    for name, module in model.named_modules():
        if not is_linear_layer(module) or not name:
            continue
        candidates.append(name)
        if target_patterns is not None and not matches_any(name, target_patterns):
            continue
        pointer = _storage_key(module.weight)
        if pointer in embeddings:
            skipped.append((name, f"weight shared with embedding `{embeddings[pointer]}`"))
            continue
        if matches_any(name, ignore_patterns):
            skipped.append((name, "matches `ignore`"))
            continue
        if pointer in seen_weights:
            skipped.append((name, "weight shared with another target layer (pruned once)"))
            continue
        seen_weights.add(pointer)
        selected.append(TargetLayer(name=name, module=module, transposed=is_conv1d(module)))
    if not selected:
        examples = ", ".join(candidates[:5]) or "none: the model has no nn.Linear or Conv1D layer"
        raise ValueError(
            f"no layer to prune: `targets`={list(target_patterns) if target_patterns else None} and "
            f"`ignore`={list(ignore_patterns)} leave nothing; prunable layers include: {examples}"
        )
    return selected, skipped
