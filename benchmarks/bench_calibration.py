"""Benchmark: how much calibration data the shrink updates (and the masks' refinements) want, one-shot, on the
recovery benchmark's teacher.

The model is ``bench_recovery.py``'s teacher (dense SmolLM2-135M fine-tuned 40 steps on pydoc, taken from its cache or
made the same way), shrunk by ``shrink(mlp=0.5, method="flap", update=...)`` with the first N windows of 256 tokens
of pydoc's training part as calibration, for each N of ``--windows`` and each update of ``--updates``. With
``--masks 50% 2:4`` it is pruned instead by ``prune(method="admm", structure=..., refine=...)``: ``none`` (ADMM
alone) or ``reconstruct`` (then each block's kept weights trained to the dense block's outputs, the pruned ones held
at zero); ``least-squares`` is a shrink update only. Held-out perplexity on the same 32 windows as
``bench_recovery.py``, as a ratio to the teacher's; seconds of each call. ``--reconstruction-steps`` and
``--reconstruction-lr`` set the ``Reconstruction`` of ``reconstruct``.

    python benchmarks/bench_calibration.py [--windows 16 64] [--updates least-squares reconstruct] \
        [--masks 50% 2:4] [--reconstruction-steps 64] [--reconstruction-lr 2e-3] \
        [--json benchmarks/results/calibration.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time
from typing import Any

import torch
from _common import machine, print_table, write_json
from bench_recovery import pydoc_windows, teacher_state
from torch.utils.data import DataLoader

from wanda_lightning import CalibrationOptions, Reconstruction, prune, shrink
from wanda_lightning.cli.demo import WindowDataset
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compress(
    model: torch.nn.Module,
    calibration: DataLoader,
    what: str,
    update: str,
    mlp: float,
    reconstruction: Reconstruction,
) -> None:
    """One-shot, in place: ADMM masks (``what`` "50%" or "2:4", ``update`` the ``refine``) or ``shrink(mlp=...)``;
    ``"reconstruct"`` trains each block with ``reconstruction``."""
    options = CalibrationOptions(num_samples=None)
    chosen: str | Reconstruction = reconstruction if update == "reconstruct" else update
    if what in ("50%", "2:4"):
        structure = "2:4" if what == "2:4" else "unstructured"
        prune(
            model,
            calibration,
            sparsity=0.5,
            structure=structure,
            method="admm",
            refine=chosen,
            calibration_options=options,
        )
    else:
        shrink(
            model,
            calibration,
            mlp=mlp,
            method="flap",
            update=None if update == "none" else chosen,
            calibration_options=options,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 64], help="calibration windows (16 64)")
    parser.add_argument(
        "--updates",
        nargs="+",
        default=["least-squares", "reconstruct"],
        choices=["none", "least-squares", "reconstruct"],
        help="shrink updates to compare (least-squares reconstruct)",
    )
    parser.add_argument("--mlp", type=float, default=0.5, help="fraction of MLP units removed (default 0.5)")
    parser.add_argument(
        "--masks",
        nargs="+",
        default=None,
        choices=["50%", "2:4"],
        help="prune ADMM masks of these structures instead of shrinking (updates: none, reconstruct)",
    )
    parser.add_argument(
        "--reconstruction-steps",
        type=int,
        default=Reconstruction().steps,
        help=f"block reconstruction's steps per block (default {Reconstruction().steps})",
    )
    parser.add_argument(
        "--reconstruction-lr",
        type=float,
        default=Reconstruction().learning_rate,
        help=f"block reconstruction's peak learning rate (default {Reconstruction().learning_rate:g})",
    )
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--cache", default="/tmp/wanda-recovery", help="where bench_recovery.py caches the teacher")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        reconstruction = Reconstruction(steps=args.reconstruction_steps, learning_rate=args.reconstruction_lr)
    except ValueError as error:
        parser.error(f"--reconstruction-steps/--reconstruction-lr: {error}")
    if args.masks and "least-squares" in args.updates:
        parser.error("--masks refines with `none` or `reconstruct`; least-squares is a shrink update")

    model, tokenizer = load_smollm2()
    windows, heldout = pydoc_windows(tokenizer, args)
    model.load_state_dict(teacher_state(args, model, windows[16:]))
    teacher = perplexity(model, heldout)
    rows: list[dict[str, Any]] = []
    payload = {"benchmark": "calibration", "args": vars(args), "machine": machine(), "teacher_perplexity": teacher}
    payload["rows"] = rows
    for what, count, update in itertools.product(args.masks or [f"mlp={args.mlp:g}"], args.windows, args.updates):
        small = copy.deepcopy(model)
        start = time.perf_counter()
        compress(
            small, DataLoader(WindowDataset(windows[:count]), batch_size=4), what, update, args.mlp, reconstruction
        )
        seconds = time.perf_counter() - start
        ppl = perplexity(small, heldout)
        row = {"what": what, "windows": count, "update": update, "perplexity": ppl, "seconds": seconds}
        if update == "reconstruct":
            row["reconstruction"] = reconstruction.describe()
        rows.append(row)
        print(
            f"{what}, {count} windows, {update}: {ppl:.2f} ({ppl / teacher:.2f}x the teacher), {seconds:.0f} s",
            flush=True,
        )
        write_json(args.json, payload)
        del small
    print(f"\nteacher: {teacher:.2f}")
    print_table(
        ("model", "windows", "update", "perplexity", "x teacher", "seconds"),
        [
            (
                r["what"],
                str(r["windows"]),
                r["update"],
                f"{r['perplexity']:.2f}",
                f"{r['perplexity'] / teacher:.2f}x",
                f"{r['seconds']:.0f}",
            )
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
