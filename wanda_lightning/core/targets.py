"""Which layers get pruned: discovery of Linear / Conv1D layers, name patterns, and tied-weight detection.

:class:`~wanda_lightning.core.target_layer.TargetLayer` is defined in :mod:`.target_layer` and re-exported here.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .adapters import adapter_roles, quantization_of
from .attention import attention_targets, is_attention
from .layers import is_conv1d, is_linear_layer, local_tensor
from .target_layer import TargetLayer

__all__ = ["TargetLayer", "find_targets", "layer_masks", "matches_any", "parameter_masks", "validate_patterns"]

DEFAULT_IGNORE: tuple[str, ...] = ("lm_head",)


def parameter_masks(layers: Sequence[TargetLayer], masks: Mapping[str, Tensor], fill: bool = True) -> dict[str, Tensor]:
    """Per-layer ``(out_features, in_features)`` masks (by :attr:`TargetLayer.name`) as masks shaped like the
    parameters that hold the weights (by :attr:`TargetLayer.parameter_name`).

    ``Conv1D`` masks are transposed to the stored ``(in, out)`` layout; the rows of a packed parameter (the query, key
    and value thirds of ``in_proj_weight``) are assembled into one mask, rows without a mask getting ``fill``.

    Example::

        >>> import torch
        >>> layer = TargetLayer("fc", nn.Linear(2, 1))
        >>> parameter_masks([layer], {"fc": torch.tensor([[True, False]])})
        {'fc.weight': tensor([[ True, False]])}
    """
    result: dict[str, Tensor] = {}
    for layer in layers:
        mask = masks.get(layer.name)
        if mask is None:
            continue
        if layer.rows is None:
            result[layer.parameter_name] = mask.t().contiguous() if layer.transposed else mask
            continue
        whole = result.get(layer.parameter_name)
        if whole is None:
            shape = tuple(local_tensor(layer.tensor).shape)
            whole = torch.full(shape, fill, dtype=mask.dtype, device=mask.device)
            result[layer.parameter_name] = whole
        whole[layer.rows[0] : layer.rows[1]] = mask
    return result


def layer_masks(layers: Sequence[TargetLayer], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`parameter_masks`: ``(out_features, in_features)`` masks by layer name, for the layers
    whose parameter has a mask.

    Example::

        >>> import torch
        >>> layer = TargetLayer("fc", nn.Linear(2, 1))
        >>> layer_masks([layer], {"fc.weight": torch.tensor([[True, False]])})
        {'fc': tensor([[ True, False]])}
    """
    return {
        layer.name: layer.as_layer(masks[layer.parameter_name]) for layer in layers if layer.parameter_name in masks
    }


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
    """Lists the weights to prune and the prunable layers left alone, with the reason.

    Candidates are every ``nn.Linear`` and transformers ``Conv1D``, and the query, key and value projections of every
    ``nn.MultiheadAttention`` (its ``out_proj`` is a linear layer; see :mod:`~wanda_lightning.core.attention`). In a
    PEFT model the adapters (``lora_A``, ``lora_B``, DoRA's magnitude, ...) are never candidates: the wrapped
    ``base_layer`` is, under its own name, and patterns match it by its wrapper's name too (``"*.q_proj"`` selects
    ``"...q_proj.base_layer"``); see :mod:`~wanda_lightning.core.adapters`.

    Args:
        model: Any module.
        targets: Name patterns of layers to prune (glob or ``re:`` regex); ``None`` means every candidate.
        ignore: Name patterns to leave alone; ``None`` means ``["lm_head"]``. Weights shared with an embedding are
            always left alone.

    Returns:
        ``(targets, skipped)`` where ``skipped`` holds ``(name, reason)`` pairs.

    Raises:
        ValueError: If no layer matches (the message lists the patterns and a few layer names; or says that they
            match only adapter layers), if a selected layer is quantized (bitsandbytes) or if PEFT adapters are
            merged into a selected base layer; nothing is changed then.

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
    roles = adapter_roles(model)
    selected: list[TargetLayer] = []
    skipped: list[tuple[str, str]] = []
    candidates: list[str] = []
    adapter_matches: list[str] = []
    matched = 0
    seen_weights: set[tuple[int, tuple[int, int] | None]] = set()
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        modules[name] = module
        if is_attention(module):
            found = attention_targets(name, module)
        elif is_linear_layer(module) and name:
            parent_name, _, child = name.rpartition(".")
            parent = modules.get(parent_name)
            owner = parent if child == "out_proj" and parent is not None and is_attention(parent) else None
            found = [TargetLayer(name=name, module=module, transposed=is_conv1d(module), attention=owner)]
        else:
            continue
        role = roles.role_of(name)
        alias = roles.aliases.get(name)
        for layer in found:
            names = [layer.name] + ([alias + layer.name[len(name) :]] if alias is not None else [])
            wanted = target_patterns is None or any(matches_any(n, target_patterns) for n in names)
            if role is not None and role[0] == "adapter":
                if wanted and target_patterns is not None:
                    adapter_matches.append(layer.name)
                continue
            candidates.append(layer.name)
            if not wanted:
                continue
            matched += 1
            if role is not None:
                skipped.append((layer.name, role[1]))
                continue
            pointer = _storage_key(layer.tensor)
            if pointer in embeddings:
                skipped.append((layer.name, f"weight shared with embedding `{embeddings[pointer]}`"))
                continue
            if any(matches_any(n, ignore_patterns) for n in names):
                skipped.append((layer.name, "matches `ignore`"))
                continue
            if (pointer, layer.rows) in seen_weights:
                skipped.append((layer.name, "weight shared with another target layer (pruned once)"))
                continue
            quantized = quantization_of(module, layer.tensor)
            if quantized is not None:
                raise ValueError(
                    f"layer {layer.name!r} is quantized ({quantized}): zeroing its packed data does not prune weights. "
                    "Prune the model in floating point and quantize it afterwards, or leave the layer out with "
                    "`ignore`"
                )
            merged = [w for w in roles.merged if name.startswith(f"{w}.")]
            if merged:
                raise ValueError(
                    f"the PEFT adapters of {merged[0]!r} are merged into its base layer {layer.name!r}: pruning it "
                    "would prune their update with it. Unmerge them first (`model.unmerge_adapter()`), or prune the "
                    "merged model (`merge_and_unload()`)"
                )
            seen_weights.add((pointer, layer.rows))
            selected.append(layer)
    if not selected:
        if adapter_matches and not matched:
            wrapper = (roles.role_of(adapter_matches[0]) or ("", ""))[1]
            raise ValueError(
                f"`targets`={list(target_patterns or ())} match only PEFT adapter layers ({adapter_matches[:3]}), "
                "which are never pruned: the layers they adapt are (the base layer's weight, from the statistics of "
                f"the wrapper's input); select them by the wrapped layer's name, such as {wrapper!r}"
            )
        examples = ", ".join(candidates[:5]) or "none: the model has no nn.Linear, Conv1D or MultiheadAttention layer"
        raise ValueError(
            f"no layer to prune: `targets`={list(target_patterns) if target_patterns else None} and "
            f"`ignore`={list(ignore_patterns)} leave nothing; prunable layers include: {examples}"
        )
    return selected, skipped
