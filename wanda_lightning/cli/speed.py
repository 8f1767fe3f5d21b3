"""decode/prefill tokens per second and peak memory of models, side by side, and which pays

Time each MODEL where you run it: greedy decoding with the key/value cache (--new-tokens per sequence, --batch-size
sequences) and one prefill pass (--prefill-batch x --prefill-length tokens), best of --repeats runs. The first model is
the baseline. A 2:4-pruned model is also timed with PyTorch's 2:4 kernels on a GPU that has them. Unstructured masks run
at the dense speed; shrunk models run faster everywhere.

With --runtime llama.cpp (the optional llama-cpp-python: pip install wanda-lightning[llamacpp]) each MODEL is written to
a temporary GGUF of --gguf-type (default q8_0) and timed where users run small models: on the CPU, one thread per core,
batch 1 (a 64-token prompt, then --new-tokens single-token evaluations; one prefill of --prefill-length tokens), all
models in turns, best of --repeats. A .gguf MODEL is timed as stored unless --gguf-type is given.
"""

from __future__ import annotations

import argparse
import gc
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import torch

from ..core.validation import as_device
from .arguments import add_model_arguments, check_positive_arguments
from .loading import load_model

__all__ = ["add_arguments", "run", "verdicts"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning speed``."""
    add_model_arguments(parser)
    parser.add_argument("others", nargs="*", metavar="OTHER", help="more models to compare with the first")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    parser.add_argument(
        "--prefill-batch", type=int, default=None, help="sequences in the prefill pass (default 4; llama.cpp: 1 only)"
    )
    parser.add_argument("--prefill-length", type=int, default=256, help="tokens per prefill sequence (default 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, best kept (default 3)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--runtime",
        choices=["torch", "llama.cpp"],
        default="torch",
        help="torch: PyTorch eager, generate() (default); llama.cpp: each model as a GGUF in llama.cpp (CPU, batch 1)",
    )
    parser.add_argument(
        "--gguf-type",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
        default=None,
        help="with --runtime llama.cpp: the GGUF type models are written in (default q8_0; a .gguf MODEL as stored)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="with --runtime llama.cpp: its threads (default one per core; on a machine busier than its cores, 1)",
    )


def verdicts(results: list[dict[str, Any]]) -> list[str]:
    """One line per model after the first: its speed-ups over the first and whether they pay (at least 10 %).

    Example::

        >>> rows = [{"name": "dense", "decode_tokens_per_second": 10.0, "prefill_tokens_per_second": 100.0},
        ...         {"name": "small", "decode_tokens_per_second": 13.0, "prefill_tokens_per_second": 150.0}]
        >>> verdicts(rows)
        ['small: 1.30x decode, 1.50x prefill against dense: pays']
    """
    base = results[0]
    lines = []
    for row in results[1:]:
        decode = row["decode_tokens_per_second"] / base["decode_tokens_per_second"]
        prefill = row["prefill_tokens_per_second"] / base["prefill_tokens_per_second"]
        pays = "pays" if max(decode, prefill) >= 1.1 else "no speed-up here"
        lines.append(f"{row['name']}: {decode:.2f}x decode, {prefill:.2f}x prefill against {base['name']}: {pays}")
    return lines


def _sparsity_note(model: torch.nn.Module) -> str:
    from ..core.layers import is_linear_layer

    weights = [cast(torch.Tensor, m.weight) for m in model.modules() if is_linear_layer(m)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return f"{zeros / total:.0%} zeros" if total and zeros / total >= 0.05 else ""


def run(args: argparse.Namespace) -> int:
    """Prints each model's speed; returns the exit status."""
    from ..core.speed import measure_speed
    from ..export.runtime import is_2_4_sparse, to_semi_structured

    check_positive_arguments(args, "batch_size", "new_tokens", "prefill_length", "repeats")
    if args.prefill_batch is not None:
        check_positive_arguments(args, "prefill_batch")
    if args.runtime == "llama.cpp":
        return _run_llama_cpp(args)
    for flag, value in (("--gguf-type", args.gguf_type), ("--threads", args.threads)):
        if value is not None:
            raise ValueError(f"{flag} {value} needs --runtime llama.cpp (got --runtime {args.runtime})")
    args.prefill_batch = 4 if args.prefill_batch is None else args.prefill_batch
    device = as_device(args.device, "--device", must_exist=True) or torch.device("cpu")
    results: list[dict[str, Any]] = []
    options = dict(
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        prefill_batch=args.prefill_batch,
        prefill_length=args.prefill_length,
        repeats=args.repeats,
        device=device,
    )
    for spec in [args.model, *args.others]:
        loaded = load_model(spec, module=args.module, tokenizer=args.tokenizer, dtype=args.dtype)
        model = loaded.model.to(device)
        note = _sparsity_note(model)
        result = measure_speed(model, name=spec, **options).to_dict()
        results.append({**result, "note": note})
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        capable = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        if capable and linears and all(is_2_4_sparse(w) for w in linears[:-1]):
            summary = to_semi_structured(model)
            semi = measure_speed(model, name=f"{spec} (2:4 kernels)", **options).to_dict()
            results.append({**semi, "note": f"{len(summary.converted)} layers on 2:4 kernels"})
        del model, loaded
        gc.collect()
    footer = (
        f"\n{device}, batch {args.batch_size} x {args.new_tokens} new tokens (KV cache), prefill "
        f"{args.prefill_batch} x {args.prefill_length}, best of {args.repeats}"
    )
    _print_results(args, results, footer)
    if device.type != "cuda" and not args.json:
        print("(2:4 sparse kernels need an NVIDIA GPU with compute capability 8.0 or newer)")
    return 0


def _run_llama_cpp(args: argparse.Namespace) -> int:
    """``--runtime llama.cpp``: every model as a GGUF, timed in turns."""
    from ..llamacpp import default_threads, import_llama_cpp, temporary_gguf, time_in_turns

    if args.batch_size != 1 or args.prefill_batch not in (None, 1):
        raise ValueError(
            f"--runtime llama.cpp times batch 1: --batch-size and --prefill-batch must be 1, got {args.batch_size} "
            f"and {args.prefill_batch}"
        )
    if args.device not in (None, "cpu"):
        raise ValueError(f"--runtime llama.cpp runs on the CPU: --device must be cpu, got {args.device}")
    if args.threads is not None:
        check_positive_arguments(args, "threads")
    version = getattr(import_llama_cpp(), "__version__", "?")  # before anything is loaded or written
    notes: dict[str, str] = {}
    with ExitStack() as stack:
        paths: dict[str, Path] = {}
        for spec in [args.model, *args.others]:
            name = spec if spec not in paths else f"{spec} ({sum(n.startswith(spec) for n in paths) + 1})"
            if args.gguf_type is None and spec.endswith(".gguf") and Path(spec).is_file():
                paths[name], notes[name] = Path(spec), "GGUF as stored"
                continue
            loaded = load_model(spec, module=args.module, tokenizer=args.tokenizer, dtype=args.dtype)
            notes[name] = _sparsity_note(loaded.model)
            paths[name] = stack.enter_context(temporary_gguf(loaded.model, args.gguf_type or "q8_0"))
            del loaded
            gc.collect()
        timed = time_in_turns(
            paths,
            repeats=args.repeats,
            new_tokens=args.new_tokens,
            prefill_length=args.prefill_length,
            threads=args.threads,
        )
    results = []
    for name, result in timed.items():
        size = f"{result.dtype or '?'}, {(result.file_bytes or 0) / 2**20:.1f} MiB file"
        results.append({**result.to_dict(), "note": ", ".join(n for n in (size, notes[name]) if n)})
    threads = args.threads or default_threads()
    footer = (
        f"\nllama.cpp (llama-cpp-python {version}), CPU, {threads} thread{'s' if threads > 1 else ''}, batch 1: a "
        f"64-token prompt then {args.new_tokens} single-token evaluations (KV cache); prefill 1 x "
        f"{args.prefill_length}; best of {args.repeats}, timed in turns"
    )
    _print_results(args, results, footer)
    return 0


def _print_results(args: argparse.Namespace, results: list[dict[str, Any]], footer: str) -> None:
    if args.json:
        print(json.dumps({"results": results, "verdicts": verdicts(results)}, indent=2))
        return
    header = ("model", "params", "weights MiB", "decode tok/s", "prefill tok/s", "peak MiB", "note")
    rows = [header]
    for result in results:
        peak = result["peak_memory_bytes"]
        rows.append(
            (
                result["name"],
                f"{result['parameters'] / 1e6:.1f}M",
                f"{result['weight_bytes'] / 2**20:.1f}",
                f"{result['decode_tokens_per_second']:.1f}",
                f"{result['prefill_tokens_per_second']:.1f}",
                "-" if peak is None else f"{peak / 2**20:.1f}",
                result["note"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if index == 0:
            print("  ".join("-" * w for w in widths))
    print(footer)
    for line in verdicts(results):
        print(line)
