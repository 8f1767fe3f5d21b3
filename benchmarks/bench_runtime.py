"""Benchmark: 2:4 semi-structured sparsity on GPU, dense vs `to_semi_structured`, per Linear layer and end to end.

Needs a CUDA GPU with compute capability >= 8.0; without one it says so, writes the reason to the JSON and exits 0.
With one it times, in fp16 with CUDA events (median of repeats after warm-up):
  * single Linear layers (SmolLM2-135M's shapes and a 7B-class MLP) dense vs 2:4, for several token counts;
  * SmolLM2-135M forward throughput (tokens/s) dense vs 2:4 (magnitude 2:4, since only speed is measured here),
    with the largest logit difference as a sanity check.

    python benchmarks/bench_runtime.py [--json benchmarks/results/runtime.json] [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch
from _common import machine, print_table, write_json
from torch import nn

from wanda_lightning import prune
from wanda_lightning.export.runtime import to_semi_structured

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LINEAR_SHAPES = [(576, 1536), (1536, 576), (576, 576), (4096, 11008), (11008, 4096)]  # (in, out)
TOKENS = [16, 256, 4096]


def why_no_gpu() -> str | None:
    if not torch.cuda.is_available():
        return f"no CUDA GPU present (torch {torch.__version__}, torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return (
            f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}; 2:4 sparse "
            "kernels need 8.0 or higher"
        )
    return None


def cuda_milliseconds(fn: Any, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_linears(repeats: int) -> list[dict[str, Any]]:
    results = []
    for in_features, out_features in LINEAR_SHAPES:
        layer = nn.Sequential(nn.Linear(in_features, out_features)).half().cuda().eval()
        prune(layer, None, structure="2:4", method="magnitude", ignore=[])
        dense = nn.Sequential(nn.Linear(in_features, out_features)).half().cuda().eval()
        dense.load_state_dict(layer.state_dict())
        summary = to_semi_structured(layer)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, dtype=torch.float16, device="cuda")
            with torch.no_grad():
                dense_ms = cuda_milliseconds(lambda x=x, f=dense: f(x), repeats)
                sparse_ms = cuda_milliseconds(lambda x=x, f=layer: f(x), repeats) if summary.converted else float("nan")
            results.append(
                dict(
                    shape=f"{in_features}->{out_features}",
                    tokens=tokens,
                    dense_ms=dense_ms,
                    sparse_ms=sparse_ms,
                    speedup=dense_ms / sparse_ms,
                    backend=summary.backend,
                    converted=bool(summary.converted),
                )
            )
            print(f"linear {in_features}->{out_features} x {tokens} tokens: {dense_ms / sparse_ms:.2f}x", flush=True)
    return results


def bench_model(repeats: int) -> dict[str, Any]:
    from wanda_lightning.data.smollm2 import load_smollm2

    model, _ = load_smollm2(dtype=torch.float16)
    model = model.cuda().eval()
    prune(model, None, structure="2:4", method="magnitude")
    ids = torch.randint(0, model.config.vocab_size, (8, 256), device="cuda")
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits.float()
        dense_ms = cuda_milliseconds(lambda: model(input_ids=ids, use_cache=False), repeats)
    summary = to_semi_structured(model)
    with torch.no_grad():
        sparse = model(input_ids=ids, use_cache=False).logits.float()
        sparse_ms = cuda_milliseconds(lambda: model(input_ids=ids, use_cache=False), repeats)
    tokens = ids.numel()
    return dict(
        batch=list(ids.shape),
        dense_tokens_per_s=tokens / dense_ms * 1000,
        sparse_tokens_per_s=tokens / sparse_ms * 1000,
        speedup=dense_ms / sparse_ms,
        converted=len(summary.converted),
        left_dense=[name for name, _ in summary.dense],
        backend=summary.backend,
        max_abs_logit_diff=float((reference - sparse).abs().max()),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats per measurement (default 50)")
    parser.add_argument("--skip-model", action="store_true", help="only the single-layer measurements")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()

    reason = why_no_gpu()
    if reason is not None:
        print(f"bench_runtime: skipped: {reason}. 2:4 semi-structured kernels run on CUDA GPUs only.")
        write_json(args.json, dict(benchmark="bench_runtime", skipped=True, reason=reason, machine=machine()))
        return 0

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16")
    linears = bench_linears(args.repeats)
    print()
    print_table(
        ["layer", "tokens", "dense ms", "2:4 ms", "speed-up"],
        [
            [r["shape"], str(r["tokens"]), f"{r['dense_ms']:.4f}", f"{r['sparse_ms']:.4f}", f"{r['speedup']:.2f}x"]
            for r in linears
        ],
    )
    model = None if args.skip_model else bench_model(args.repeats)
    if model is not None:
        print(
            f"\nSmolLM2-135M forward {model['batch']}: dense {model['dense_tokens_per_s']:.0f} tok/s, 2:4 "
            f"{model['sparse_tokens_per_s']:.0f} tok/s ({model['speedup']:.2f}x), {model['converted']} layers "
            f"converted ({model['backend']}), max |logit diff| {model['max_abs_logit_diff']:.3g}"
        )
    write_json(
        args.json,
        dict(benchmark="bench_runtime", skipped=False, machine=machine(), linears=linears, model=model),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
