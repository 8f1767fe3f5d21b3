"""Pruning models larger than memory: parameters on the meta device are read from a safetensors checkpoint one block
at a time, and pruned blocks can be written out and released as soon as they are done.

Example::

    from accelerate import init_empty_weights
    with init_empty_weights():  # parameters on "meta", buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("path/to/model"))
    saver = BlockSaver("pruned/", model)
    prune(model, batches, checkpoint="path/to/model", on_block_pruned=saver)
    saver.finish()  # pruned/ loads with AutoModelForCausalLM.from_pretrained("pruned/")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["BlockSaver", "SafetensorsCheckpoint", "meta_tensor_names"]


def meta_tensor_names(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are on the meta device (tied ones listed once each).

    Example::

        >>> with torch.device("meta"):
        ...     net = nn.Linear(2, 2)
        >>> meta_tensor_names(net)
        ['weight', 'bias']
    """
    return [name for name, _ in _meta_tensors(module, None)]


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _meta_tensors(module: nn.Module, exclude: str | None) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` of the meta tensors of ``module`` (tied ones under each name) not under ``exclude``."""
    return [(n, t) for n, t in _named_tensors(module) if t.is_meta and not (exclude and n.startswith(exclude))]


class SafetensorsCheckpoint:
    """Reads tensors by name from a ``.safetensors`` file or a directory of them (a Hugging Face model folder, with or
    without ``model.safetensors.index.json``), opening each file lazily and reading only the tensors asked for.

    Args:
        path: A ``.safetensors`` file, or a directory holding some.

    Raises:
        FileNotFoundError: If ``path`` holds no safetensors file.

    Example::

        checkpoint = SafetensorsCheckpoint("path/to/model")
        checkpoint.materialize(model.model.layers[3], prefix="model.layers.3.", device="cuda")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = Path(path)
        if root.is_file() and root.suffix == ".safetensors":
            files = [root]
        elif root.is_dir():
            files = sorted(root.glob("*.safetensors"))
        else:
            files = []
        if not files:
            raise FileNotFoundError(
                f"`checkpoint`={str(path)!r} is neither a .safetensors file nor a directory holding some"
            )
        self.path = root
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    self._where.setdefault(key, file)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def missing(self, module: nn.Module, prefix: str = "", exclude: str | None = None) -> list[str]:
        """Meta tensors of ``module`` that the checkpoint does not hold (tied copies of a held tensor are fine)."""
        wanted = _meta_tensors(module, exclude)
        held = {id(t) for n, t in wanted if f"{prefix}{n}" in self._where}
        return [f"{prefix}{n}" for n, t in wanted if f"{prefix}{n}" not in self._where and id(t) not in held]

    def materialize(
        self,
        module: nn.Module,
        prefix: str = "",
        device: str | torch.device | None = None,
        exclude: str | None = None,
    ) -> int:
        """Replaces every meta parameter and buffer of ``module`` by the checkpoint's tensor ``prefix + name``.

        Tensors keep the meta tensor's dtype and ``requires_grad``; tied parameters stay tied.

        Args:
            module: A module (a block) with tensors on the meta device.
            prefix: Checkpoint name prefix of ``module`` (``"model.layers.3."``).
            device: Where the tensors go (default CPU).
            exclude: Leave tensors whose name (within ``module``) starts with this on the meta device.

        Returns:
            Bytes read.

        Raises:
            KeyError: Naming the tensors the checkpoint lacks (nothing is changed then).
        """
        missing = self.missing(module, prefix, exclude)
        if missing:
            raise KeyError(
                f"checkpoint {str(self.path)!r} has no tensor {missing[:5]}{' ...' if len(missing) > 5 else ''} for "
                "parameters or buffers on the meta device; build the model with accelerate's init_empty_weights() "
                "(which keeps buffers such as rotary tables real) and point `checkpoint` at its weights"
            )
        target = torch.device(device) if device is not None else torch.device("cpu")
        wanted = _meta_tensors(module, exclude)
        # Read each tensor once (tied copies share it), opening each file once.
        keys: dict[int, str] = {}
        for name, tensor in wanted:
            if f"{prefix}{name}" in self._where:
                keys.setdefault(id(tensor), f"{prefix}{name}")
        by_file: dict[Path, list[str]] = {}
        for key in keys.values():
            by_file.setdefault(self._where[key], []).append(key)
        values: dict[str, Tensor] = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                values.update({key: handle.get_tensor(key) for key in names})
        loaded: dict[int, Tensor] = {}
        read = 0
        for name, tensor in wanted:
            new = loaded.get(id(tensor))
            if new is None:
                value = values[keys[id(tensor)]].to(device=target, dtype=tensor.dtype)
                read += value.numel() * value.element_size()
                is_parameter = isinstance(tensor, nn.Parameter)
                new = nn.Parameter(value, requires_grad=tensor.requires_grad) if is_parameter else value
                loaded[id(tensor)] = new
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if leaf in owner._parameters:
                owner._parameters[leaf] = new  # type: ignore[assignment]
            else:
                owner._buffers[leaf] = new
        return read


class BlockSaver:
    """``on_block_pruned`` for :func:`~wanda_lightning.prune`: writes each pruned block to its own safetensors file
    and moves it to the meta device, so memory holds one block at a time; :meth:`finish` writes the rest of the model,
    the index (``model.safetensors.index.json``) and, for transformers models, ``config.json``, giving a folder that
    ``from_pretrained`` loads.

    Args:
        directory: Output folder (created; existing files of the same names are replaced).
        model: The model being pruned (for names and, at :meth:`finish`, the tensors outside the blocks).
        release: Move each saved block to the meta device (default ``True``).

    Example::

        saver = BlockSaver("pruned/", model)
        prune(model, batches, checkpoint="path/to/model", on_block_pruned=saver)
        saver.finish()
    """

    def __init__(self, directory: str | os.PathLike[str], model: nn.Module, release: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.release = release
        self.weight_map: dict[str, str] = {}

    def __call__(self, name: str, block: nn.Module) -> None:
        prefix = f"{name}." if name else ""
        file = f"model-{name.replace('.', '-') or 'root'}.safetensors"
        tensors = {f"{prefix}{key}": value.detach().to("cpu").contiguous() for key, value in block.state_dict().items()}
        save_file(tensors, str(self.directory / file), metadata={"format": "pt"})
        self.weight_map.update({key: file for key in tensors})
        if self.release:
            block.to("meta")

    def finish(self) -> Path:
        """Writes the tensors outside the saved blocks, the index and the config; returns the folder."""
        rest = {
            key: value.detach().to("cpu").contiguous()
            for key, value in self.model.state_dict().items()
            if key not in self.weight_map and not value.is_meta
        }
        tied = _tied_names(self.model)
        rest = {key: value for key, value in rest.items() if key not in tied}
        if rest:
            save_file(rest, str(self.directory / "model-rest.safetensors"), metadata={"format": "pt"})
            self.weight_map.update({key: "model-rest.safetensors" for key in rest})
        total = sum(os.path.getsize(self.directory / file) for file in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config: Any = getattr(self.model, "config", None)
        if callable(getattr(config, "save_pretrained", None)):
            config.save_pretrained(self.directory)
        return self.directory


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (``lm_head.weight`` tied to the embeddings)."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied
