"""``wanda-lightning prune MODEL --out DIR``: prune a checkpoint without writing code and write the compressed export.

Also home of the loaders the ``eval`` and ``inspect`` subcommands share: models (transformers directory, GGUF file,
export directory, Lightning checkpoint with ``--module``) and text (``pydoc``, a text file, a ``datasets`` dataset
saved with ``save_to_disk``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..refinement import REFINEMENTS

if TYPE_CHECKING:
    from ..export import ExportSummary

__all__ = [
    "DTYPES",
    "LoadedModel",
    "add_model_arguments",
    "check_device",
    "check_positive",
    "import_class",
    "load_model",
    "load_text",
    "register",
    "run",
    "tokenize",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
_MODEL_HELP = (
    "a transformers model directory, a .gguf file, a wanda-lightning export directory, or a Lightning .ckpt "
    "(with --module package.Class)"
)


@dataclass
class LoadedModel:
    """A model read by :func:`load_model`.

    Attributes:
        model: The module (eval mode).
        tokenizer: Its tokenizer, or ``None`` when none was found.
        kind: ``"transformers"``, ``"gguf"``, ``"export"`` or ``"checkpoint"``.
        module_class: ``"package.Class"`` for checkpoints and state-dict exports, else ``None``.
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    module_class: str | None = None

    @property
    def takes_keywords(self) -> bool:
        """Whether the model is called as ``model(input_ids=...)`` (transformers) rather than ``model(ids)``."""
        return _holds_transformers(self.model) == "self"


def _holds_transformers(model: nn.Module) -> str | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    if isinstance(model, PreTrainedModel):
        return "self"
    found = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    return "inner" if found else None


def parse_dtype(value: str) -> torch.dtype:
    """``--dtype`` values: float32/fp32, bfloat16/bf16, float16/fp16.

    Example::

        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    try:
        return DTYPES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"invalid dtype {value!r}; choose from {', '.join(sorted(set(DTYPES)))}"
        ) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that say how to read MODEL: ``--module``, ``--tokenizer``, ``--dtype``, ``--device``."""
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument(
        "--module",
        default=None,
        metavar="PACKAGE.CLASS",
        help="for a .ckpt: the LightningModule (or nn.Module) class, as package.module.Class or package.module:Class",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer directory or .gguf file (default: the model's own; needed for a .ckpt)",
    )
    parser.add_argument(
        "--dtype",
        type=parse_dtype,
        default=None,
        help="dtype to load the model in: float32, bfloat16 or float16 (default: as stored; float32 for GGUF)",
    )
    parser.add_argument("--device", default=None, help="compute device such as cpu or cuda:0 (default: cpu)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--split``."""
    parser.add_argument(
        "--data",
        default="pydoc",
        help="'pydoc' (built-in offline corpus, default), a UTF-8 text file, or a datasets dataset saved with "
        "save_to_disk that has a 'text' column",
    )
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict (default: see each command)")


@contextmanager
def _quiet_transformers() -> Any:
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
    with _quiet_transformers():
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
    from ..export.files import read_checkpoint

    state_dict, _ = read_checkpoint(path)
    module = cls()
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"MODEL {str(path)!r} does not fit {spec}: {str(error).splitlines()[0]}") from None
    return module


def _load_export(path: Path, module: str | None, dtype: torch.dtype | None) -> tuple[nn.Module, str | None]:
    from ..export import load_compressed, load_pruned, read_manifest

    manifest = read_manifest(path)
    metadata = manifest.get("metadata") or {}
    if isinstance(metadata.get("transformers"), dict):
        if module is not None:
            raise ValueError(f"--module is only for checkpoints and state-dict exports; {str(path)!r} has config.json")
        with _quiet_transformers():
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
        spec: A transformers directory (``config.json``), an export directory (``sparse_manifest.json``), a ``.gguf``
            file, or a Lightning checkpoint (``.ckpt``/``.pt``/``.pth``, needs ``module``).
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
        raise FileNotFoundError(f"MODEL {spec!r} does not exist; expected {_MODEL_HELP}")
    from ..export import is_export

    own_tokenizer: Any = None
    module_class = None
    if path.is_dir():
        if is_export(path):
            model, module_class = _load_export(path, module, dtype)
            kind = "export"
        elif (path / "config.json").is_file():
            if module is not None:
                raise ValueError("--module is only for Lightning checkpoints; MODEL is a transformers directory")
            from transformers import AutoModelForCausalLM

            with _quiet_transformers():
                try:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
                except (OSError, ValueError, KeyError) as error:
                    raise ValueError(f"MODEL {spec!r} cannot be loaded as a causal LM: {error}") from None
            kind = "transformers"
        else:
            raise ValueError(f"MODEL {spec!r} is a directory without config.json or sparse_manifest.json")
        own_tokenizer = _try_tokenizer(path) if tokenizer is None else None
    elif path.suffix.lower() == ".gguf" or _is_gguf(path):
        if not _is_gguf(path):
            raise ValueError(f"MODEL {spec!r} is named .gguf but is not a GGUF file (it does not start with b'GGUF')")
        if module is not None:
            raise ValueError("--module is only for Lightning checkpoints; MODEL is a GGUF file")
        from transformers import AutoModelForCausalLM

        with _quiet_transformers():
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
        raise ValueError(f"MODEL {spec!r} is not {_MODEL_HELP}")
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
        from ..corpus import pydoc_text

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
    with _quiet_transformers():
        return tokenizer(text, return_tensors="pt").input_ids[0]


def _windows(ids: Tensor, seqlen: int, count: int | None, data: str) -> Tensor:
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
        from ..corpus import split_tokens

        if loaded.tokenizer is None:
            tokenize(None, "")
        with _quiet_transformers():
            try:
                return split_tokens(loaded.tokenizer, num_samples=samples, seqlen=seqlen).calibration
            except ValueError as error:
                raise ValueError(f"--data 'pydoc' with --samples {samples} --seqlen {seqlen}: {error}") from None
    ids = tokenize(loaded.tokenizer, load_text(data, split, prefer=("train",)))
    return _windows(ids, seqlen, samples, data)


def check_device(device: str | None) -> None:
    """Raises ``ValueError`` naming ``--device`` unless it is a device this machine has.

    Example::

        >>> check_device("cpu")
    """
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be a torch device such as cpu or cuda:0, got {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine (torch {torch.__version__})")


def check_positive(value: int, flag: str) -> None:
    """Raises ``ValueError`` naming ``flag`` unless ``value`` is a positive integer."""
    if value < 1:
        raise ValueError(f"{flag} must be a positive integer, got {value}")


def register(subparsers: Any) -> None:
    """Adds the ``prune`` subcommand to ``subparsers`` (an ``argparse`` sub-parser action)."""
    parser = subparsers.add_parser(
        "prune",
        help="prune a model (transformers dir, GGUF, Lightning .ckpt) and write the compressed export",
        description="Prune MODEL with Wanda (or another method) on calibration text and write a compressed export "
        "(kept values + 1-bit masks or N:M codes in safetensors, with config, tokenizer and a checksummed manifest).",
    )
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="export directory to create")
    parser.add_argument("--sparsity", type=float, default=None, help="fraction zeroed per row (default 0.5)")
    parser.add_argument("--structure", default="unstructured", help="'unstructured' (default) or N:M such as 2:4")
    parser.add_argument(
        "--method",
        default="wanda",
        help="'wanda' (default), 'magnitude', 'sparsegpt', 'ria', 'ria-permuted' (N:M) or another registered one",
    )
    parser.add_argument(
        "--allocation", default="uniform", choices=["uniform", "owl"], help="layer-wise sparsity: uniform or OWL"
    )
    parser.add_argument(
        "--refine",
        default="none",
        choices=list(REFINEMENTS),
        help="mask refinement: none, or DSnoT with its default guard (dsnot = dsnot-expected), the exact-error guard "
        "(dsnot-exact, needs each layer's Gram matrix) or none (dsnot-unguarded)",
    )
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences (default 128)")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--ignore", nargs="*", default=None, metavar="PATTERN", help="layers to leave dense")
    add_data_arguments(parser)
    parser.add_argument(
        "--export-dtype",
        type=parse_dtype,
        default=None,
        help="store the export in this dtype (default: the model's; bfloat16 halves an fp32 export)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--json", action="store_true", help="print the report and export summary as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Prunes MODEL and writes the export; returns the exit status.

    Example::

        main(["prune", "model.gguf", "--out", "pruned/", "--structure", "2:4"])
    """
    from ..export.files import _check_destination, _parse_size
    from ..pruner import prune

    for flag, value in (("--samples", args.samples), ("--seqlen", args.seqlen), ("--batch-size", args.batch_size)):
        check_positive(value, flag)
    _parse_size(args.max_shard_size, "--max-shard-size")
    check_device(args.device)
    _check_destination(args.out, args.overwrite, create_parent=False)  # fail before the slow part
    if args.data != "pydoc" and not Path(args.data).expanduser().exists():
        load_text(args.data, args.split)  # raises FileNotFoundError
    loaded = load_model(args.model, module=args.module, tokenizer=args.tokenizer, dtype=args.dtype)
    windows = calibration_windows(loaded, args.data, args.split, args.samples, args.seqlen)
    batches: list[Any] = [{"input_ids": w} if loaded.takes_keywords else w for w in windows.split(args.batch_size)]
    report = prune(
        loaded.model,
        batches,
        sparsity=args.sparsity,
        structure=args.structure,
        method=args.method,
        allocation=args.allocation,
        refine=args.refine,
        ignore=args.ignore or None,
        num_samples=None,
        device=args.device,
        progress=not args.json,
    )
    if not args.json:
        print(report)
    try:
        summary = _write_export(args, loaded)
    except OSError as error:  # disk full, permissions: nothing was left under --out
        raise ValueError(f"--out {args.out!r}: the export could not be written: {error}") from None
    if args.json:
        print(
            json.dumps(
                {"model": args.model, "out": summary.path, "report": report.to_dict(), "export": summary.to_dict()},
                indent=2,
            )
        )
    else:
        print()
        print(summary)
    return 0


def _write_export(args: argparse.Namespace, loaded: LoadedModel) -> ExportSummary:
    from ..export import save_compressed, save_pruned

    if _holds_transformers(loaded.model) is not None:
        return save_pruned(
            loaded.model,
            args.out,
            loaded.tokenizer,
            dtype=args.export_dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            progress=not args.json,
        )
    hyper_parameters = getattr(loaded.model, "hparams", None)
    try:
        hyper_parameters = json.loads(json.dumps(dict(hyper_parameters or {})))
    except (TypeError, ValueError):
        hyper_parameters = None
    return save_compressed(
        loaded.model.state_dict(),
        args.out,
        dtype=args.export_dtype,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        metadata={
            "source": {
                "kind": "lightning-module",
                "module": loaded.module_class,
                "hyper_parameters": hyper_parameters,
            }
        },
        progress=not args.json,
    )
