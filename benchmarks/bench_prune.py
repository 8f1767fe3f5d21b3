"""Benchmark: Wanda vs magnitude on SmolLM2-135M with the pydoc corpus, fully offline.

Calibration: 16 x 256 tokens from the first 70 % of `pydoc_data.topics`; held-out perplexity on non-overlapping
256-token windows of the last 30 %. For each configuration it prints held-out perplexity, achieved sparsity, the
wall time of `prune()`, that time as a multiple of one plain dense forward pass over the same calibration batches
(measured right before it, so the ratio is side by side on this noisy machine), and peak RSS during `prune()`.

    python benchmarks/bench_prune.py [--json benchmarks/results/prune.json] [--eval-windows N]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import machine, print_table, read_rss_mib, reset_peak_rss, write_json

from wanda_lightning import Wanda, prune
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS: list[tuple[str, dict]] = [
    ("magnitude 50%", dict(method="magnitude", sparsity=0.5)),
    ("wanda 50%", dict(method="wanda", sparsity=0.5)),
    ("wanda 50% one-shot", dict(method="wanda", sparsity=0.5, sequential=False)),
    ("wanda 50% variant", dict(method=Wanda(variant=True), sparsity=0.5)),
    ("magnitude 2:4", dict(method="magnitude", structure="2:4")),
    ("wanda 2:4", dict(method="wanda", structure="2:4")),
    ("magnitude 4:8", dict(method="magnitude", structure="4:8")),
    ("wanda 4:8", dict(method="wanda", structure="4:8")),
]


def dense_forward_seconds(model: torch.nn.Module, batches: list[dict]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per sequence and per held-out window")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--eval-windows", type=int, default=None, help="cap on held-out windows (default: all)")
    parser.add_argument("--only", nargs="*", default=None, help="run only configurations whose name starts so")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    splits = split_tokens(tokenizer, num_samples=args.samples, seqlen=args.seqlen, max_eval_windows=args.eval_windows)
    batches = [{"input_ids": ids} for ids in splits.calibration.split(args.batch_size)]
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(
        f"SmolLM2-135M fp32, {args.samples} x {args.seqlen} calibration tokens in batches of {args.batch_size}, "
        f"{splits.heldout.shape[0]} held-out windows of {splits.heldout.shape[1]}, {torch.get_num_threads()} threads"
    )

    dense_forward_seconds(model, batches[:1])  # warm-up
    results = []
    dense_ppl = perplexity(model, splits.heldout)
    results.append(
        dict(
            name="dense",
            perplexity=dense_ppl,
            sparsity=0.0,
            prune_seconds=None,
            dense_forward_seconds=None,
            ratio=None,
            peak_rss_mib=None,
        )
    )
    print(f"dense perplexity {dense_ppl:.2f}")
    for name, options in CONFIGS:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        model.load_state_dict(dense_state)
        forward = dense_forward_seconds(model, batches)
        baseline_rss = read_rss_mib("VmRSS")
        reset_peak_rss()
        report = prune(model, batches, num_samples=None, **options)
        peak = read_rss_mib("VmHWM") - baseline_rss
        ppl = perplexity(model, splits.heldout)
        results.append(
            dict(
                name=name,
                perplexity=ppl,
                sparsity=report.global_sparsity,
                prune_seconds=report.total_seconds,
                calibration_seconds=report.calibration_seconds,
                scoring_seconds=report.scoring_seconds,
                dense_forward_seconds=forward,
                ratio=report.total_seconds / forward,
                peak_rss_mib=peak,
            )
        )
        print(
            f"{name}: ppl {ppl:.2f}, prune {report.total_seconds:.2f} s = {report.total_seconds / forward:.2f} x "
            f"dense forward ({forward:.2f} s), peak +{peak:.0f} MiB",
            flush=True,
        )

    print()
    rows = []
    for r in results:
        rows.append(
            [
                r["name"],
                f"{r['perplexity']:.2f}",
                f"{r['sparsity']:.2%}",
                "-" if r["prune_seconds"] is None else f"{r['prune_seconds']:.2f}",
                "-" if r["dense_forward_seconds"] is None else f"{r['dense_forward_seconds']:.2f}",
                "-" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                "-" if r["peak_rss_mib"] is None else f"{max(r['peak_rss_mib'], 0):.0f}",
            ]
        )
    print_table(["config", "held-out ppl", "sparsity", "prune s", "dense fwd s", "prune/fwd", "peak +MiB"], rows)
    write_json(args.json, dict(benchmark="bench_prune", args=vars(args), machine=machine(), results=results))


if __name__ == "__main__":
    main()
