"""Reading what the command line is pointed at: models (transformers directory, GGUF file, export directory,
Lightning checkpoint with ``--module``), text (``pydoc``, a text file, a saved ``datasets`` dataset) and windows of
its tokens."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.layers import find_pretrained

__all__ = [
    "LoadedModel",
    "calibration_windows",
    "import_class",
    "load_model",
    "load_text",
    "quiet_transformers",
    "text_windows",
    "tokenize",
]

_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
MODEL_HELP = (
    "a transformers model directory, a PEFT adapter directory (adapter_config.json, with its base model on disk), a "
    ".gguf file, a wanda-lightning export directory, or a Lightning .ckpt (with --module package.Class)"
)


@dataclass
class LoadedModel:
    """A model read by :func:`load_model`.

    Attributes:
        model: The module (eval mode).
        tokenizer: Its tokenizer, or ``None`` when none was found.
        kind: ``"transformers"``, ``"peft"``, ``"gguf"``, ``"export"`` or ``"checkpoint"``.
        module_class: ``"package.Class"`` for checkpoints and state-dict exports, else ``None``.
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    module_class: str | None = None

    @property
    def takes_keywords(self) -> bool:
        """Whether the model is called as ``model(input_ids=...)`` (transformers) rather than ``model(ids)``."""
        found = find_pretrained(self.model)
        return self.kind == "peft" or (found is not None and found[1] == "")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' logging and progress bars for the ``with`` block."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def import_class(spec: str) -> type[nn.Module]:
    """Imports ``package.module.Class`` or ``package.module:Class``.

    Raises:
        ModuleNotFoundError: If the module cannot be imported (the message names ``--module``).
        ValueError: If the spec is malformed or the module has no such attribute.
        TypeError: If the attribute is not an ``nn.Module`` subclass.

    Example::

        >>> import_class("torch.nn.Linear")
        <class 'torch.nn.modules.linear.Linear'>
    """
    module_name, _, class_name = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not class_name:
        raise ValueError(f"--module must look like package.module.Class or package.module:Class, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"--module {spec!r}: cannot import {module_name!r} ({error}); install it or add its folder to PYTHONPATH"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"--module {spec!r}: module {module_name!r} has no attribute {class_name!r}")
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"--module {spec!r} must name an nn.Module (or LightningModule) subclass, got {cls!r}")
    return cls


def _load_tokenizer(spec: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--tokenizer {str(path)!r} does not exist")
    with quiet_transformers():
        if path.is_file():
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)


def _try_tokenizer(folder: Path) -> Any:
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return _load_tokenizer(folder)


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def _load_checkpoint_module(path: Path, spec: str) -> nn.Module:
    from lightning.pytorch import LightningModule

    cls = import_class(spec)
    if issubclass(cls, LightningModule):
        try:
            return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle, key and shape errors all mean "not this class's checkpoint"
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ValueError(
                f"MODEL {str(path)!r} cannot be loaded as {spec} with weights_only=True: "
                f"{type(error).__name__}: {first}"
            ) from None
    from ..export.checkpoints import read_checkpoint

    state_dict, _ = read_checkpoint(path)
    module = cls()
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"MODEL {str(path)!r} does not fit {spec}: {str(error).splitlines()[0]}") from None
    return module


def _load_adapters(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Path]:
    """A PEFT adapter directory on its base model (the local directory its ``adapter_config.json`` names); returns the
    ``PeftModel`` and the base model's directory."""
    import json

    try:
        from peft import PeftModel
    except ImportError:
        raise ModuleNotFoundError(f"MODEL {str(path)!r} is a PEFT adapter directory: pip install peft") from None
    from transformers import AutoModelForCausalLM

    try:
        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise ValueError(f"MODEL {str(path)!r}: adapter_config.json cannot be read: {error}") from None
    base = Path(str(base_name or "")).expanduser()
    if not base_name or not (base / "config.json").is_file():
        raise ValueError(
            f"MODEL {str(path)!r} is a PEFT adapter directory whose base model {base_name!r} is not a local "
            "transformers directory; set `base_model_name_or_path` in its adapter_config.json to one"
        )
    with quiet_transformers():
        try:
            base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
            model: nn.Module = PeftModel.from_pretrained(base_model, path)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"MODEL {str(path)!r}: the adapters cannot be loaded on {str(base)!r}: {error}") from None
    return model, base


def _load_export(path: Path, module: str | None, dtype: torch.dtype | None) -> tuple[nn.Module, str | None]:
    from ..export import load_compressed, load_pruned, read_manifest

    manifest = read_manifest(path)
    metadata = manifest.get("metadata") or {}
    if isinstance(metadata.get("transformers"), dict):
        if module is not None:
            raise ValueError(f"--module is only for checkpoints and state-dict exports; {str(path)!r} has config.json")
        with quiet_transformers():
            return load_pruned(path, dtype=dtype), None
    source = metadata.get("source") or {}
    spec = module or source.get("module")
    if not spec:
        raise ValueError(f"MODEL {str(path)!r} is a state-dict export: pass --module package.Class to rebuild it")
    cls = import_class(spec)
    hyper_parameters = source.get("hyper_parameters") or {}
    instance = cls(**hyper_parameters) if isinstance(hyper_parameters, dict) else cls()
    state_dict, _ = load_compressed(path)
    instance.load_state_dict(state_dict)
    return (instance if dtype is None else instance.to(dtype)), spec


def load_model(
    spec: str,
    *,
    module: str | None = None,
    tokenizer: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Reads MODEL for the command line, whatever its kind.

    Args:
        spec: A transformers directory (``config.json``), a PEFT adapter directory (``adapter_config.json``: the
            ``PeftModel`` on its local base model, whose base layers are pruned and whose adapters are merged into the
            export with the masks kept), an export directory (``sparse_manifest.json``), a ``.gguf`` file, or a
            Lightning checkpoint (``.ckpt``/``.pt``/``.pth``, needs ``module``).
        module: ``package.Class`` of the checkpoint's module.
        tokenizer: Tokenizer directory or ``.gguf`` file; default the model's own.
        dtype: Floating dtype of the model; ``None`` keeps the stored one (float32 for GGUF, which is dequantized).

    Returns:
        A :class:`LoadedModel` in eval mode on the CPU.

    Raises:
        FileNotFoundError: If ``spec`` does not exist.
        ValueError: If it is not what its name or the flags say.
        ModuleNotFoundError: If ``module`` cannot be imported.

    Example::

        loaded = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"MODEL {spec!r} does not exist; expected {MODEL_HELP}")
    from ..export import is_export

    own_tokenizer: Any = None
    module_class = None
    if path.is_dir():
        if is_export(path):
            model, module_class = _load_export(path, module, dtype)
            kind = "export"
        elif (path / "adapter_config.json").is_file():
            if module is not None:
                raise ValueError("--module is only for Lightning checkpoints; MODEL is a PEFT adapter directory")
            model, base = _load_adapters(path, dtype)
            kind = "peft"
            if tokenizer is None:  # the adapter directory's own, else the base model's
                own_tokenizer = _try_tokenizer(path)
                if own_tokenizer is None:
                    own_tokenizer = _try_tokenizer(base)
        elif (path / "config.json").is_file():
            if module is not None:
                raise ValueError("--module is only for Lightning checkpoints; MODEL is a transformers directory")
            from transformers import AutoModelForCausalLM

            with quiet_transformers():
                try:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
                except (OSError, ValueError, KeyError) as error:
                    raise ValueError(f"MODEL {spec!r} cannot be loaded as a causal LM: {error}") from None
            kind = "transformers"
        else:
            raise ValueError(f"MODEL {spec!r} is a directory without config.json or sparse_manifest.json")
        if kind != "peft" and tokenizer is None:
            own_tokenizer = _try_tokenizer(path)
    elif path.suffix.lower() == ".gguf" or _is_gguf(path):
        if not _is_gguf(path):
            raise ValueError(f"MODEL {spec!r} is named .gguf but is not a GGUF file (it does not start with b'GGUF')")
        if module is not None:
            raise ValueError("--module is only for Lightning checkpoints; MODEL is a GGUF file")
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=dtype or torch.float32
                )
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise ValueError(f"MODEL {spec!r}: transformers cannot load this GGUF file: {error}") from None
        own_tokenizer = _load_tokenizer(path) if tokenizer is None else None
        kind = "gguf"
    elif path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        if module is None:
            raise ValueError(
                f"MODEL {spec!r} is a checkpoint: pass --module package.Class, the LightningModule that wrote it"
            )
        model = _load_checkpoint_module(path, module)
        if dtype is not None:
            model = model.to(dtype)
        module_class = module
        kind = "checkpoint"
    else:
        raise ValueError(f"MODEL {spec!r} is not {MODEL_HELP}")
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=_load_tokenizer(tokenizer) if tokenizer is not None else own_tokenizer,
        kind=kind,
        module_class=module_class,
    )


def load_text(data: str, split: str | None = None, *, prefer: tuple[str, ...] = ("train",)) -> str:
    """The text behind ``--data``: ``"pydoc"``, a UTF-8 text file, or a saved ``datasets`` dataset's ``text`` column.

    Args:
        data: ``"pydoc"`` or a path.
        split: Split of a saved ``DatasetDict``; default the first of ``prefer`` that exists, else the first split.
        prefer: Split names tried in order when ``split`` is ``None``.

    Raises:
        FileNotFoundError: If the path does not exist.
        ValueError: If the file is not UTF-8 text, the dataset has no ``text`` column, or ``split`` is unknown.

    Example::

        >>> len(load_text("pydoc")) > 100_000
        True
    """
    if data == "pydoc":
        from ..data.corpus import pydoc_text

        return pydoc_text()
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--data {data!r} does not exist; use 'pydoc', a text file, or a dataset saved with save_to_disk"
        )
    if path.is_dir():
        try:
            from datasets import DatasetDict, load_from_disk
        except ImportError:  # pragma: no cover
            raise ModuleNotFoundError("--data with a saved dataset needs `pip install datasets`") from None
        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"--data {data!r} is not a dataset saved with save_to_disk: {error}") from None
        if isinstance(dataset, DatasetDict):
            names = list(dataset)
            chosen = split or next((name for name in prefer if name in dataset), names[0] if names else None)
            if chosen not in dataset:
                raise ValueError(f"--split {chosen!r} is not in --data {data!r}; its splits are {names}")
            dataset = dataset[chosen]
        elif split is not None:
            raise ValueError(f"--split {split!r} given, but --data {data!r} is a single dataset without splits")
        if "text" not in dataset.column_names:
            raise ValueError(f"--data {data!r} needs a 'text' column; its columns are {dataset.column_names}")
        return "\n\n".join(str(t) for t in dataset["text"] if t)
    if split is not None:
        raise ValueError(f"--split is only for saved datasets; --data {data!r} is a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--data {data!r} is not UTF-8 text") from None


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """1-D token ids of ``text`` (no length warning).

    Raises:
        ValueError: If there is no tokenizer.
    """
    if tokenizer is None:
        raise ValueError("no tokenizer found for MODEL: pass --tokenizer (a tokenizer directory or .gguf file)")
    with quiet_transformers():
        return tokenizer(text, return_tensors="pt").input_ids[0]


def text_windows(ids: Tensor, seqlen: int, count: int | None, data: str) -> Tensor:
    """Up to ``count`` non-overlapping ``seqlen`` windows of ``ids`` (all with ``None``); ``data`` names the text in
    messages."""
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(
            f"--data {data!r} yields {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; use more "
            "text or a smaller --seqlen"
        )
    if count is not None and count > available:
        print(
            f"note: --data {data!r} holds {available} windows of {seqlen} tokens; using {available}, not {count}",
            file=sys.stderr,
        )
        count = available
    return ids[: (count or available) * seqlen].view(-1, seqlen)


def calibration_windows(loaded: LoadedModel, data: str, split: str | None, samples: int, seqlen: int) -> Tensor:
    """``(samples, seqlen)`` calibration windows: pydoc's first 70 %, or a text from its start."""
    if data == "pydoc":
        from ..data.corpus import split_tokens

        if loaded.tokenizer is None:
            tokenize(None, "")
        with quiet_transformers():
            try:
                return split_tokens(loaded.tokenizer, num_samples=samples, seqlen=seqlen).calibration
            except ValueError as error:
                raise ValueError(f"--data 'pydoc' with --samples {samples} --seqlen {seqlen}: {error}") from None
    ids = tokenize(loaded.tokenizer, load_text(data, split, prefer=("train",)))
    return text_windows(ids, seqlen, samples, data)
