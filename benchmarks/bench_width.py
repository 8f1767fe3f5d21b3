"""Benchmark: width pruning (whole MLP units and KV-head groups) against dense and masked SmolLM2-135M, with recovery
inside the Lightning trainer, fully offline.

Text: CPython's pydoc topics, tokenised once and cut at 70 %: calibration windows (16 x 256) and training windows come
from the first part, held-out perplexity from non-overlapping 256-token windows of the rest. For each model it prints
parameters, decode tokens/s (batch 1, KV cache, 128 new tokens), prefill tokens/s (4 x 256), held-out perplexity and,
for the shrinking rows, the wall time of ``shrink()`` over one plain dense forward pass of the calibration batches
(measured right before it).

Recovery (``--steps N``, 4 x 256 tokens per step in order, the ~290 training windows cycled, AdamW 1e-4): the dense
model is fine-tuned for 2N steps (perplexity recorded after N and after 2N); the model after N steps is then shrunk
with ``WandaShrinkCallback(prune_on="fit_start")`` and trained N steps on the same batches as the dense model's first
N, once with plain fine-tuning and once distilling from that N-step dense model (the fine-tuned dense model of the
post-fine-tune workflow).

    python benchmarks/bench_width.py [--steps 60] [--eval-windows 32] [--json benchmarks/results/width.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from _common import fit_windows, machine, print_table, speeds_in_turns, write_json
from torch.utils.data import DataLoader

from wanda_lightning import WandaShrinkCallback, prune, shrink
from wanda_lightning.cli.demo import WindowDataset
from wanda_lightning.core.options import CalibrationOptions
from wanda_lightning.data.corpus import pydoc_text, token_windows
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2
from wanda_lightning.lightning import CausalLMModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS: dict[str, dict[str, float]] = {"mlp50": dict(mlp=0.5), "mlp50+kv1": dict(mlp=0.5, heads=1 / 3)}
#: (method, update) rows; update None is the method's default (bias compensation for flap, none otherwise).
METHODS: tuple[tuple[str, str | None], ...] = (
    ("wanda-sp", None),
    ("flap", None),
    ("magnitude-sp", None),
    ("wanda-sp", "least-squares"),
    ("flap", "least-squares"),
)


def dense_forward_seconds(model: torch.nn.Module, batches: list[dict]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    return time.perf_counter() - start


def _row_name(method: str, update: str | None) -> str:
    return f"{method}{' + ' + update if update else ''}"


class EvalAt(pl.Callback):
    """Held-out perplexity (and a copy of the weights) of the module's model after the given global steps, before
    later callbacks act."""

    def __init__(self, windows: torch.Tensor, steps: list[int]) -> None:
        self.windows, self.steps = windows, steps
        self.perplexity: dict[int, float] = {}
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.on_train_batch_end(trainer, pl_module, None, None, -1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and trainer.global_step not in self.perplexity:
            self.perplexity[trainer.global_step] = perplexity(pl_module.model, self.windows)
            self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def train(
    model: torch.nn.Module,
    windows: torch.Tensor,
    heldout: torch.Tensor,
    steps: int,
    evaluate_at: list[int],
    callbacks: list[Any],
) -> tuple[CausalLMModule, EvalAt, float]:
    """``steps`` optimizer steps of AdamW (1e-4) on ``windows`` in order, 4 per batch."""
    module = CausalLMModule(model, learning_rate=1e-4)
    evaluate = EvalAt(heldout, evaluate_at)
    seconds = fit_windows(module, windows, steps, [evaluate, *callbacks])
    return module, evaluate, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows scored (default 32)")
    parser.add_argument("--steps", type=int, default=60, help="recovery steps N of 4 x 256 tokens (default 60)")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--recover", nargs="*", default=["mlp50"], choices=list(SETTINGS), help="settings recovered")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each model, in turns (default 5)")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[_row_name(*entry) for entry in METHODS],
        choices=[_row_name(*entry) for entry in METHODS],
        help="width methods run (default: all)",
    )
    parser.add_argument("--no-speed", action="store_true", help="skip the timing (perplexities and recovery only)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    windows = token_windows(ids[:cut], args.seqlen)
    calibration, train_windows = windows[: args.samples], windows[args.samples :]
    heldout = token_windows(ids[cut:], args.seqlen)[: args.eval_windows]
    batches = [{"input_ids": w} for w in calibration.split(8)]
    print(f"SmolLM2-135M fp32, calibration {args.samples} x {args.seqlen}, {heldout.shape[0]} held-out windows")

    rows: list[dict[str, Any]] = []
    models: dict[str, torch.nn.Module] = {}

    def record(name: str, model: torch.nn.Module, **extra: Any) -> dict[str, Any]:
        row = {"name": name, "parameters": sum(p.numel() for p in model.parameters()), **extra}
        row["perplexity"] = perplexity(model, heldout)
        rows.append(row)
        models[name] = model
        print(f"{name}: ppl {row['perplexity']:.2f}", flush=True)
        return row

    dense_row = record("dense", model, setting="dense")
    masked = copy.deepcopy(model)
    prune(masked, batches, sparsity=0.5, num_samples=None)
    record("wanda 50% (masked)", masked, setting="masked")

    best: dict[str, tuple[str, str | None, float, str]] = {}
    for setting in args.settings:
        for method, update in METHODS:
            if _row_name(method, update) not in args.methods:
                continue
            small = copy.deepcopy(model)
            forward = dense_forward_seconds(model, batches)
            report = shrink(small, batches, method=method, update=update, num_samples=None, **SETTINGS[setting])
            row = record(
                f"{_row_name(method, update)} {setting}",
                small,
                setting=setting,
                method=method,
                update=update,
                shrink_seconds=report.total_seconds,
                shrink_over_forward=report.total_seconds / forward,
            )
            if method != "magnitude-sp" and (setting not in best or row["perplexity"] < best[setting][2]):
                best[setting] = (method, update, row["perplexity"], row["name"])

    # Speed depends on the shapes alone, which every method of a setting shares: the dense, the masked and each
    # setting's best model are timed, taking turns run after run so that a disturbance on this shared machine hits
    # them alike; the best run of each is kept and reported for every model of its shape.
    timed = ["dense", "wanda 50% (masked)", *(entry[3] for entry in best.values())]
    print(f"\ntiming {timed} (taking turns)", flush=True)
    speeds = speeds_in_turns({name: models[name] for name in timed}, 0 if args.no_speed else args.repeats)
    for row in rows:
        source = row["name"] if row["name"] in speeds else best[row["setting"]][3]
        row.update({"decode_tokens_per_second": float("nan"), "prefill_tokens_per_second": float("nan")})
        row.update(speeds[source], timed_as=source)
    models.clear()
    del masked

    recovery: list[dict[str, Any]] = []
    if args.recover:
        n = args.steps
        print(f"\nrecovery: {n} steps of 4 x {args.seqlen} tokens", flush=True)
        _, dense_run, seconds = train(copy.deepcopy(model), train_windows, heldout, 2 * n, [n, 2 * n], [])
        recovery.append(
            {
                "name": "dense, fine-tuned",
                "after_n": dense_run.perplexity[n],
                "after_2n": dense_run.perplexity[2 * n],
                "seconds": seconds,
                "parameters": dense_row["parameters"],
            }
        )
        print(f"dense fine-tuned: {dense_run.perplexity}", flush=True)
        # The dense model after N steps is shrunk and is the teacher; recovery sees the N batches the dense run saw
        # first (the training windows in order, again from the start after an epoch).
        fine_tuned = copy.deepcopy(model)
        fine_tuned.load_state_dict(dense_run.states[n])
        for setting in args.recover:
            method, update, _, _ = best.get(setting, ("wanda-sp", None, 0.0, ""))
            for distill in (False, True):
                callback = WandaShrinkCallback(
                    method=method,
                    update=update,
                    prune_on="fit_start",
                    distill=distill,
                    calibration_options=CalibrationOptions(num_samples=None),
                    evaluate=False,
                    calibration=DataLoader(WindowDataset(calibration), batch_size=8),
                    verbose=False,
                    **SETTINGS[setting],
                )
                shrunk = EvalAt(heldout, [0])  # after the shrinking callback: the shrunk model before recovery
                module, run, seconds = train(
                    copy.deepcopy(fine_tuned), train_windows, heldout, n, [n], [callback, shrunk]
                )
                recipe = "distillation" if distill else "fine-tuning"
                name = f"{_row_name(method, update)} {setting}, {recipe}"
                recovery.append(
                    {
                        "name": name,
                        "after_n": shrunk.perplexity[0],
                        "after_2n": run.perplexity[n],
                        "seconds": seconds,
                        "parameters": sum(p.numel() for p in module.parameters()),
                    }
                )
                print(f"{name}: {run.perplexity}", flush=True)

    print()
    header = ("model", "params", "decode tok/s", "x dense", "prefill tok/s", "x dense", "held-out ppl", "shrink/fwd")
    table = []
    for row in rows:
        table.append(
            (
                row["name"],
                f"{row['parameters'] / 1e6:.1f}M",
                f"{row['decode_tokens_per_second']:.1f}",
                f"{row['decode_tokens_per_second'] / dense_row['decode_tokens_per_second']:.2f}x",
                f"{row['prefill_tokens_per_second']:.0f}",
                f"{row['prefill_tokens_per_second'] / dense_row['prefill_tokens_per_second']:.2f}x",
                f"{row['perplexity']:.2f}",
                f"{row['shrink_over_forward']:.2f}x" if "shrink_over_forward" in row else "-",
            )
        )
    print_table(header, table)
    if recovery:
        print()
        n = args.steps
        print_table(
            ("trained", "params", f"ppl after {n} steps (shrunk)", f"ppl after {2 * n} steps", "vs dense", "train s"),
            [
                (
                    r["name"],
                    f"{r['parameters'] / 1e6:.1f}M",
                    f"{r['after_n']:.2f}" if r.get("after_n") else "-",
                    f"{r['after_2n']:.2f}",
                    f"{r['after_2n'] / recovery[0]['after_2n']:.2f}x",
                    f"{r['seconds']:.0f}",
                )
                for r in recovery
            ],
        )
    write_json(args.json, {"machine": machine(), "args": vars(args), "rows": rows, "recovery": recovery})


if __name__ == "__main__":
    main()
