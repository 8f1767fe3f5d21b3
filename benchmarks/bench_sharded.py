"""Benchmark: pruning SmolLM2-135M sharded by FSDP2 over 2 CPU processes (gloo) under Lightning's ModelParallelStrategy.

Each process holds half of every decoder weight's rows (``fully_shard`` per decoder block and on the whole model,
as ``CausalLMModule.configure_model`` does) and calibrates on its half of the 16 x 256 calibration windows (the
validation dataloader's ``DistributedSampler``). ``WandaPruningCallback(prune_on="validate", evaluate=False)`` prunes
with all-reduced statistics and shard-local masks. Measured: the callback's ``prune()`` time next to one process
pruning the unsharded model on all 16 windows (same 2 cores), the masks' agreement, peak RSS per process, and the
bytes moved by collectives during pruning: all-reduces (statistics) versus FSDP2's own all-gathers (the forward
passes of calibration), next to the bytes of the pruned weights.

    python benchmarks/bench_sharded.py [--json benchmarks/results/sharded.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import torch
from _common import machine, print_table, read_rss_mib, write_json

# The multi-process launcher is test code (tests/helpers), not part of the installed package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers.processes import CollectiveCounter, launch_processes

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _data(samples: int, seqlen: int) -> tuple[Any, torch.Tensor]:
    from wanda_lightning.data.corpus import split_tokens
    from wanda_lightning.data.smollm2 import load_smollm2

    model, tokenizer = load_smollm2()
    return model, split_tokens(tokenizer, num_samples=samples, seqlen=seqlen, max_eval_windows=1).calibration


def worker(out: str, samples: int, seqlen: int, batch_size: int) -> None:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from wanda_lightning import WandaPruningCallback
    from wanda_lightning.core.options import CalibrationOptions
    from wanda_lightning.lightning.module import CausalLMModule

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model, calibration = _data(samples, seqlen)
    loader = DataLoader([{"input_ids": ids} for ids in calibration], batch_size=batch_size, shuffle=False)
    counter = CollectiveCounter()

    class Counted(WandaPruningCallback):
        def _run(self, *args: Any, **kwargs: Any) -> Any:
            with counter.counting():
                return super()._run(*args, **kwargs)

    callback = Counted(
        sparsity=0.5,
        calibration_options=CalibrationOptions(num_samples=None),
        prune_on="validate",
        evaluate=False,
        verbose=False,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    module = CausalLMModule(model)
    trainer.validate(module, loader, verbose=False)
    assert callback.report is not None
    local_rows = {n: p.to_local().shape[0] for n, p in module.named_parameters() if n.endswith("proj.weight")}
    full = {n: (p.full_tensor() == 0) for n, p in module.named_parameters() if n.endswith("proj.weight")}
    pruned_bytes = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if n.endswith("proj.weight"))
    result = dict(
        seconds=callback.report.total_seconds,
        calibration_seconds=callback.report.calibration_seconds,
        peak_rss_mib=read_rss_mib("VmHWM"),
        collectives={k: v for k, v in counter.counts.items() if not k.endswith("_calls")},
        sparsity=callback.global_sparsity,
        local_rows=local_rows,
        pruned_weight_bytes=pruned_bytes,
        masks=full if rank == 0 else None,
        num_batches=callback.report.num_batches,
    )
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def launch(out: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    command = [sys.executable, __file__, "--worker", out, "--samples", str(args.samples), "--seqlen", str(args.seqlen)]
    return launch_processes([*command, "--batch-size", str(args.batch_size)], out, timeout=1800, capture=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.samples, args.seqlen, args.batch_size)
        return

    from wanda_lightning import prune

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        ranks = launch(out, args)
        wall = time.perf_counter() - start

    # One process, unsharded, all windows, both cores.
    model, calibration = _data(args.samples, args.seqlen)
    batches = [{"input_ids": ids} for ids in calibration.split(args.batch_size)]
    report = prune(model, batches, sparsity=0.5, num_samples=None)
    single = {f"model.{n}": p == 0 for n, p in model.named_parameters() if n.endswith("proj.weight")}
    masks = ranks[0]["masks"]
    same = sum(int((masks[n] == single[n]).sum()) for n in single)
    agreement = same / sum(m.numel() for m in single.values())
    in_features_bytes = sum(p.shape[1] * 4 for n, p in model.named_parameters() if n.endswith("proj.weight"))

    rows = []
    for rank, result in enumerate(ranks):
        collectives = result["collectives"]
        rows.append(
            [
                f"FSDP2 rank {rank} ({result['num_batches']} batches)",
                f"{result['seconds']:.1f}",
                f"{result['seconds'] / report.total_seconds:.2f}",
                f"{result['peak_rss_mib']:.0f}",
                f"{collectives.get('all_reduce', 0) / 2**20:.2f}",
                f"{sum(v for k, v in collectives.items() if k.startswith('all_gather')) / 2**20:.1f}",
                f"{result['sparsity']:.4f}",
            ]
        )
    single_row = ["1 process, unsharded", f"{report.total_seconds:.1f}", "1.00", "", "", ""]
    rows.append([*single_row, f"{report.global_sparsity:.4f}"])
    print()
    print_table(["run", "prune s", "x 1 process", "peak RSS MiB", "all-reduce MiB", "all-gather MiB", "sparsity"], rows)
    print(
        f"\nmask agreement with one process over all {len(batches)} batches: {agreement:.6f}; "
        f"pruned weights: {ranks[0]['pruned_weight_bytes'] / 2**20:.1f} MiB; statistics all-reduced per rank: "
        f"{ranks[0]['collectives'].get('all_reduce', 0) / 2**20:.2f} MiB (sum of in_features x 4 B = "
        f"{in_features_bytes / 2**20:.2f} MiB per statistic); wall time of the 2-process run with model loading: "
        f"{wall:.0f} s"
    )
    write_json(
        args.json,
        dict(
            benchmark="bench_sharded",
            args=vars(args),
            machine=machine(),
            single_process_seconds=report.total_seconds,
            agreement=agreement,
            ranks=[{k: v for k, v in r.items() if k != "masks"} for r in ranks],
        ),
    )


if __name__ == "__main__":
    main()
