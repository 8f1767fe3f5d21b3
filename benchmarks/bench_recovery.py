"""Benchmark: recovery of shrunk and masked SmolLM2-135M inside the Lightning trainer, the real workflow, offline.

The teacher is the model a user would ship: dense SmolLM2 fine-tuned on pydoc (``--teacher-steps`` steps of
4 x 256 tokens, AdamW 1e-4; cached in ``--cache`` so that arms run separately reuse it). Each arm starts from it,
acts at ``prune_on="fit_start"`` (post-fine-tune compression) and trains ``--steps`` more steps of 4 x 256 tokens on
the training windows that follow the teacher's, at the recovery learning rate: ``--lr`` (5e-4, about a fifth of
SmolLM2's 3e-3 pretraining peak, as Model-Optimizer's pruning guide advises for ~50 % pruning) with ``--warmup``
linear warm-up steps and a cosine decay to 10 % of it. Held-out perplexity (non-overlapping 256-token windows of the
last 30 % of pydoc) every ``--eval-every`` steps, as a ratio to the teacher's.

The recovery text: pydoc holds 133 such windows after the teacher's, so 200 steps see each six times. With
``--text docstrings`` they are shuffled among the standard library's docstrings
(:func:`~wanda_lightning.data.corpus.docstring_text`, 1,229 more windows of 256 SmolLM2 tokens that share almost
nothing with pydoc), so that no window is seen twice: distillation takes its targets from the teacher, and any text
serves.

Calibration: the first ``--calibration`` windows of pydoc's training part (16 by default, as in the demo); the
least-squares update alone gains much from more (see the README).

Arms (``--arms``; each writes its rows into the JSON as it goes, so arms run one at a time, across sessions):

- ``shrink-ce`` / ``shrink-kd``: MLP -50 % (``flap`` + least-squares) recovered by plain CE / by the default
  distillation (logits-only forward KL at T = 1 from the teacher);
- ``shrink-rc-ce`` / ``shrink-rc-kd``: the same with ``update="reconstruct"`` (least-squares, then each block trained
  to the dense block's outputs on the calibration activations) before recovery;
- ``2:4-kd`` / ``50%-kd``: ADMM masks, recovered by the default distillation (masks held at zero);
  ``2:4-rc-kd`` / ``50%-rc-kd``: the same masks with ``refine="reconstruct"`` (each block's kept weights trained to
  the dense block's outputs on the calibration activations, the pruned ones held at zero) before recovery;
- ``speed-kd`` / ``depth-speed-kd`` / ``width-speed-kd`` / ``width80-speed-kd`` (the speed target of the depth
  issue, after the same recovery), all ``flap`` + least-squares: the shape that ``shrink(speedup=1.5)`` chose on this
  machine in ``bench_depth.py`` with the previous MLP grid (0, 0.25, 0.5, 0.75): ``mlp=0.75, heads=1/3``; the one it
  chose before near misses were timed again (``layers=0.3, mlp=0.5, heads=1/3``: depth and width); the fastest shape
  of that grid that keeps every head (``mlp=0.75``, 1.47x decode there); and the next width-only step of the finer
  grid (``mlp=0.8``, 1.52x decode in turns in benchmarks/results/depth_speedup.json). ``fine-speed-kd``: the choice
  with the finer grid (``mlp=0.7, heads=1/3``, 1.45x decode in the same turns). ``mix-speed-kd``: the choice with
  every head kept, the default grid since (``layers=0.2, mlp=0.7``: depth and width); ``mix50-speed-kd``: its
  choice once each shape is measured against the dense runs of its own turns (``layers=0.2, mlp=0.5``).

Shrunk arms end with decode and prefill speed of the recovered model and of the teacher, timed in turns
(``--repeats`` runs each, best kept), so each arm's speed-up is measured side by side in its own run.

The recovery learning rate is the library's: ``distill=Distillation(learning_rate=--lr, warmup_steps=--warmup)``
(``weight=0`` for plain CE) puts the optimizer on it when the callback acts.

    python benchmarks/bench_recovery.py --arms shrink-kd [--steps 200] [--json benchmarks/results/recovery.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _common import fit_windows, machine, print_table, speeds_in_turns, write_json
from torch.utils.data import DataLoader

from wanda_lightning import CalibrationOptions, Distillation, WandaPruningCallback, WandaShrinkCallback
from wanda_lightning.cli.demo import WindowDataset
from wanda_lightning.data.corpus import docstring_text, pydoc_text, token_windows
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.data.smollm2 import load_smollm2
from wanda_lightning.lightning import CausalLMModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH = 4
#: about a fifth of SmolLM2's 3e-3 pretraining peak (Model-Optimizer's advice for ~50 % structured pruning)
DEFAULT_LR = 5e-4


def arm_callback(arm: str, calibration: DataLoader, args: argparse.Namespace) -> pl.Callback:
    """The callback of an arm, acting when the fit starts, calibrated on the ``--calibration`` windows, recovering at
    the recovery learning rate (the library's ``Distillation(learning_rate=...)``; ``weight=0`` for plain CE)."""
    kind, update, loss, shape = ARMS[arm]
    recovery = Distillation(weight=1.0 if loss == "kd" else 0.0, learning_rate=args.lr, warmup_steps=args.warmup)
    common: dict[str, Any] = dict(
        calibration=calibration,
        calibration_options=CalibrationOptions(num_samples=None),
        prune_on="fit_start",
        distill=recovery,
        evaluate=False,
        verbose=False,
    )
    if kind == "shrink":
        return WandaShrinkCallback(method="flap", update=update, **shape, **common)
    return WandaPruningCallback(0.5, kind, "admm", refine=update or "none", **common)


MLP_HALF: dict[str, float] = {"mlp": 0.5}
#: ``speedup=1.5``'s choice in ``bench_depth.py`` with the previous MLP grid (0, 0.25, 0.5, 0.75): three quarters of
#: the MLP and one of the three key/value groups
SPEED_SHAPE: dict[str, float] = {"mlp": 0.75, "heads": 1 / 3}
#: its choice before near misses were timed again (benchmarks/results/depth.json): 9 of 30 blocks, half the MLP, one
#: of the three key/value groups
DEPTH_SPEED_SHAPE: dict[str, float] = {"layers": 0.3, "mlp": 0.5, "heads": 1 / 3}
#: the fastest shape of the same grid that keeps every head (1.47x decode there)
WIDTH_SPEED_SHAPE: dict[str, float] = {"mlp": 0.75}
#: ``speedup=1.5``'s choice with the finer MLP grid (0, 0.25, 0.5, 0.6, 0.7, 0.8): 70 % of the MLP and one of the three
#: key/value groups (1.45x decode in turns in benchmarks/results/depth_speedup.json)
FINE_SPEED_SHAPE: dict[str, float] = {"mlp": 0.7, "heads": 1 / 3}
#: the next width-only step of the finer grid (1.52x decode in turns in benchmarks/results/depth_speedup.json)
WIDTH80_SPEED_SHAPE: dict[str, float] = {"mlp": 0.8}
#: ``speedup=1.5``'s choice with every head kept (the default grid since 2026-12-04): 6 of 30 blocks and 70 % of the
#: MLP (benchmarks/results/depth_speedup_default.json)
MIX_SPEED_SHAPE: dict[str, float] = {"layers": 0.2, "mlp": 0.7}
#: its choice once each shape is measured against the dense runs of its own turns: 6 of 30 blocks and half the MLP
#: (benchmarks/results/depth_speedup_paired.json)
MIX50_SPEED_SHAPE: dict[str, float] = {"layers": 0.2, "mlp": 0.5}

#: arm -> (what: "shrink" or a mask structure, shrink update or the masks' ``refine``, recovery loss, shrink shape)
ARMS: dict[str, tuple[str, str | None, str, dict[str, float]]] = {
    "shrink-ce": ("shrink", "least-squares", "ce", MLP_HALF),
    "shrink-kd": ("shrink", "least-squares", "kd", MLP_HALF),
    "shrink-rc-ce": ("shrink", "reconstruct", "ce", MLP_HALF),
    "shrink-rc-kd": ("shrink", "reconstruct", "kd", MLP_HALF),
    "2:4-kd": ("2:4", None, "kd", {}),
    "50%-kd": ("unstructured", None, "kd", {}),
    "2:4-rc-kd": ("2:4", "reconstruct", "kd", {}),
    "50%-rc-kd": ("unstructured", "reconstruct", "kd", {}),
    "speed-kd": ("shrink", "least-squares", "kd", SPEED_SHAPE),
    "depth-speed-kd": ("shrink", "least-squares", "kd", DEPTH_SPEED_SHAPE),
    "width-speed-kd": ("shrink", "least-squares", "kd", WIDTH_SPEED_SHAPE),
    "width80-speed-kd": ("shrink", "least-squares", "kd", WIDTH80_SPEED_SHAPE),
    "fine-speed-kd": ("shrink", "least-squares", "kd", FINE_SPEED_SHAPE),
    "mix-speed-kd": ("shrink", "least-squares", "kd", MIX_SPEED_SHAPE),
    "mix50-speed-kd": ("shrink", "least-squares", "kd", MIX50_SPEED_SHAPE),
}


def speedups(teacher: torch.nn.Module, student: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Decode and prefill speed-ups of ``student`` over ``teacher``, timed in turns (best of ``repeats`` each)."""
    best = speeds_in_turns({"teacher": teacher, "student": student}, repeats)
    return {
        "parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        **{f"teacher_{key}": value for key, value in best["teacher"].items()},
        **{key: value for key, value in best["student"].items()},
        "decode_speedup": best["student"]["decode_tokens_per_second"] / best["teacher"]["decode_tokens_per_second"],
        "prefill_speedup": best["student"]["prefill_tokens_per_second"] / best["teacher"]["prefill_tokens_per_second"],
    }


class EvalEvery(pl.Callback):
    """Held-out perplexity of the module's model when training starts (after the callbacks before it acted) and every
    ``every`` steps; calls ``report(step, ppl)`` each time."""

    def __init__(self, windows: torch.Tensor, every: int, report: Any) -> None:
        self.windows, self.every, self.report = windows, every, report

    def on_train_start(self, trainer: pl.Trainer, pl_module: CausalLMModule) -> None:
        self.report(0, perplexity(pl_module.model, self.windows))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: CausalLMModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            self.report(step, perplexity(pl_module.model, self.windows))


def pydoc_windows(tokenizer: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training windows, held-out windows)``: pydoc tokenised once and cut at 70 %, ``args.seqlen`` tokens a
    window, ``args.eval_windows`` held-out ones."""
    tokens = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(tokens.numel() * 0.7)
    return token_windows(tokens[:cut], args.seqlen), token_windows(tokens[cut:], args.seqlen, args.eval_windows)


def teacher_state(args: argparse.Namespace, model: torch.nn.Module, train: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fine-tuned dense weights, from the cache when an earlier run made them with the same settings."""
    path = Path(args.cache) / f"teacher-{args.teacher_steps}steps-{args.seqlen}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    module = CausalLMModule(model, learning_rate=1e-4)
    fit_windows(module, train[: args.teacher_steps * BATCH], args.teacher_steps, [])
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(state, path)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", required=True, choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=200, help="recovery steps of 4 x seqlen tokens (default 200)")
    parser.add_argument("--teacher-steps", type=int, default=40, help="fine-tuning steps of the teacher (default 40)")
    parser.add_argument(
        "--lr",
        type=float,
        default=DEFAULT_LR,
        help="recovery peak learning rate (default 5e-4; other values are kept in the JSON as '<arm> lr=<value>')",
    )
    parser.add_argument(
        "--text",
        choices=["pydoc", "docstrings"],
        default="pydoc",
        help="recovery text: the pydoc windows after the teacher's (133, cycled), or those shuffled among the standard "
        "library's docstrings (distinct windows; kept in the JSON as '<arm> +docstrings')",
    )
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    parser.add_argument("--eval-every", type=int, default=50, help="steps between perplexities (default 50)")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows (default 32)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument(
        "--calibration",
        type=int,
        default=16,
        help="calibration windows, the first of pydoc's training part (default 16; others are kept in the JSON as "
        "'<arm> cal=<n>')",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of shrunk arms and teacher (default 5)")
    parser.add_argument("--cache", default="/tmp/wanda-recovery", help="where the teacher's weights are cached")
    parser.add_argument("--json", default=None, help="JSON file the arms accumulate into")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    windows, heldout = pydoc_windows(tokenizer, args)
    calibration, train = windows[: args.calibration], windows[16:]  # the teacher's windows stay the same
    state = teacher_state(args, model, train)
    model.load_state_dict(state)
    teacher_ppl = perplexity(model, heldout)
    recovery = train[args.teacher_steps * BATCH :]
    needed = args.steps * BATCH
    if args.text == "docstrings":  # the pydoc windows among distinct ones, in a fixed shuffled order
        extra = token_windows(tokenizer(docstring_text(), return_tensors="pt").input_ids[0], args.seqlen)
        recovery = torch.cat([recovery, extra])
        recovery = recovery[torch.randperm(recovery.shape[0], generator=torch.Generator().manual_seed(0))]
    recovery = recovery.repeat(math.ceil(needed / recovery.shape[0]), 1)[:needed]  # cycle the windows if too few
    distinct = min(recovery.shape[0], len({tuple(window.tolist()) for window in recovery}))
    print(f"recovery: {needed} windows of {args.seqlen} tokens, {distinct} distinct", flush=True)

    results: dict[str, Any] = {}
    if args.json and Path(args.json).exists():
        results = json.loads(Path(args.json).read_text()).get("arms", {})
    payload = {"benchmark": "recovery", "machine": machine(), "teacher_perplexity": teacher_ppl, "arms": results}
    mine: set[str] = set()

    def save() -> None:
        """Writes the JSON with the arms other runs wrote to it since this one started (theirs kept, ours updated)."""
        if args.json and Path(args.json).exists():
            for name, result in json.loads(Path(args.json).read_text()).get("arms", {}).items():
                if name not in mine:
                    results[name] = result
        write_json(args.json, payload)

    for kind in args.arms:
        # an arm run at another learning rate is kept beside the default one, not written over it
        arm = (
            kind
            + ("" if args.lr == DEFAULT_LR else f" lr={args.lr:g}")
            + ("" if args.text == "pydoc" else " +docstrings")
            + ("" if args.calibration == 16 else f" cal={args.calibration}")
        )
        rows: list[dict[str, Any]] = []
        what, update, loss, shape = ARMS[kind]
        results[arm] = {
            "args": {k: v for k, v in vars(args).items() if k != "arms"},
            "arm": {"what": what, "update": update, "loss": loss, "shape": shape},
            "rows": rows,
        }
        mine.add(arm)
        start = time.perf_counter()

        def report(
            step: int, ppl: float, arm: str = arm, rows: list[dict[str, Any]] = rows, start: float = start
        ) -> None:
            rows.append(
                {"step": step, "perplexity": ppl, "ratio": ppl / teacher_ppl, "seconds": time.perf_counter() - start}
            )
            print(f"{arm}: step {step}, perplexity {ppl:.2f} ({ppl / teacher_ppl:.2f}x the teacher)", flush=True)
            save()

        module = CausalLMModule(copy.deepcopy(model), learning_rate=args.lr)
        calibrate = DataLoader(WindowDataset(calibration), batch_size=4)
        callback = arm_callback(kind, calibrate, args)
        fit_windows(module, recovery, args.steps, [callback, EvalEvery(heldout, args.eval_every, report)])
        reconstructed = callback.report.reconstruction_error if callback.report is not None else None
        if reconstructed is not None:
            results[arm]["reconstruction"] = {
                "error_before_after": reconstructed,
                "seconds": callback.report.reconstruction_seconds,
                "dense_forward_seconds": callback.report.dense_forward_seconds,
            }
            save()
        if what == "shrink":
            results[arm]["speed"] = speedups(model, module.model, args.repeats)
            print(
                f"{arm}: decode {results[arm]['speed']['decode_speedup']:.2f}x, "
                f"prefill {results[arm]['speed']['prefill_speedup']:.2f}x the teacher",
                flush=True,
            )
            save()
    print(f"\nteacher (dense fine-tuned {args.teacher_steps} steps): held-out perplexity {teacher_ppl:.2f}")
    table = []
    for arm, result in results.items():
        table.append([arm, *(f"{row['perplexity']:.2f} ({row['ratio']:.2f}x)" for row in result["rows"])])
    width = max(len(row) for row in table) if table else 1
    steps_seen = next(iter(results.values()))["rows"] if results else []
    header = ["arm", *(f"step {row['step']}" for row in steps_seen)]
    print_table(header[:width], [row + [""] * (width - len(row)) for row in table])
    save()


if __name__ == "__main__":
    main()
