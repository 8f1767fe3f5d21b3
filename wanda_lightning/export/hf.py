"""Hugging Face models: :func:`save_pruned` writes an export with config and tokenizer, :func:`load_pruned` reads it."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.adapters import has_adapters
from ..core.layers import find_pretrained, is_conv1d
from .adapters import merge_adapters
from .directory import DEFAULT_MAX_SHARD_SIZE, load_compressed, save_compressed
from .format import DEFAULT_MIN_SPARSITY, CorruptExportError
from .manifest import ExportSummary

__all__ = ["load_pruned", "save_pruned"]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        raise ModuleNotFoundError(
            "save_pruned/load_pruned need transformers: pip install 'wanda-lightning[demo]'; for other modules use "
            "save_compressed / load_compressed"
        ) from None
    return transformers


def _hf_model(model: nn.Module) -> tuple[Any, str]:
    """The transformers model to export: ``model`` itself, or the one ``PreTrainedModel`` it holds (say, a
    LightningModule wrapping it), with its module name."""
    _transformers()
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}")
    try:
        found = find_pretrained(model)
    except TypeError as error:
        raise TypeError(f"`model` must hold exactly one transformers PreTrainedModel: {error}") from None
    if found is None:
        raise TypeError(
            f"`model` must be a transformers PreTrainedModel or hold exactly one; {type(model).__name__} holds none; "
            "for other modules use wanda_lightning.export.save_compressed(model.state_dict(), path)"
        )
    return found


def _normalise_masks(
    hf_model: nn.Module, state: Mapping[str, Tensor], masks: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Maps module names to their weight and transposes ``(out, in)`` masks of ``Conv1D`` layers to ``(in, out)``."""
    out: dict[str, Tensor] = {}
    for name, mask in masks.items():
        key = name if name in state else f"{name}.weight"
        if key not in state:
            raise ValueError(f"`masks` key {name!r} is neither a tensor nor a module with a weight in the model")
        module = hf_model.get_submodule(key.rpartition(".")[0])
        weight = state[key]
        if is_conv1d(module) and isinstance(mask, Tensor) and mask.dim() == 2 and mask.t().shape == weight.shape:
            mask = mask.t()  # prune() reports (out, in) masks; a Conv1D weight is (in, out)
        out[key] = mask
    return out


def _export_config(hf_model: Any, dtype: torch.dtype | None) -> Any:
    config = copy.deepcopy(hf_model.config)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        if "gguf" not in str(method).lower():
            raise ValueError(
                f"`model` is quantized with {method!s}; only full-precision (or GGUF-dequantized) models can be "
                "exported"
            )
        # A GGUF-loaded model holds plain dequantized tensors: the export is an ordinary full-precision model.
        delattr(config, "quantization_config")
    config.architectures = [type(hf_model).__name__]
    if dtype is not None:
        config.dtype = dtype
    return config


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    masks: Mapping[str, Tensor] | None = None,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
    progress: bool = False,
    state_dict: Mapping[str, Tensor] | None = None,
) -> ExportSummary:
    """Exports a pruned transformers model as a compact, Hugging Face-style directory.

    Every pruned 2-D weight is stored as its kept values plus a packed 1-bit mask, or N:M codes where they are smaller
    (0.67 bit per weight for 2:4); everything else as is. Tied weights are stored once. The directory holds
    ``config.json``, ``generation_config.json``, the tokenizer's files, ``sparse-model*.safetensors`` and
    ``sparse_manifest.json`` (format, version, per-tensor layout, structure, sparsity and SHA-256 checksums). It is
    written to a temporary directory and renamed into place. Works for GGUF-loaded models, whose ``save_pretrained``
    transformers refuses, without calling ``save_pretrained`` on the model. Read it back with :func:`load_pruned`.

    A model with PEFT adapters (LoRA, DoRA) is exported merged: a copy is merged with
    :func:`~wanda_lightning.merge_adapters`, which keeps the base weights' zeros at zero (peft's own
    ``merge_and_unload`` would fill them with the adapters' dense update). The copy costs the model's memory once more
    while the export is written.

    Args:
        model: A transformers ``PreTrainedModel``, or a module (such as a LightningModule or a ``PeftModel``) holding
            exactly one.
        path: The directory to create.
        tokenizer: Saved alongside with ``tokenizer.save_pretrained`` when given.
        dtype: Store floating-point parameters and buffers in this dtype (``torch.bfloat16`` halves an fp32 export);
            non-persistent buffers (rotary frequencies) keep theirs. ``None`` keeps the model's dtypes.
        overwrite: Replace ``path`` if it exists and is not empty.
        max_shard_size: Bytes per safetensors file (``int`` or ``"5GB"``); larger exports are sharded with an index
            file, as ``save_pretrained`` does.
        masks: The true keep masks by module or weight name, shaped ``(out_features, in_features)`` as
            ``prune(on_layer_pruned=...)`` reports them (also for ``Conv1D``), so that a kept weight equal to 0.0 is
            recorded as kept. ``None`` derives masks from the non-zero weights
            (bit-exact all the same).
        min_sparsity: Smallest fraction of zeros for which a 2-D weight is compressed (default 0.25).
        progress: Show a progress bar over tensors.
        state_dict: The transformers model's full state dict, when ``model`` itself holds shards of it (FSDP2:
            ``torch.distributed.checkpoint.state_dict.get_model_state_dict(hf_model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))``); keys as in ``hf_model.state_dict()``. ``None`` reads
            ``model``.

    Returns:
        An :class:`~wanda_lightning.export.ExportSummary` with the on-disk and dense sizes. When no weight is sparse
        enough the export is still written (all dense) and a ``UserWarning`` says so.

    Raises:
        TypeError: If ``model`` holds no (or several) transformers models, or ``tokenizer`` cannot be saved.
        ValueError: If ``path`` exists and is not empty without ``overwrite``, cannot be created, or the model is
            quantized (other than GGUF-dequantized). Nothing is written then.

    Example::

        prune(model, batches, structure="2:4")
        summary = save_pruned(model, "smollm2-2of4/", tokenizer, dtype=torch.bfloat16)
        print(summary)  # pruned weights: ... (0.542x)
        model = load_pruned("smollm2-2of4/")
    """
    transformers = _transformers()
    hf_model, prefix = _hf_model(model)
    if has_adapters(hf_model):
        if state_dict is not None:
            raise ValueError("`state_dict` cannot be combined with PEFT adapters: merge them first (merge_adapters)")
        # A copy, so that the caller keeps its adapters; pruned entries stay zero through the merge.
        hf_model = merge_adapters(copy.deepcopy(hf_model))
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"`tokenizer` must have save_pretrained(), got {type(tokenizer).__name__}")
    config = _export_config(hf_model, dtype)
    state: dict[str, Tensor] = dict(state_dict) if state_dict is not None else dict(hf_model.state_dict())
    non_persistent = [name for name, _ in hf_model.named_buffers() if name not in state]
    buffers = dict(hf_model.named_buffers())
    for name in non_persistent:
        state[name] = buffers[name]
    normalised = _normalise_masks(hf_model, state, masks or {})
    cast = set()
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating-point torch.dtype or None, got {dtype!r}")
        for name in state:
            if name not in non_persistent and state[name].is_floating_point():
                cast.add(name)
    generation_config = getattr(hf_model, "generation_config", None)
    can_generate = callable(getattr(hf_model, "can_generate", None)) and hf_model.can_generate()

    def write_extra(folder: Path) -> None:
        config.save_pretrained(folder)
        if generation_config is not None and can_generate:
            generation_config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    if cast:
        # Cast parameters and persistent buffers, not rotary tables: as from_pretrained(dtype=...) would build it.
        state = {name: t.to(dtype) if name in cast else t for name, t in state.items()}
        state = _retie(hf_model, state)
    summary = save_compressed(
        state,
        path,
        masks=normalised,
        min_sparsity=min_sparsity,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        metadata={
            "transformers": {
                "class": type(hf_model).__name__,
                "version": transformers.__version__,
                "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
                "non_persistent_buffers": non_persistent,
            },
            "source_module": prefix or None,
        },
        write_extra=write_extra,
        progress=progress,
    )
    if summary.num_compressed == 0:
        warnings.warn(
            f"no pruned weight found (no 2-D weight with at least {min_sparsity:.0%} zeros): {summary.path} stores "
            "every tensor dense",
            UserWarning,
            stacklevel=2,
        )
    return summary


def _retie(hf_model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """After a dtype cast, makes names that shared storage in the model share one cast tensor again."""
    first: dict[tuple[int, int, tuple[int, ...]], str] = {}
    original = hf_model.state_dict(keep_vars=True)
    for name, tensor in original.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in first:
            state[name] = state[first[key]]
        else:
            first[key] = name
    return state


def _set_tensor(model: nn.Module, name: str, value: Tensor | nn.Parameter) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(value, nn.Parameter) or attribute in module._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=value.is_floating_point())
        module._parameters[attribute] = value
    elif attribute in module._buffers:
        module._buffers[attribute] = value
    else:
        raise CorruptExportError(f"tensor {name!r}: the model built from config.json has no such parameter or buffer")


def load_pruned(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """Loads an export written by :func:`save_pruned` as a transformers model, bit for bit as it was saved.

    The model class comes from the manifest, its config from ``config.json``; weights are not randomly initialised
    first. Everything is verified on the way (checksums, shapes, mask popcounts, aliases): a truncated or edited file
    raises :class:`~wanda_lightning.export.CorruptExportError` naming the tensor, never a silently wrong model.

    Args:
        path: The export directory.
        device: Where the model goes.
        dtype: Cast the model to this dtype after loading; ``None`` keeps the stored dtypes (bit-exact).

    Returns:
        The model, in eval mode, with tied weights tied again.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If it is not an export of a transformers model, or fails verification.

    Example::

        model = load_pruned("smollm2-2of4/")
        tokenizer = AutoTokenizer.from_pretrained("smollm2-2of4/")
    """
    transformers = _transformers()
    from transformers.initialization import no_init_weights

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"`dtype` must be a floating-point torch.dtype or None, got {dtype!r}")
    state, manifest = load_compressed(path)
    info = manifest.get("metadata", {}).get("transformers")
    if not isinstance(info, dict) or not isinstance(info.get("class"), str):
        raise ValueError(
            f"{str(path)!r} is an export of a plain state dict (save_compressed / compress_checkpoint), not of a "
            "transformers model: read it with wanda_lightning.export.load_compressed"
        )
    model_class = getattr(transformers, info["class"], None)
    if model_class is None:
        raise ValueError(
            f"the export's model class {info['class']!r} is not in transformers {transformers.__version__}; "
            f"it was written with transformers {info.get('version')}"
        )
    try:
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError("no config.json")
        config = model_class.config_class.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CorruptExportError(f"config.json of the export {str(path)!r} is missing or invalid: {error}") from None
    with no_init_weights():
        model = model_class(config)
    non_persistent = set(info.get("non_persistent_buffers") or [])
    persistent = {name: t for name, t in state.items() if name not in non_persistent}
    try:
        result = model.load_state_dict(persistent, strict=False, assign=True)
    except RuntimeError as error:  # size mismatches: config.json and the tensors disagree
        raise CorruptExportError(
            f"the export's tensors do not fit {info['class']} built from config.json: {str(error).splitlines()[1:3]}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise CorruptExportError(
            f"the export does not fit {info['class']} built from config.json: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    for name in non_persistent:
        _set_tensor(model, name, state[name])
    # Tied weights: make every alias the very same Parameter (or buffer) object as its target.
    for name, entry in manifest["tensors"].items():
        if entry.get("layout") == "alias":
            target = entry["target"]
            try:
                value: Tensor = model.get_parameter(target)
            except AttributeError:
                value = model.get_buffer(target)
            _set_tensor(model, name, value)
    generation_file = Path(path) / "generation_config.json"
    if generation_file.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    model.eval()
    return model
