"""Benchmark: gradual pruning on a schedule against one-shot pruning followed by the same training, on SmolLM2-135M.

For each target sparsity, two Lightning runs from the same dense SmolLM2-135M, on the same training batches (windows
of the first 70 % of `pydoc_data.topics`, after the calibration windows, in the same order) with the same optimizer:

- one-shot: `WandaPruningCallback(prune_on=Schedule(end_step=1, start_step=0, every_n_steps=1))` prunes to the
  target after the first optimizer step, then trains `--steps` more steps with the masks kept;
- schedule: `WandaPruningCallback(prune_on=Schedule(end_step=--ramp, start_step=0, every_n_steps=--every))`
  re-scores with Wanda and prunes along the cubic ramp, training in between, for `--steps` steps in all.

The one-shot run trains one step more (the dense one before pruning), which can only help it. Both calibrate on the same
16 x 256 windows and are measured on the same held-out windows of the last 30 % (perplexity, float32). The token
embeddings (tied to the head, never pruned) are frozen in every run to save time; everything else trains (AdamW).

    python benchmarks/bench_schedule.py --json benchmarks/results/schedule.json

`--arms one-shot` or `--arms schedule` runs one of the two (the runs are deterministic: the same numbers whether the
arms run in one process or in two side by side; only the wall times differ).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

import lightning.pytorch as pl
from _common import machine, print_table, write_json
from torch.utils.data import DataLoader

from wanda_lightning import CausalLMModule, Schedule, WandaPruningCallback, prune
from wanda_lightning.cli.demo import WindowDataset
from wanda_lightning.core.options import CalibrationOptions
from wanda_lightning.data.corpus import pydoc_text, split_tokens, token_windows
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train(
    base: Any, data: dict[str, Any], args: argparse.Namespace, sparsity: float, end_step: int, every: int, steps: int
) -> dict[str, Any]:
    """One Lightning run: prune on the schedule, train ``steps`` steps, measure held-out perplexity."""
    pl.seed_everything(0, verbose=False)
    model = copy.deepcopy(base)
    model.get_input_embeddings().requires_grad_(False)
    model.train()
    module = CausalLMModule(model, learning_rate=args.lr)
    pruning = WandaPruningCallback(
        sparsity=sparsity,
        prune_on=Schedule(end_step=end_step, start_step=0, every_n_steps=every),
        calibration=DataLoader(WindowDataset(data["calibration"]), batch_size=4),
        calibration_options=CalibrationOptions(num_samples=data["calibration"].shape[0]),
        evaluate=False,
        verbose=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[pruning],
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(WindowDataset(data["train"]), batch_size=args.batch_size))
    seconds = time.perf_counter() - start
    weights = [t for n, t in model.named_parameters() if n.endswith("proj.weight")]
    measured = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "ppl": perplexity(model, data["heldout"], batch_size=4),
        "sparsity": measured,
        "pruning_steps": len(pruning._trigger.steps),  # type: ignore[attr-defined]
        "train_steps": trainer.global_step,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.7])
    parser.add_argument("--steps", type=int, default=64, help="training steps of the schedule run (default 64)")
    parser.add_argument("--ramp", type=int, default=48, help="`end_step` of the schedule (default 48)")
    parser.add_argument("--every", type=int, default=8, help="`every_n_steps` of the schedule (default 8)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per training window (default 128)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows of 256 tokens (default 32)")
    parser.add_argument("--arms", nargs="+", choices=["one-shot", "schedule"], default=["one-shot", "schedule"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    base, tokenizer = load_smollm2()
    splits = split_tokens(tokenizer, num_samples=16, seqlen=256, max_eval_windows=args.eval_windows)
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    data = {
        "calibration": splits.calibration,
        "train": token_windows(ids[splits.calibration.numel() : cut], args.seqlen),
        "heldout": splits.heldout,
    }
    needed = (args.steps + 1) * args.batch_size
    if data["train"].shape[0] < needed:
        raise SystemExit(f"only {data['train'].shape[0]} training windows, {needed} needed")

    results: dict[str, Any] = {"dense_ppl": perplexity(base, data["heldout"], batch_size=4), "runs": []}
    rows = [["dense", "-", f"{results['dense_ppl']:.2f}", "0.00%", "-", "-"]]
    print(f"dense held-out perplexity {results['dense_ppl']:.2f}", flush=True)
    for sparsity in args.sparsities:
        untrained = copy.deepcopy(base)
        prune(untrained, [{"input_ids": w} for w in data["calibration"].split(4)], sparsity=sparsity)
        untrained_ppl = perplexity(untrained, data["heldout"], batch_size=4)
        entry: dict[str, Any] = {"sparsity": sparsity, "one_shot_untrained_ppl": untrained_ppl}
        del untrained
        if "one-shot" in args.arms:
            entry["one_shot"] = train(base, data, args, sparsity, end_step=1, every=1, steps=args.steps + 1)
            print(f"{sparsity:.0%} one-shot + train: {entry['one_shot']}", flush=True)
        if "schedule" in args.arms:
            ramp = {"end_step": args.ramp, "every": args.every}
            entry["schedule"] = train(base, data, args, sparsity, **ramp, steps=args.steps)
            print(f"{sparsity:.0%} schedule: {entry['schedule']}", flush=True)
        if "one_shot" in entry and "schedule" in entry:
            entry["improvement"] = 1.0 - entry["schedule"]["ppl"] / entry["one_shot"]["ppl"]
        results["runs"].append(entry)
        rows.append([f"wanda {sparsity:.0%} one-shot, no training", "0", f"{untrained_ppl:.2f}", "-", "-", "-"])
        for key, label in (("one_shot", "one-shot + train"), ("schedule", "schedule")):
            if key in entry:
                run = entry[key]
                change = f"{entry['improvement']:+.1%}" if key == "schedule" and "improvement" in entry else ""
                rows.append(
                    [
                        f"wanda {sparsity:.0%} {label}",
                        str(run["train_steps"]),
                        f"{run['ppl']:.2f}",
                        f"{run['sparsity']:.2%}",
                        f"{run['seconds']:.0f}",
                        change,
                    ]
                )
        write_json(args.json, {"args": vars(args), "machine": machine(), **results})
    print()
    print_table(["run", "train steps", "held-out ppl", "sparsity", "fit s", "schedule vs one-shot"], rows)


if __name__ == "__main__":
    main()
