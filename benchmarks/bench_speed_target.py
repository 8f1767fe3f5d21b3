"""Benchmark: the speed target timed in llama.cpp, on SmolLM2-135M, and its choice timed again on its own.

1. ``shrink(model, calibration, speedup=SpeedTarget(S, runtime="llama.cpp", dtype=T))``: every candidate shape is
   built with throw-away weights, written as a GGUF of type T and timed in llama.cpp (CPU, one thread per core, batch
   1), the ones that may reach S again in turns with the dense file; the ones that reach it with the margin the
   measured noise asks are shrunk one-shot and scored by their calibration loss, and the best is applied (method and
   update as given; calibration: pydoc topics, the first 70 % of the tokens, ``--samples`` x ``--seqlen``).
2. The shrunk model (its real weights) and the dense one are written as GGUF files of type T, and timed again in
   llama.cpp on their own: ``--retime`` times, each a pair timed in turns (best of ``--repeats`` runs each, 128
   single-token evaluations after a 64-token prompt; prefill 256 tokens). Each time gives a decode and a prefill
   ratio; their median, minimum and maximum are reported. ``--threads`` sets llama.cpp's threads for both steps.

The machine is shared: load averages before and after are recorded with the results.

    python benchmarks/bench_speed_target.py [--speedup 1.5] [--dtype q8_0] [--retime 5] \
        [--json benchmarks/results/speed_target_llamacpp.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, print_table, write_json

from wanda_lightning import shrink
from wanda_lightning.data.corpus import pydoc_text, token_windows
from wanda_lightning.data.smollm2 import load_smollm2
from wanda_lightning.gguf import save_gguf
from wanda_lightning.llamacpp.runtime import default_threads, import_llama_cpp
from wanda_lightning.llamacpp.speed import time_in_turns
from wanda_lightning.width.report import describe_shape
from wanda_lightning.width.speed_target import SpeedTarget

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedup", type=float, default=1.5, help="decode speed-up to reach (default 1.5)")
    parser.add_argument("--dtype", default="q8_0", help="GGUF type timed (default q8_0)")
    parser.add_argument("--method", default="flap", help="width method (default flap)")
    parser.add_argument("--update", default="least-squares", help="update of the kept weights (default least-squares)")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--retime", type=int, default=5, help="times the choice is timed again with dense (default 5)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per model in each re-timing, best kept (default 5)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama.cpp threads for the search and the re-timing (default one per core; on a machine busier than its "
        "cores use 1: several threads then wait on each other at every operation)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    llama_cpp = import_llama_cpp()
    command = "python " + " ".join(sys.argv)
    load_before = os.getloadavg()

    model, tokenizer = load_smollm2()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    calibration = token_windows(ids[: int(len(ids) * 0.7)], args.seqlen)[: args.samples]
    batches = [{"input_ids": w} for w in calibration.split(8)]
    dense = copy.deepcopy(model)
    target = SpeedTarget(args.speedup, runtime="llama.cpp", dtype=args.dtype, threads=args.threads)
    print(f"SmolLM2-135M fp32, calibration {args.samples} x {args.seqlen}; {target}", flush=True)

    start = time.perf_counter()
    report = shrink(model, batches, speedup=target, method=args.method, update=args.update)
    search_seconds = time.perf_counter() - start
    print(report)
    print(f"\n{report.candidates_table()}\n", flush=True)
    chosen = next(c for c in report.candidates if c["chosen"])

    turns: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-speed-target-") as folder:
        paths = {"dense": Path(folder) / "dense.gguf", "shrunk": Path(folder) / "shrunk.gguf"}
        sizes = {}
        for name, lm in (("dense", dense), ("shrunk", model)):
            summary = save_gguf(lm, paths[name], dtype=args.dtype, tokenizer="placeholder", modelfile=False)
            sizes[name] = paths[name].stat().st_size
            print(summary, flush=True)
        for turn in range(args.retime):
            speeds = time_in_turns(paths, repeats=args.repeats, threads=args.threads)
            d, s = speeds["dense"], speeds["shrunk"]
            turns.append(
                {
                    "dense_decode": d.decode_tokens_per_second,
                    "shrunk_decode": s.decode_tokens_per_second,
                    "dense_prefill": d.prefill_tokens_per_second,
                    "shrunk_prefill": s.prefill_tokens_per_second,
                    "decode_ratio": s.decode_tokens_per_second / d.decode_tokens_per_second,
                    "prefill_ratio": s.prefill_tokens_per_second / d.prefill_tokens_per_second,
                }
            )
            print(f"re-timing {turn + 1}/{args.retime}: decode {turns[-1]['decode_ratio']:.3f}x", flush=True)
    load_after = os.getloadavg()

    def summary_of(key: str) -> dict[str, float]:
        values = [t[key] for t in turns]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    retimed = {key: summary_of(key) for key in ("decode_ratio", "prefill_ratio", "dense_decode", "shrunk_decode")}
    rows = [
        (
            str(i + 1),
            f"{t['dense_decode']:.1f}",
            f"{t['shrunk_decode']:.1f}",
            f"{t['decode_ratio']:.3f}x",
            f"{t['dense_prefill']:.0f}",
            f"{t['shrunk_prefill']:.0f}",
            f"{t['prefill_ratio']:.3f}x",
        )
        for i, t in enumerate(turns)
    ]
    print(f"\nchosen: {describe_shape(chosen)} {chosen.get('config')}; search said {chosen['decode_speedup']:.3f}x")
    print_table(("re-timing", "dense tok/s", "shrunk tok/s", "decode", "dense pre", "shrunk pre", "prefill"), rows)
    decode = retimed["decode_ratio"]
    print(f"decode ratio re-timed: median {decode['median']:.3f}x (min {decode['min']:.3f}, max {decode['max']:.3f})")
    threads = args.threads or default_threads()
    print(f"load average before {load_before}, after {load_after}; llama.cpp threads {threads}")
    result: dict[str, Any] = {
        "command": command,
        "machine": {
            **machine(),
            "llama_cpp_python": getattr(llama_cpp, "__version__", None),
            "llama_cpp_threads": args.threads or default_threads(),
            "cores": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "target": {"speedup": args.speedup, "dtype": args.dtype, "method": args.method, "update": args.update},
        "search_seconds": search_seconds,
        "report": report.to_dict(),
        "chosen": chosen,
        "file_bytes": sizes,
        "retimed": {"turns": turns, "summary": retimed, "repeats": args.repeats},
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
