"""Benchmark: SmolLM2-135M dense, masked and shrunk, written as GGUF and run where users run small models, llama.cpp.

Text: CPython's pydoc topics, tokenised once and cut at 70 %: calibration windows (``--samples`` x 256) from the first
part, held-out perplexity from the first ``--windows`` non-overlapping 256-token windows of the rest, the same windows
in PyTorch and in llama.cpp.

Models (``--models``): ``dense``; ``masked`` (Wanda 50 % unstructured, ``prune``); ``layers20``
(``shrink(layers=0.2)``); ``mlp50`` (``shrink(mlp=0.5)``); ``speed15`` (the shape that
``shrink(speedup=SpeedTarget(1.5, runtime="llama.cpp"))`` chooses, its candidates timed in llama.cpp at q8_0).
Shrinking uses ``--method`` / ``--update`` (flap + least-squares by default). No recovery training: these are one-shot
models, so the perplexities compare runtimes and types, not recipes.

Each model is written with ``save_gguf`` at every ``--types`` type (vocabulary copied from the SmolLM2 GGUF it came
from) into ``--out-dir``; for each file: its size, its held-out perplexity computed by llama.cpp from its own logits
(against PyTorch's fp32 perplexity on the same windows), and, for the ``--timed-types``, decode and prefill tokens/s in
llama.cpp (CPU, one thread per core, batch 1: a 64-token prompt then 128 single-token evaluations; one prefill of 256
tokens), every model of a type timed in turns, best of ``--repeats``; ratios are to dense at the same type. PyTorch
eager fp32 (``generate`` with the KV cache, batch 1, 128 new tokens; prefill 4 x 256) is timed in turns beside them.

    python benchmarks/bench_gguf.py [--models dense masked layers20 mlp50 speed15] [--types f32 f16 q8_0 q4_0]
        [--windows 32] [--repeats 5] [--json benchmarks/results/gguf.json] [--plot benchmarks/results/gguf.png]
    python benchmarks/bench_gguf.py --speed15-from benchmarks/results/speed_target_llamacpp.json  # no new search
    python benchmarks/bench_gguf.py --retime    # time the files of the last run again, at a quieter moment

On a machine busier than its cores, llama.cpp's threads wait for each other at every operation and run far slower
than one thread: pass ``--score-threads 1`` (perplexity does not depend on it) and time at a quiet moment (the load
averages before and after each timing go into the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine, print_table, speeds_in_turns, write_json

from wanda_lightning import prune, shrink
from wanda_lightning.data.corpus import pydoc_text, token_windows
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import GGUF_FILE, load_smollm2, smollm2_path
from wanda_lightning.gguf import save_gguf
from wanda_lightning.llamacpp import default_threads, gguf_perplexity, import_llama_cpp, time_in_turns
from wanda_lightning.width.report import describe_shape

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("dense", "masked", "layers20", "mlp50", "speed15")
TYPES = ("f32", "f16", "q8_0", "q4_0")
#: Perplexity in llama.cpp against PyTorch's: the issue's targets, relative.
TOLERANCE = {"f32": 0.01, "f16": 0.01, "bf16": 0.01, "q8_0": 0.02}


def speed_target(speedup: float, threads: int | None) -> Any:
    """``SpeedTarget(speedup, runtime="llama.cpp", dtype="q8_0")``, or ``None`` where this version has no runtime."""
    from wanda_lightning import SpeedTarget

    try:
        options = {} if threads is None else {"threads": threads}
        return SpeedTarget(speedup, runtime="llama.cpp", dtype="q8_0", **options)  # type: ignore[call-arg]
    except TypeError:
        return None


def build_models(args: argparse.Namespace, model: torch.nn.Module, batches: list[dict]) -> dict[str, Any]:
    """Name -> {model, note} for each of ``args.models``."""
    built: dict[str, Any] = {}
    shrink_options = dict(method=args.method, update=args.update, num_samples=None)
    for name in args.models:
        start = time.perf_counter()
        if name == "dense":
            built[name] = {"model": model, "note": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"}
            continue
        small = copy.deepcopy(model)
        if name == "masked":
            prune(small, batches, sparsity=0.5, num_samples=None)
            note = "Wanda 50 % unstructured"
        elif name == "layers20":
            shrink(small, batches, layers=0.2, num_samples=None)  # whole blocks: no width method or update applies
            note = "layers=0.2"
        elif name == "mlp50":
            shrink(small, batches, mlp=0.5, **shrink_options)
            note = "mlp=0.5"
        elif args.speed15_from:
            # The choice a bench_speed_target run made (and timed again on its own), applied with the same method and
            # update instead of searching again.
            searched = json.loads(Path(args.speed15_from).read_text())
            chosen, target = searched["chosen"], searched["target"]
            fractions = {key: chosen[key] for key in ("layers", "mlp", "heads")}
            shrink(small, batches, **fractions, **shrink_options)
            note = (
                f"speedup={target['speedup']:g} in llama.cpp {target['dtype']}: {describe_shape(chosen)}, "
                f"{chosen['decode_speedup']:.2f}x searched ({args.speed15_from})"
            )
        else:
            target = speed_target(args.speedup, args.threads)
            if target is None:
                print(f"skipping {name}: SpeedTarget has no `runtime` here (the llama.cpp speed target is missing)")
                continue
            report = shrink(small, batches, speedup=target, **shrink_options)
            candidates = [dict(c) for c in report.candidates]
            chosen = next(c for c in candidates if c.get("chosen"))
            shape = describe_shape(chosen)
            note = f"speedup={args.speedup:g} in llama.cpp q8_0: {shape}, {chosen['decode_speedup']:.2f}x searched"
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.out_dir) / "speed15_candidates.json").write_text(json.dumps(candidates, indent=2))
            print(report.candidates_table(), flush=True)
            built[name] = {"model": small, "note": note, "candidates": candidates}
            print(f"{name}: {note} ({time.perf_counter() - start:.0f} s)", flush=True)
            continue
        built[name] = {"model": small, "note": note}
        print(f"{name}: {note} ({time.perf_counter() - start:.0f} s)", flush=True)
    return built


def score_models(args: argparse.Namespace, out: Path, llama_cpp: Any) -> tuple[list, dict, dict]:
    """Builds the models, writes each at every type and scores it in PyTorch and llama.cpp: (rows, eager, built)."""
    model, tokenizer = load_smollm2()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    calibration = token_windows(ids[:cut], 256, args.samples)
    heldout = token_windows(ids[cut:], 256)[: args.windows]
    batches = [{"input_ids": w} for w in calibration.split(8)]
    source_gguf = smollm2_path() / GGUF_FILE
    print(
        f"SmolLM2-135M, calibration {args.samples} x 256, {heldout.shape[0]} held-out windows of 256; llama-cpp-python "
        f"{llama_cpp.__version__}, {args.threads or default_threads()} threads for timing, "
        f"{args.score_threads or default_threads()} for perplexity; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    built = build_models(args, model, batches)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    eager: dict[str, dict[str, Any]] = {}
    for name, entry in built.items():
        small = entry["model"]
        torch_ppl = perplexity(small, heldout)
        eager[name] = {
            "name": name,
            "note": entry["note"],
            "parameters": sum(p.numel() for p in small.parameters()),
            "torch_perplexity": torch_ppl,
            **({"candidates": entry["candidates"]} if "candidates" in entry else {}),
        }
        for dtype in args.types:
            path = out / f"{name}.{dtype}.gguf"
            start = time.perf_counter()
            summary = save_gguf(small, path, dtype=dtype, tokenizer=source_gguf, overwrite=True, modelfile=False)
            written = time.perf_counter() - start
            start = time.perf_counter()
            ppl = gguf_perplexity(path, heldout, threads=args.score_threads)
            scored = time.perf_counter() - start
            row = {
                "name": name,
                "dtype": dtype,
                "path": str(path),
                "file_bytes": path.stat().st_size,
                "write_seconds": written,
                "perplexity": ppl,
                "torch_perplexity": torch_ppl,
                "relative_difference": ppl / torch_ppl - 1,
                "within_target": abs(ppl / torch_ppl - 1) <= TOLERANCE[dtype] if dtype in TOLERANCE else None,
                "perplexity_seconds": scored,
                "summary": getattr(summary, "to_dict", lambda: None)(),
            }
            rows.append(row)
            print(
                f"{name} {dtype}: {row['file_bytes'] / 2**20:.1f} MiB, ppl {ppl:.3f} (torch {torch_ppl:.3f}, "
                f"{row['relative_difference']:+.2%}), written in {written:.1f} s, scored in {scored:.0f} s",
                flush=True,
            )

    return rows, eager, built


def reload_models(out: Path, names: list[str]) -> dict[str, Any]:
    """The models back from their f32 GGUFs (transformers' loader), for ``--retime``'s eager timing."""
    from transformers import AutoModelForCausalLM

    built = {}
    for name in names:
        if (out / f"{name}.f32.gguf").exists():
            model = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"{name}.f32.gguf", dtype=torch.float32)
            built[name] = {"model": model.eval()}
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--types", nargs="*", default=list(TYPES), choices=TYPES, help="GGUF types written and scored")
    parser.add_argument(
        "--timed-types", nargs="*", default=["f16", "q8_0", "q4_0"], choices=TYPES, help="GGUF types timed"
    )
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 256 tokens (default 16)")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 256 tokens scored (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="llama.cpp turns, best kept (default 5)")
    parser.add_argument("--eager-repeats", type=int, default=3, help="PyTorch eager turns (default 3; 0: skip)")
    parser.add_argument("--method", default="flap", help="width method for the shrunk models (default flap)")
    parser.add_argument("--update", default="least-squares", help="update after shrinking (default least-squares)")
    parser.add_argument("--speedup", type=float, default=1.5, help="the speed15 model's target (default 1.5)")
    parser.add_argument(
        "--speed15-from",
        default=None,
        help="a bench_speed_target.py JSON: speed15 is its choice (same method and update) instead of a new search",
    )
    parser.add_argument("--out-dir", default="/tmp/wanda_gguf_bench", help="where the GGUF files are written")
    parser.add_argument("--json", default="benchmarks/results/gguf.json", help="results JSON ('' to skip)")
    parser.add_argument("--plot", default="benchmarks/results/gguf.png", help="perplexity against decode PNG")
    parser.add_argument(
        "--threads", type=int, default=None, help="llama.cpp threads for timing and the speed target (default: cores)"
    )
    parser.add_argument(
        "--score-threads",
        type=int,
        default=None,
        help="llama.cpp threads for perplexity (default: cores; 1 is much faster on a machine busier than its cores)",
    )
    parser.add_argument(
        "--retime",
        action="store_true",
        help="only time again the files a previous run wrote (its --json and --out-dir), e.g. at a quieter moment",
    )
    args = parser.parse_args()
    if args.update in ("", "none", "None"):
        args.update = None
    llama_cpp = import_llama_cpp()
    out = Path(args.out_dir)
    if args.retime:
        payload = json.loads(Path(args.json).read_text())
        rows, eager = payload["rows"], {e["name"]: e for e in payload["eager"]}
        built = reload_models(out, list(eager)) if args.eager_repeats else {}
        print(f"re-timing the files of {args.json} in {out}; load {os.getloadavg()[0]:.2f}", flush=True)
    else:
        rows, eager, built = score_models(args, out, llama_cpp)

    conditions: dict[str, Any] = {"load_before_timing": os.getloadavg()}
    for dtype in args.timed_types:
        paths = {r["name"]: Path(r["path"]) for r in rows if r["dtype"] == dtype}
        if not paths:
            continue
        print(f"\ntiming {list(paths)} at {dtype} in llama.cpp (in turns, best of {args.repeats})", flush=True)
        timed = time_in_turns(paths, repeats=args.repeats, threads=args.threads)
        dense = timed.get("dense")
        for row in rows:
            if row["dtype"] != dtype:
                continue
            result = timed[row["name"]]
            row["decode_tokens_per_second"] = result.decode_tokens_per_second
            row["prefill_tokens_per_second"] = result.prefill_tokens_per_second
            if dense is not None:
                row["decode_ratio"] = result.decode_tokens_per_second / dense.decode_tokens_per_second
                row["prefill_ratio"] = result.prefill_tokens_per_second / dense.prefill_tokens_per_second
    conditions["load_after_llama_cpp_timing"] = os.getloadavg()
    if args.eager_repeats:
        print(f"\ntiming {list(built)} in PyTorch eager fp32 (in turns, best of {args.eager_repeats})", flush=True)
        speeds = speeds_in_turns({name: entry["model"] for name, entry in built.items()}, args.eager_repeats)
        for name, speed in speeds.items():
            eager[name].update(speed)
        if "dense" in speeds:
            for name in eager:
                for key, ratio in (
                    ("decode_tokens_per_second", "decode_ratio"),
                    ("prefill_tokens_per_second", "prefill_ratio"),
                ):
                    eager[name][ratio] = eager[name][key] / speeds["dense"][key]
        conditions["load_after_eager_timing"] = os.getloadavg()

    print()
    header = (
        "model",
        "type",
        "file MiB",
        "ppl llama.cpp",
        "ppl torch",
        "diff",
        "decode tok/s",
        "x dense",
        "prefill tok/s",
        "x dense",
    )
    table = []

    def number(row: dict[str, Any], key: str, form: str) -> str:
        return format(row[key], form) if key in row else "-"

    for row in rows:
        table.append(
            (
                row["name"],
                row["dtype"],
                f"{row['file_bytes'] / 2**20:.1f}",
                f"{row['perplexity']:.3f}",
                f"{row['torch_perplexity']:.3f}",
                f"{row['relative_difference']:+.2%}",
                number(row, "decode_tokens_per_second", ".1f"),
                number(row, "decode_ratio", ".2f") + ("x" if "decode_ratio" in row else ""),
                number(row, "prefill_tokens_per_second", ".0f"),
                number(row, "prefill_ratio", ".2f") + ("x" if "prefill_ratio" in row else ""),
            )
        )
    for name, entry in eager.items():
        if "decode_tokens_per_second" in entry:
            table.append(
                (
                    name,
                    "torch fp32",
                    "-",
                    "-",
                    f"{entry['torch_perplexity']:.3f}",
                    "",
                    f"{entry['decode_tokens_per_second']:.1f}",
                    number(entry, "decode_ratio", ".2f") + ("x" if "decode_ratio" in entry else ""),
                    f"{entry['prefill_tokens_per_second']:.0f}",
                    number(entry, "prefill_ratio", ".2f") + ("x" if "prefill_ratio" in entry else ""),
                )
            )
    print_table(header, table)
    checked = [r for r in rows if r["within_target"] is not None]
    missed = [f"{r['name']} {r['dtype']} ({r['relative_difference']:+.2%})" for r in checked if not r["within_target"]]
    print(
        f"\nperplexity in llama.cpp against PyTorch (targets: 1 % at f32/f16, 2 % at q8_0): "
        f"{len(checked) - len(missed)}/{len(checked)} within" + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    for row in rows:
        if row["name"] == "masked" and "decode_ratio" in row:
            print(
                f"masks in llama.cpp at {row['dtype']}: {row['decode_ratio']:.2f}x decode, "
                f"{row['prefill_ratio']:.2f}x prefill"
            )
    print(f"conditions: load average {conditions}")
    payload = {
        "machine": {
            **machine(),
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_threads": args.threads or default_threads(),
        },
        "args": vars(args),
        "conditions": conditions,
        "rows": rows,
        "eager": list(eager.values()),
    }
    write_json(args.json or None, payload)
    if args.plot:
        plot(rows, eager, args.plot)


def plot(rows: list[dict[str, Any]], eager: dict[str, dict[str, Any]], path: str) -> None:
    """Held-out perplexity against decode tokens/s: one marker per model and type, one colour per type."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if "decode_tokens_per_second" in row:
            groups.setdefault(row["dtype"], []).append(row)

    def points(members: list[dict[str, Any]], perplexity: str, **style: Any) -> None:
        """One named marker per model at (decode tokens/s, ``perplexity``)."""
        xs = [m["decode_tokens_per_second"] for m in members]
        ys = [m[perplexity] for m in members]
        axes.scatter(xs, ys, **style)
        for m, x, y in zip(members, xs, ys, strict=True):
            axes.annotate(m["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")

    for dtype, members in groups.items():
        points(members, "perplexity", label=f"llama.cpp {dtype}")
    timed = [e for e in eager.values() if "decode_tokens_per_second" in e]
    if timed:
        points(timed, "torch_perplexity", marker="x", color="black", label="PyTorch eager fp32")
    axes.set_xscale("log")
    axes.set_yscale("log")
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel("decode tokens/s (batch 1, CPU; log)")
    axes.set_ylabel("held-out perplexity (pydoc; log)")
    axes.set_title("SmolLM2-135M: dense, masked and shrunk, in llama.cpp and PyTorch")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
