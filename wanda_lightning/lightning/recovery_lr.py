"""The recovery learning rate: after a callback pruned or shrank the model, train at the learning rate recovery needs,
without editing ``configure_optimizers``.

Recovery needs a far higher learning rate than fine-tuning: about a fifth of the pretraining peak for ~50 % pruning,
more for more (NVIDIA Model-Optimizer's pruning guide; SmolLM2-135M's peak is 3e-3). On SmolLM2 shrunk by half its
MLP after fine-tuning on pydoc, 20 steps of distillation at 1e-4 left it at 2.37x the fine-tuned model's perplexity,
and 20 steps at 5e-4 (10 warm-up steps, cosine to 10 %) at 1.88x (``benchmarks/bench_recovery.py`` runs it for 200).

:class:`RecoverySchedule` sets every optimizer's learning rate to it from the step the callback acted at: a linear
warm-up, then a cosine decay to ``final_ratio`` of it at the fit's last step, replacing the trainer's schedulers for
the rest of the fit (they would pull the learning rate back to theirs). The schedule is a function of the global step,
so a resumed fit goes on exactly where it was.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["RecoverySchedule", "recovery_factor"]


def recovery_factor(step: int, warmup_steps: int, total_steps: float, final_ratio: float = 0.1) -> float:
    """The learning rate at ``step`` steps after the action, as a fraction of the recovery learning rate.

    Linear warm-up over ``warmup_steps`` (``(step + 1) / warmup_steps``), then a cosine decay from 1 to
    ``final_ratio`` at ``total_steps``; constant after the warm-up when ``total_steps`` is infinite.

    Example::

        >>> [round(recovery_factor(s, 2, 6), 3) for s in range(7)]
        [0.5, 1.0, 1.0, 0.868, 0.55, 0.232, 0.1]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps):
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class RecoverySchedule:
    """Puts the trainer's optimizers on the recovery learning rate from the step a callback acted at.

    Args:
        learning_rate: Peak learning rate (each param group keeps its ratio to the optimizer's largest).
        warmup_steps: Linear warm-up steps.
        final_ratio: Fraction of ``learning_rate`` reached at the fit's last step.

    Example::

        schedule = RecoverySchedule(5e-4, warmup_steps=10)
        schedule.install(trainer)  # after the action, in the same fit
    """

    def __init__(self, learning_rate: float, warmup_steps: int, final_ratio: float = 0.1) -> None:
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.final_ratio = final_ratio
        #: The global step recovery started at (kept in the callback's state); ``None`` before.
        self.start_step: int | None = None
        self._installed_for: Any = None

    def install(self, trainer: pl.Trainer) -> None:
        """Sets every optimizer's learning rate from now on (once per fit): starts recovery at the current step the
        first time, goes on from :attr:`start_step` after a resume."""
        if self._installed_for is trainer.optimizers and trainer.optimizers:
            return
        if self.start_step is None:
            self.start_step = trainer.global_step
        start = self.start_step
        total = float(trainer.estimated_stepping_batches) - start

        def factor(_: int) -> float:
            return recovery_factor(trainer.global_step - start, self.warmup_steps, total, self.final_ratio)

        configs = []
        for optimizer in trainer.optimizers:
            top = max(float(group["lr"]) for group in optimizer.param_groups)
            for group in optimizer.param_groups:
                group["initial_lr"] = self.learning_rate * (float(group["lr"]) / top if top > 0 else 1.0)
            configs.append(LRSchedulerConfig(LambdaLR(optimizer, factor), interval="step"))
        trainer.strategy.lr_scheduler_configs = configs
        self._installed_for = trainer.optimizers

    def state_dict(self) -> dict[str, Any]:
        """Where recovery started."""
        return {"start_step": self.start_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`."""
        start = state.get("start_step")
        self.start_step = int(start) if start is not None else None
