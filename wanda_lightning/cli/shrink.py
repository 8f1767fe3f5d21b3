"""remove whole blocks, MLP hidden units and attention heads; write a smaller, faster plain transformers model

Shrink MODEL from calibration text: remove the decoder blocks that change their input least (--layers), and the
lowest-scoring MLP hidden units and attention heads (key/value groups under grouped-query attention) of every layer,
rewrite the config, and write a folder that stock from_pretrained loads. Recover the quality by fine-tuning, ideally
with WandaShrinkCallback (distillation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

from ..core.options import CalibrationOptions
from ..core.validation import as_device
from ..gguf.quantization import GGUF_TYPES
from ..width.config import RECONSTRUCT
from ..width.methods import WIDTH_METHODS
from ..width.speed_target import SPEED_ON, SPEED_RUNTIMES, SpeedTarget
from ..width.updates import UPDATES
from .arguments import (
    add_calibration_arguments,
    add_data_arguments,
    add_depth_arguments,
    add_model_arguments,
    check_positive_arguments,
)
from .gguf import add_gguf_arguments, check_gguf_arguments, gguf_tokenizer, write_gguf
from .loading import calibration_windows, load_model

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning shrink``."""
    add_model_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (a transformers model folder)")
    parser.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP hidden units removed (default 0)")
    parser.add_argument(
        "--heads", type=float, default=0.0, help="fraction of attention heads / key-value groups removed (default 0)"
    )
    add_depth_arguments(parser, layers=0.0, layer_score="influence")
    parser.add_argument(
        "--speedup",
        type=float,
        default=None,
        help="instead of --layers/--mlp/--heads: the speed-up over dense to reach on --device (e.g. 1.5); candidate "
        "shapes are timed here and the most accurate one that reaches it is written",
    )
    parser.add_argument(
        "--speed-on", default="decode", choices=list(SPEED_ON), help="what --speedup measures (default decode)"
    )
    parser.add_argument(
        "--speed-runtime",
        default="torch",
        choices=list(SPEED_RUNTIMES),
        help="where --speedup times the candidates: torch (PyTorch eager on --device; default) or llama.cpp (each "
        "shape written as a GGUF of --speed-gguf-type and timed there on the CPU; needs llama-cpp-python)",
    )
    parser.add_argument(
        "--speed-gguf-type",
        default=None,
        choices=list(GGUF_TYPES),
        help="with --speed-runtime llama.cpp: the GGUF type the candidates are timed in (default q8_0)",
    )
    parser.add_argument(
        "--speed-threads",
        type=int,
        default=None,
        metavar="N",
        help="with --speed-runtime llama.cpp: its threads (default one per core; on a machine busier than its cores, "
        "1 times far more steadily)",
    )
    parser.add_argument("--plot", metavar="PNG", default=None, help="with --speedup: write the candidates' plot here")
    parser.add_argument(
        "--multiple-of",
        type=int,
        default=None,
        metavar="N",
        help="round each kept width (MLP hidden units; heads x head_dim) to a multiple of N, so GGUF q8_0/q4_0 "
        "blocks (32) hold its rows; default: 32 where the dense width is a multiple of 32, else as asked; 1: as asked",
    )
    parser.add_argument(
        "--method",
        default="wanda-sp",
        choices=list(WIDTH_METHODS),
        help="unit scores: wanda-sp (default), flap (with bias compensation) or magnitude-sp (no data)",
    )
    parser.add_argument(
        "--update",
        default=None,
        choices=[*UPDATES, RECONSTRUCT],
        help="what happens to the kept weights: none, bias (FLAP's compensation), least-squares (refit to the dense "
        "outputs) or reconstruct (least-squares, then each block trained to the dense block's outputs); default: the "
        "method's (bias for flap, none otherwise)",
    )
    add_calibration_arguments(parser, samples=128, seqlen=512, batch_size=8)
    add_data_arguments(parser)
    add_gguf_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _speed_target(args: argparse.Namespace) -> float | SpeedTarget | None:
    """``--speedup`` with where it is timed (a plain number in PyTorch eager, as before)."""
    llama_cpp = {"--speed-gguf-type": args.speed_gguf_type, "--speed-threads": args.speed_threads}
    if args.speed_runtime == "torch" and all(value is None for value in llama_cpp.values()):
        return cast("float | None", args.speedup)
    if args.speedup is None:
        raise ValueError("--speed-runtime, --speed-gguf-type and --speed-threads say how --speedup is timed; give it")
    if args.speed_runtime == "torch":
        flag, value = next((flag, value) for flag, value in llama_cpp.items() if value is not None)
        raise ValueError(f"{flag} {value} needs --speed-runtime llama.cpp")
    return SpeedTarget(
        args.speedup, args.speed_on, runtime=args.speed_runtime, dtype=args.speed_gguf_type, threads=args.speed_threads
    )


def run(args: argparse.Namespace) -> int:
    """Shrinks MODEL and writes the folder; returns the exit status.

    Example::

        main(["shrink", "model.gguf", "--out", "small/", "--mlp", "0.5", "--heads", "0.33"])
    """
    from ..core.layers import find_pretrained
    from ..export.paths import check_destination, install
    from ..width import ShrinkConfig, shrink_with
    from ..width.saving import save_plain_pretrained

    check_positive_arguments(args, "samples", "seqlen", "batch_size")
    as_device(args.device, "--device", must_exist=True)
    config = ShrinkConfig.create(
        mlp=args.mlp,
        heads=args.heads,
        method=args.method,
        update=args.update,
        options=CalibrationOptions(num_samples=None),
        layers=args.layers,
        layer_score=args.layer_score,
        speedup=_speed_target(args),
        speed_on=args.speed_on,
        multiple_of=args.multiple_of,
    )
    if args.plot is not None and config.speed_target is None:
        raise ValueError("--plot draws the --speedup candidates; give --speedup too")
    check_destination(args.out, args.overwrite, create_parent=False)  # fail before the slow part
    loaded = load_model(args.model, module=args.module, tokenizer=args.tokenizer, dtype=args.dtype)
    found = find_pretrained(loaded.model)
    if found is None or found[1] != "":
        raise ValueError(f"MODEL {args.model!r} is not a transformers model: `shrink` writes transformers folders")
    model = found[0]
    gguf_source = gguf_tokenizer(args.model, args.tokenizer, loaded)
    if args.gguf is not None:  # fail before the slow part
        check_gguf_arguments(args.gguf, args.overwrite, loaded, gguf_source, "--gguf")
    batches: list[Any] = []
    if config.layers or config.speed_target is not None or config.method.needs_data:
        windows = calibration_windows(loaded, args.data, args.split, args.samples, args.seqlen)
        batches = [{"input_ids": w} for w in windows.split(args.batch_size)]
    if args.device is not None:
        model.to(args.device)
    report = shrink_with(model, batches, config, progress=not args.json)
    target = check_destination(args.out, args.overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:  # written aside and renamed into place: a failure leaves nothing half-written under --out
        save_plain_pretrained(model.to("cpu"), staging, loaded.tokenizer)
        install(staging, target, args.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    gguf_summary = None
    if args.gguf is not None:  # after the folder: a GGUF error leaves the shrunk model saved
        gguf_summary = write_gguf(model, args.gguf, args.gguf_type, gguf_source, args.overwrite)
    if args.plot is not None:
        report.plot(args.plot)
    if args.json:
        result = {"model": args.model, "out": str(target), "report": report.to_dict()}
        if gguf_summary is not None:
            result["gguf"] = gguf_summary.to_dict()
        print(json.dumps(result, indent=2))
    else:
        print(report)
        if report.candidates:
            print(f"\n{report.candidates_table()}")
        print(f"\nwrote {target} (AutoModelForCausalLM.from_pretrained loads it)")
        if gguf_summary is not None:
            print(gguf_summary)
    return 0
