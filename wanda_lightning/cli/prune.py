"""prune a model (transformers dir, GGUF, Lightning .ckpt) and write the compressed export

Prune MODEL with Wanda (or another method) on calibration text and write a compressed export (kept values + 1-bit masks
or N:M codes in safetensors, with config, tokenizer and a checksummed manifest).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.layers import find_pretrained
from ..core.validation import as_device
from .arguments import (
    add_calibration_arguments,
    add_data_arguments,
    add_model_arguments,
    add_pruning_arguments,
    check_positive_arguments,
    parse_dtype,
    pruning_choices,
)
from .gguf import add_gguf_arguments, check_gguf_arguments, gguf_tokenizer, write_gguf
from .loading import LoadedModel, calibration_windows, load_model, load_text

if TYPE_CHECKING:
    from ..export import ExportSummary

__all__ = ["REFINE_HELP", "add_arguments", "run"]

REFINE_HELP = (
    "mask refinement: none, or DSnoT with its default guard (dsnot = dsnot-expected), the exact-error guard "
    "(dsnot-exact, needs each layer's Gram matrix) or none (dsnot-unguarded), or admm-update (the method's mask with "
    "optimal kept weights, by ADMM on each layer's Gram matrix), or reconstruct (each pruned block's kept weights "
    "trained to the dense block's outputs, the pruned ones held at zero)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning prune``."""
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="export directory to create")
    add_pruning_arguments(parser, refine_help=REFINE_HELP)
    add_calibration_arguments(parser, samples=128, seqlen=512, batch_size=8)
    parser.add_argument("--ignore", nargs="*", default=None, metavar="PATTERN", help="layers to leave dense")
    add_data_arguments(parser)
    add_gguf_arguments(parser)
    parser.add_argument(
        "--export-dtype",
        type=parse_dtype,
        default=None,
        help="store the export in this dtype (default: the model's; bfloat16 halves an fp32 export)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--json", action="store_true", help="print the report and export summary as JSON")


def run(args: argparse.Namespace) -> int:
    """Prunes MODEL and writes the export; returns the exit status.

    Example::

        main(["prune", "model.gguf", "--out", "pruned/", "--structure", "2:4"])
    """
    from ..export.paths import check_destination, parse_size
    from ..pruning import prune

    check_positive_arguments(args, "samples", "seqlen", "batch_size")
    parse_size(args.max_shard_size, "--max-shard-size")
    as_device(args.device, "--device", must_exist=True)
    check_destination(args.out, args.overwrite, create_parent=False)  # fail before the slow part
    if args.data != "pydoc" and not Path(args.data).expanduser().exists():
        load_text(args.data, args.split)  # raises FileNotFoundError
    loaded = load_model(args.model, module=args.module, tokenizer=args.tokenizer, dtype=args.dtype)
    gguf_source = gguf_tokenizer(args.model, args.tokenizer, loaded)
    if args.gguf is not None:  # fail before the slow part
        check_gguf_arguments(args.gguf, args.overwrite, loaded, gguf_source, "--gguf")
    windows = calibration_windows(loaded, args.data, args.split, args.samples, args.seqlen)
    batches: list[Any] = [{"input_ids": w} if loaded.takes_keywords else w for w in windows.split(args.batch_size)]
    report = prune(
        loaded.model,
        batches,
        **pruning_choices(args),
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
    gguf_summary = None
    if args.gguf is not None:  # after the export: a GGUF error leaves the export written
        gguf_summary = write_gguf(loaded.model, args.gguf, args.gguf_type, gguf_source, args.overwrite)
    if args.json:
        result = {"model": args.model, "out": summary.path, "report": report.to_dict(), "export": summary.to_dict()}
        if gguf_summary is not None:
            result["gguf"] = gguf_summary.to_dict()
        print(json.dumps(result, indent=2))
    else:
        print()
        print(summary)
        if gguf_summary is not None:
            print(gguf_summary)
    return 0


def _write_export(args: argparse.Namespace, loaded: LoadedModel) -> ExportSummary:
    from ..export import save_compressed, save_pruned

    if find_pretrained(loaded.model) is not None:
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
