"""When a callback acts: one small trigger object per ``prune_on`` mode, consulted by the callback's hooks.

Each hook of the callback asks its trigger whether the action is due now; a trigger answers with a :class:`Due`
(what to call the moment, for the summary) or ``None``. A new mode is a new trigger, not a new branch in every hook.

Most triggers act once; :class:`Schedule` acts again and again (:attr:`Trigger.repeats`), each time with a higher
sparsity, and keeps where it is in :meth:`Trigger.state_dict` so that a resumed run goes on where it stopped.

Example::

    >>> trigger = make_trigger(AfterEpoch(2))
    >>> type(trigger).__name__, trigger.describe()
    ('AfterEpoch', 'end of epoch 2')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, get_args

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = [
    "PRUNE_ON",
    "AfterEpoch",
    "AfterStep",
    "AtCheckpoints",
    "AtFitEnd",
    "AtFitStart",
    "Due",
    "OnValidate",
    "PruneOn",
    "Schedule",
    "Trigger",
    "make_trigger",
]

PruneOn = Literal["fit_end", "fit_start", "validate", "checkpoint"]
PRUNE_ON: tuple[str, ...] = get_args(PruneOn)


@dataclass(frozen=True)
class Due:
    """The action is due now.

    Attributes:
        when: What to call this moment in the summary (``"end of fit"``, ``"end of epoch 2"``).
        stopped_early: The fit ended before its planned last step, so checkpoints saved during it are dense.
        sparsity: The sparsity to reach now, for a trigger that raises it step by step; ``None``: the configured one.
        step: The global step of a scheduled action (``None`` for the others).
        final: Whether this is the last action (the model is as sparse as it will get: time to export).
    """

    when: str
    stopped_early: bool = False
    sparsity: float | None = None
    step: int | None = None
    final: bool = True


class Trigger:
    """Base trigger: never due. Subclasses answer the hooks that concern them.

    Attributes:
        name: The ``prune_on`` value.
        checks_at_train_start: Whether ``on_train_start`` checks that the action will be possible (so a
            misconfigured run fails before it trains).
        on_checkpoints: The action runs on each saved checkpoint's copy of the weights, never on the live model.
        repeats: The action runs more than once on the live model (a schedule); otherwise once.
    """

    name: str = ""
    checks_at_train_start: bool = True
    on_checkpoints: bool = False
    repeats: bool = False

    def at_train_start(self, trainer: pl.Trainer) -> Due | None:
        """Asked in ``on_train_start``."""
        return None

    def after_train_batch(self, trainer: pl.Trainer, batch_idx: int) -> Due | None:
        """Asked in ``on_train_batch_end``."""
        return None

    def after_train_epoch(self, trainer: pl.Trainer) -> Due | None:
        """Asked in ``on_train_epoch_end``."""
        return None

    def at_train_end(self, trainer: pl.Trainer, acted: bool) -> Due | None:
        """Asked in ``on_train_end``; ``acted`` says whether the action already ran."""
        return None

    def before_validation(self, trainer: pl.Trainer) -> Due | None:
        """Asked in ``on_validation_start``."""
        return None

    def describe(self) -> str:
        """The moment, in words."""
        return self.name

    def acted(self, due: Due) -> None:
        """Told after the action ran for ``due``."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on where this one stopped (saved in the callback's state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""


def _last_in_epoch(trainer: pl.Trainer, batch_idx: int) -> bool:
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(epoch_loop.batch_progress.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches


class AtFitStart(Trigger):
    """When training starts, before the first step: the whole fit trains the result (sparse fine-tuning of a pruned
    model, recovery of a shrunk one)."""

    name = "fit_start"

    def at_train_start(self, trainer: pl.Trainer) -> Due | None:
        return Due("start of fit")

    def describe(self) -> str:
        return "start of fit"


class AtFitEnd(Trigger):
    """After the last training step of ``fit`` (``max_steps`` or the last batch of ``max_epochs``), so the final
    validation, the last checkpoint and anything exported after ``fit`` see the result; a fit that stops early is
    handled in ``on_train_end``."""

    name = "fit_end"

    def after_train_batch(self, trainer: pl.Trainer, batch_idx: int) -> Due | None:
        max_steps_reached = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if max_steps_reached or (_last_in_epoch(trainer, batch_idx) and last_epoch):
            return Due("end of fit")
        return None

    def at_train_end(self, trainer: pl.Trainer, acted: bool) -> Due | None:
        return None if acted else Due("end of fit (stopped early)", stopped_early=True)

    def describe(self) -> str:
        return "end of fit"


class AfterEpoch(Trigger):
    """After the last training batch of epoch ``epoch`` (before that epoch's validation and checkpoint); training then
    goes on with the result. A run resumed from a later epoch acts when it starts."""

    name = "train_epoch_end"

    def __init__(self, epoch: int) -> None:
        _check_step(epoch, "epoch", 0)
        self.epoch = epoch

    def at_train_start(self, trainer: pl.Trainer) -> Due | None:
        # Resumed from a checkpoint of epoch `epoch` saved before the callback acted: act on those weights now.
        return Due(f"resumed after epoch {self.epoch}") if trainer.current_epoch > self.epoch else None

    def after_train_batch(self, trainer: pl.Trainer, batch_idx: int) -> Due | None:
        if _last_in_epoch(trainer, batch_idx) and trainer.current_epoch == self.epoch:
            return Due(self.describe())
        return None

    def after_train_epoch(self, trainer: pl.Trainer) -> Due | None:
        # Fallback when the last batch of the epoch could not be told in advance.
        return Due(self.describe()) if trainer.current_epoch == self.epoch else None

    def at_train_end(self, trainer: pl.Trainer, acted: bool) -> Due | None:
        if not acted:
            rank_zero_warn(
                f"training ended at epoch {trainer.current_epoch} before the end of `epoch`="
                f"{self.epoch}, so nothing was changed"
            )
        return None

    def describe(self) -> str:
        return f"end of epoch {self.epoch}"


class AfterStep(Trigger):
    """After ``step`` optimizer steps (when ``trainer.global_step`` reaches it); training then goes on with the result.
    A run resumed past that step acts when it starts."""

    name = "train_step"

    def __init__(self, step: int) -> None:
        _check_step(step, "step", 1)
        self.step = step

    def at_train_start(self, trainer: pl.Trainer) -> Due | None:
        return Due(f"resumed after step {self.step}") if trainer.global_step >= self.step else None

    def after_train_batch(self, trainer: pl.Trainer, batch_idx: int) -> Due | None:
        return Due(self.describe()) if trainer.global_step >= self.step else None

    def at_train_end(self, trainer: pl.Trainer, acted: bool) -> Due | None:
        if not acted:
            rank_zero_warn(
                f"training ended at step {trainer.global_step} before `step`={self.step}, so nothing was changed"
            )
        return None

    def describe(self) -> str:
        return f"step {self.step}"


class OnValidate(Trigger):
    """``trainer.validate(model)`` acts before validating (once; not during a fit's sanity check)."""

    name = "validate"
    checks_at_train_start = False

    def before_validation(self, trainer: pl.Trainer) -> Due | None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            return Due("validate")
        return None


class AtCheckpoints(Trigger):
    """Every checkpoint saved holds the result, computed on a temporary copy of the weights, while the live run goes
    on unchanged."""

    name = "checkpoint"
    on_checkpoints = True


class Schedule(Trigger):
    """Gradual pruning (Zhu & Gupta, 2017): every ``every_n_steps`` optimizer steps from ``start_step`` to
    ``end_step``, the model is pruned again at the sparsity of a cubic ramp from 0 to the callback's ``sparsity`` ``S``,

    ``s(t) = S * (1 - (1 - (t - start_step) / (end_step - start_step)) ** 3)``,

    and a last time at ``end_step`` (at ``S``) when the steps do not land on it. Training goes on between the steps;
    each acts after the optimizer step that reaches it. The last step acted on is saved in the callback's state: a
    resumed run goes on with the next one (and catches up with one it missed).

    Args:
        end_step: Global step where the ramp reaches the callback's ``sparsity``; greater than ``start_step``.
        start_step: Global step where the ramp starts (sparsity 0 there, so nothing is pruned at it).
        every_n_steps: Steps between two pruning steps; default a tenth of the ramp (at least 1).

    Raises:
        ValueError: For ``end_step <= start_step``, a negative ``start_step`` or ``every_n_steps < 1``.

    Example::

        >>> schedule = Schedule(end_step=200, every_n_steps=50).toward(0.7)
        >>> [(step, round(schedule.sparsity_at(step), 4)) for step in schedule.steps]
        [(50, 0.4047), (100, 0.6125), (150, 0.6891), (200, 0.7)]
        >>> Schedule(end_step=100).steps[:3]
        [10, 20, 30]
    """

    name = "schedule"
    repeats = True

    def __init__(self, end_step: int, start_step: int = 0, every_n_steps: int | None = None) -> None:
        _check_step(start_step, "start_step", 0)
        _check_step(end_step, "end_step", 0)
        if end_step <= start_step:
            raise ValueError(f"`end_step`={end_step!r} must be greater than `start_step`={start_step!r}")
        every = max(1, (end_step - start_step) // 10) if every_n_steps is None else every_n_steps
        _check_step(every, "every_n_steps", 1)
        self.start_step = start_step
        self.end_step = end_step
        self.every_n_steps = every
        self.sparsity = 1.0
        self.steps = [*range(start_step + every, end_step, every), end_step]
        self.last_step: int | None = None

    def toward(self, sparsity: float) -> Schedule:
        """This schedule, ramping to ``sparsity`` (the callback sets its own ``sparsity`` here)."""
        self.sparsity = sparsity
        return self

    def sparsity_at(self, step: int) -> float:
        """The ramp's sparsity at global step ``step`` (0 before ``start_step``, ``sparsity`` from ``end_step`` on)."""
        progress = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        return self.sparsity * (1.0 - (1.0 - progress) ** 3)

    def _due(self, step: int) -> Due | None:
        if self.last_step is not None and step <= self.last_step:
            return None
        sparsity = self.sparsity_at(step)
        final = step >= self.end_step
        return Due(f"step {step} of the schedule ({sparsity:.2%})", sparsity=sparsity, step=step, final=final)

    def at_train_start(self, trainer: pl.Trainer) -> Due | None:
        # Resumed after a scheduled step whose pruning the checkpoint does not hold: catch up at that step's sparsity.
        missed = [step for step in self.steps if step <= trainer.global_step]
        return self._due(missed[-1]) if missed else None

    def after_train_batch(self, trainer: pl.Trainer, batch_idx: int) -> Due | None:
        step = trainer.global_step
        return self._due(step) if step in self.steps else None

    def at_train_end(self, trainer: pl.Trainer, acted: bool) -> Due | None:
        if self.last_step is None or self.last_step < self.end_step:
            reached = self.sparsity_at(self.last_step) if self.last_step is not None else 0.0
            rank_zero_warn(
                f"training ended at step {trainer.global_step}, before `end_step`={self.end_step}: the schedule "
                f"reached sparsity {reached:.2%}, not {self.sparsity:.2%}"
            )
        return None

    def acted(self, due: Due) -> None:
        self.last_step = due.step

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last = state.get("last_step")
        self.last_step = int(last) if last is not None else None

    def describe(self) -> str:
        return (
            f"schedule to {self.sparsity:.2%} over steps {self.start_step}-{self.end_step}, every {self.every_n_steps}"
        )


def _check_step(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def make_trigger(prune_on: PruneOn | Trigger) -> Trigger:
    """The callback's own trigger for ``prune_on``: a mode name or a :class:`Trigger` object, which is copied (its
    progress is the callback's).

    Raises:
        ValueError: For an unknown mode, or a mode that needs a moment (``"train_epoch_end"``, ``"train_step"``,
            ``"schedule"``: pass the trigger object instead).

    Example::

        >>> make_trigger(AfterStep(100)).describe()
        'step 100'
        >>> make_trigger(Schedule(end_step=200)).describe()
        'schedule to 100.00% over steps 0-200, every 20'
    """
    if isinstance(prune_on, Trigger):
        return copy.deepcopy(prune_on)
    objects = {
        "schedule": "Schedule(end_step=..., start_step=..., every_n_steps=...)",
        "train_epoch_end": "AfterEpoch(k) (k: the zero-based epoch after which to act)",
        "train_step": "AfterStep(k) (k: the optimizer steps after which to act)",
    }
    if prune_on in objects:
        raise ValueError(
            f"`prune_on`={prune_on!r} needs its moment: pass prune_on={objects[prune_on]} (from wanda_lightning; in "
            "YAML a class_path with init_args)"
        )
    if prune_on not in PRUNE_ON:
        raise ValueError(
            f"`prune_on` must be one of {list(PRUNE_ON)} or a Trigger such as AfterEpoch(k), AfterStep(k) or "
            f"Schedule(...), got {prune_on!r}"
        )
    modes: dict[str, type[Trigger]] = {
        "fit_start": AtFitStart,
        "fit_end": AtFitEnd,
        "validate": OnValidate,
        "checkpoint": AtCheckpoints,
    }
    return modes[prune_on]()
