"""GPU check, ready to run on one modern NVIDIA GPU in a few minutes: the paths this project cannot test on its CPU.

1. Masks from ``prune()`` on CUDA in bfloat16 against the same call on the CPU (bfloat16 and float32): the share of
   mask entries that agree (Wanda 50 % and 2:4, block-sequential, 16 x 256 pydoc tokens).
2. ``wanda_lightning.to_semi_structured``: 2:4 sparse matmul (every distinct Linear shape of the model, several token
   counts) and end-to-end decode tokens/s of the 2:4 model against dense, in bfloat16.
3. Width pruning: decode and prefill tokens/s of the shrunk model (MLP -50 %, one of three KV groups) against dense, in
   bfloat16.

One table is printed; ``--json PATH`` also writes it. On a machine without CUDA it runs what it can on the CPU and
marks the rest as skipped (useful to check the script itself).

    python benchmarks/gpu_check.py [--json $OUT/gpu_check.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import machine, print_table, write_json

from wanda_lightning import prune, shrink, to_semi_structured
from wanda_lightning.core.speed import measure_speed
from wanda_lightning.data.corpus import split_tokens
from wanda_lightning.data.smollm2 import load_smollm2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (module.weight != 0).cpu()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name
    }


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(v.numel() for v in a.values())


def time_matmul(weight: torch.Tensor, tokens: int, repeats: int = 50) -> float:
    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
    for _ in range(5):
        F.linear(x, weight)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        F.linear(x, weight)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def speed_rows(label: str, fast: Any, base: Any, device: str) -> list[tuple[str, str, str]]:
    """Decode and prefill rows of ``fast`` against ``base`` (two ``SpeedResult``)."""
    rows = []
    for key, what in (("decode_tokens_per_second", "decode"), ("prefill_tokens_per_second", "prefill 4x256")):
        ratio = getattr(fast, key) / getattr(base, key)
        detail = f"{getattr(fast, key):.0f} vs {getattr(base, key):.0f} tok/s on {device}"
        rows.append((f"{label} {what}, batch {fast.batch_size}", f"{ratio:.2f}x", detail))
    if fast.peak_memory_bytes is not None and base.peak_memory_bytes is not None:
        peak = f"{fast.peak_memory_bytes / 2**20:.0f} MiB"
        rows.append(
            (f"{label} peak memory, batch {fast.batch_size}", peak, f"dense {base.peak_memory_bytes / 2**20:.0f}")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the table to this JSON file")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per sequence (default 128)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    rows: list[tuple[str, str, str]] = []
    results: dict[str, Any] = {"machine": machine(), "cuda": cuda}
    if cuda:
        results["gpu"] = torch.cuda.get_device_name()
        results["capability"] = list(torch.cuda.get_device_capability())
    started = time.perf_counter()

    model, tokenizer = load_smollm2()
    calibration = split_tokens(tokenizer, num_samples=16, seqlen=256).calibration
    batches = [{"input_ids": ids} for ids in calibration.split(8)]

    # 1. Masks: CUDA bf16 against CPU bf16 and CPU fp32.
    places = [("cpu fp32", torch.float32, "cpu"), ("cpu bf16", torch.bfloat16, "cpu")]
    if cuda:
        places.append(("cuda bf16", torch.bfloat16, "cuda"))
    for structure in ("unstructured", "2:4"):
        found = {}
        for where, dtype, place in places:
            pruned = copy.deepcopy(model).to(dtype).to(place)
            prune(pruned, batches, structure=structure, sparsity=None if structure == "2:4" else 0.5, num_samples=None)
            found[where] = masks(pruned)
            del pruned
        probe = "cuda bf16" if cuda else "cpu bf16"
        for other in [w for w, _, _ in places if w != probe]:
            share = agreement(found[probe], found[other])
            rows.append((f"masks {structure}: {probe} vs {other}", f"{share:.4%}", "of entries agree"))

    # 2. 2:4 kernels.
    dense_bf16 = copy.deepcopy(model).to(torch.bfloat16).to(device)
    sparse = copy.deepcopy(model).to(torch.bfloat16).to(device)
    prune(sparse, batches, structure="2:4", num_samples=None)
    if cuda and torch.cuda.get_device_capability() >= (8, 0):
        from torch.sparse import to_sparse_semi_structured

        shapes: dict[tuple[int, int], torch.Tensor] = {}
        for name, module in sparse.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                shapes.setdefault(tuple(module.weight.shape), module.weight.detach().clone())
        for shape, weight in shapes.items():
            compressed = to_sparse_semi_structured(weight)
            for tokens in (1, 16, 256, 2048):
                speedup = time_matmul(weight, tokens) / time_matmul(compressed, tokens)
                rows.append((f"2:4 matmul {shape[0]}x{shape[1]}, {tokens} tokens", f"{speedup:.2f}x", "vs dense"))
        summary = to_semi_structured(sparse)
        rows.append(("2:4 layers on sparse kernels", f"{len(summary.converted)}", f"{len(summary.dense)} left dense"))
        for batch in (1, 16):
            base = measure_speed(dense_bf16, batch_size=batch, new_tokens=args.new_tokens)
            fast = measure_speed(sparse, batch_size=batch, new_tokens=args.new_tokens)
            rows += speed_rows("2:4", fast, base, device.type)
    else:
        rows.append(("2:4 kernels", "skipped", "need CUDA with compute capability >= 8.0"))
    del sparse

    # 3. Width pruning.
    small = copy.deepcopy(model)
    shrink(small, batches, mlp=0.5, heads=1 / 3, num_samples=None)
    small = small.to(torch.bfloat16).to(device)
    for batch in (1, 16):
        base = measure_speed(dense_bf16, batch_size=batch, new_tokens=args.new_tokens)
        fast = measure_speed(small, batch_size=batch, new_tokens=args.new_tokens)
        rows += speed_rows("shrunk (MLP -50 %, 2 of 3 KV groups)", fast, base, device.type)
    rows.append(("total time", f"{time.perf_counter() - started:.0f} s", device.type))
    print()
    print_table(("check", "result", "detail"), rows)
    results["rows"] = [dict(check=c, result=r, detail=d) for c, r, d in rows]
    write_json(args.json, results)


if __name__ == "__main__":
    main()
