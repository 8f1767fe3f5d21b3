"""Benchmark: depth pruning (whole decoder blocks) against width pruning and against dropping the last blocks, on
SmolLM2-135M (30 blocks), fully offline, before any recovery.

Text: CPython's pydoc topics, tokenised once and cut at 70 %: calibration windows (16 x 256) from the first part,
held-out perplexity from non-overlapping 256-token windows of the rest (as in ``bench_width.py``). Rows:

- ``dense``;
- ``layers=F (influence)`` / ``layers=F (angular)``: ``shrink(layers=F)``, blocks ranked by block influence, or the
  closest run of consecutive blocks by angular distance;
- ``drop last K``: the last K blocks removed without looking at data (the naive baseline the scores must beat);
- width rows (``--width``): ``shrink(mlp=..., method="flap", update="least-squares")`` for a width-only model to compare
  at a similar speed;
- mixes (``--mix``): depth and width in one call;
- speed targets (``--speedup``): ``shrink(speedup=S)`` chooses the shape (its candidates timed on this machine, the
  ones that reach S scored by their calibration loss), with flap + least-squares; ``--plot`` draws its candidates.

Decode tokens/s (batch 1, KV cache, 128 new tokens) and prefill tokens/s (4 x 256) are measured taking turns, run after
run, so that a disturbance on this shared machine hits every model alike; the best run of each is kept.

    python benchmarks/bench_depth.py [--layers 0.2] [--width 0.5] [--mix 0.1:0.3] [--speedup 1.5] \
        [--plot benchmarks/results/speedup.png] [--json benchmarks/results/depth.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

import torch
from _common import machine, print_table, speeds_in_turns, write_json

from wanda_lightning import shrink
from wanda_lightning.core.blocks import BlockStack
from wanda_lightning.data.corpus import pydoc_text, token_windows
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2
from wanda_lightning.depth import remove_blocks
from wanda_lightning.width.report import describe_shape

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def drop_last(model: torch.nn.Module, count: int) -> list[int]:
    """Removes the last ``count`` decoder blocks (no data)."""
    blocks = list(model.model.layers)
    removed = list(range(len(blocks) - count, len(blocks)))
    remove_blocks(model, BlockStack("model.layers", blocks), removed, model.config)
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows scored (default 32)")
    parser.add_argument("--layers", type=float, nargs="*", default=[0.2], help="depth fractions (default 0.2)")
    parser.add_argument("--width", type=float, nargs="*", default=[0.5], help="MLP fractions, width only (default 0.5)")
    parser.add_argument("--mix", nargs="*", default=[], help="LAYERS:MLP pairs shrunk in one call, e.g. 0.1:0.3")
    parser.add_argument(
        "--speedup", type=float, nargs="*", default=[], help="speed targets (decode) shrink() searches, e.g. 1.5"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model, in turns (default 5)")
    parser.add_argument("--plot", default=None, help="PNG of the (last) speed target's candidates")
    parser.add_argument("--json", default=None, help="write the results to this JSON file (rewritten as rows come)")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    calibration = token_windows(ids[:cut], args.seqlen)[: args.samples]
    heldout = token_windows(ids[cut:], args.seqlen)[: args.eval_windows]
    batches = [{"input_ids": w} for w in calibration.split(8)]
    blocks = len(model.model.layers)
    print(f"SmolLM2-135M fp32 ({blocks} blocks), calibration {args.samples} x {args.seqlen}, {len(heldout)} held-out")

    rows: list[dict[str, Any]] = []
    models: dict[str, torch.nn.Module] = {}
    payload: dict[str, Any] = {"benchmark": "bench_depth", "args": vars(args), "machine": machine(), "rows": rows}

    def record(name: str, small: torch.nn.Module, **extra: Any) -> None:
        row = {"name": name, "parameters": sum(p.numel() for p in small.parameters())}
        row["blocks"] = len(small.model.layers)
        row.update(extra, perplexity=perplexity(small, heldout))
        rows.append(row)
        models[name] = small
        size = f"{row['blocks']} blocks, {row['parameters'] / 1e6:.1f}M"
        print(f"{name}: ppl {row['perplexity']:.2f}, {size}", flush=True)
        write_json(args.json, payload)

    record("dense", model)
    for fraction in args.layers:
        for score in ("influence", "angular"):
            small = copy.deepcopy(model)
            start = time.perf_counter()
            report = shrink(small, batches, layers=fraction, layer_score=score, num_samples=None)
            record(
                f"layers={fraction:g} ({score})",
                small,
                removed=report.removed_blocks,
                shrink_seconds=time.perf_counter() - start,
            )
        small = copy.deepcopy(model)
        count = len(report.removed_blocks)
        record(f"drop last {count}", small, removed=drop_last(small, count))
    for fraction in args.width:
        small = copy.deepcopy(model)
        start = time.perf_counter()
        shrink(small, batches, mlp=fraction, method="flap", update="least-squares", num_samples=None)
        record(f"mlp={fraction:g} (flap + least-squares)", small, shrink_seconds=time.perf_counter() - start)
    for pair in args.mix:
        depth, width = (float(part) for part in pair.split(":"))
        small = copy.deepcopy(model)
        start = time.perf_counter()
        report = shrink(
            small, batches, layers=depth, mlp=width, method="flap", update="least-squares", num_samples=None
        )
        record(
            f"layers={depth:g} + mlp={width:g}",
            small,
            removed=report.removed_blocks,
            shrink_seconds=time.perf_counter() - start,
        )

    for speedup in args.speedup:
        small = copy.deepcopy(model)
        start = time.perf_counter()
        report = shrink(small, batches, speedup=speedup, method="flap", update="least-squares", num_samples=None)
        (chosen,) = [c for c in report.candidates if c["chosen"]]
        print(report.candidates_table(), flush=True)
        if args.plot:
            report.plot(args.plot)
        record(
            f"speedup={speedup:g}: {describe_shape(chosen)}",
            small,
            removed=report.removed_blocks,
            shrink_seconds=time.perf_counter() - start,
            candidates=report.candidates,
        )

    print(f"\ntiming {list(models)} (taking turns, {args.repeats} runs each)", flush=True)
    speeds = speeds_in_turns(models, args.repeats)
    dense = rows[0]
    dense.update(speeds["dense"])
    for row in rows:
        row.update(speeds[row["name"]])
        row["perplexity_ratio"] = row["perplexity"] / dense["perplexity"]
        row["decode_speedup"] = row["decode_tokens_per_second"] / dense["decode_tokens_per_second"]
        row["prefill_speedup"] = row["prefill_tokens_per_second"] / dense["prefill_tokens_per_second"]
    print()
    print_table(
        ("model", "blocks", "params", "perplexity", "x dense", "decode tok/s", "speed-up", "prefill tok/s", "speed-up"),
        [
            (
                row["name"],
                str(row["blocks"]),
                f"{row['parameters'] / 1e6:.1f}M",
                f"{row['perplexity']:.2f}",
                f"{row['perplexity_ratio']:.2f}x",
                f"{row['decode_tokens_per_second']:.1f}",
                f"{row['decode_speedup']:.2f}x",
                f"{row['prefill_tokens_per_second']:.0f}",
                f"{row['prefill_speedup']:.2f}x",
            )
            for row in rows
        ],
    )
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
