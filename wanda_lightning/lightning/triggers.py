"""When a callback acts: one small trigger object per ``prune_on`` mode, consulted by the callback's hooks.

Each hook of the callback asks its trigger whether the action is due now; a trigger answers with a :class:`Due`
(what to call the moment, for the summary) or ``None``. A new mode is a new trigger, not a new branch in every hook.

Example::

    >>> trigger = make_trigger("train_epoch_end", epoch=2)
    >>> type(trigger).__name__, trigger.describe()
    ('AfterEpoch', 'end of epoch 2')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

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
    "Trigger",
    "make_trigger",
]

PruneOn = Literal["fit_end", "train_epoch_end", "validate", "checkpoint", "train_step", "fit_start"]
PRUNE_ON: tuple[str, ...] = get_args(PruneOn)


@dataclass(frozen=True)
class Due:
    """The action is due now.

    Attributes:
        when: What to call this moment in the summary (``"end of fit"``, ``"end of epoch 2"``).
        stopped_early: The fit ended before its planned last step, so checkpoints saved during it are dense.
    """

    when: str
    stopped_early: bool = False


class Trigger:
    """Base trigger: never due. Subclasses answer the hooks that concern them.

    Attributes:
        name: The ``prune_on`` value.
        checks_at_train_start: Whether ``on_train_start`` checks that the action will be possible (so a
            misconfigured run fails before it trains).
        on_checkpoints: The action runs on each saved checkpoint's copy of the weights, never on the live model.
    """

    name: str = ""
    checks_at_train_start: bool = True
    on_checkpoints: bool = False

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
                f"WandaPruningCallback: training ended at epoch {trainer.current_epoch} before the end of `epoch`="
                f"{self.epoch}, so nothing was pruned"
            )
        return None

    def describe(self) -> str:
        return f"end of epoch {self.epoch}"


class AfterStep(Trigger):
    """After ``step`` optimizer steps (when ``trainer.global_step`` reaches it); training then goes on with the result.
    A run resumed past that step acts when it starts."""

    name = "train_step"

    def __init__(self, step: int) -> None:
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


def make_trigger(prune_on: str, epoch: int | None, step: int | None = None) -> Trigger:
    """The trigger for a ``prune_on`` value (with ``epoch`` for ``"train_epoch_end"``, ``step`` for
    ``"train_step"``, and neither otherwise).

    Raises:
        ValueError: For an unknown mode, a missing or negative ``epoch``/``step``, or one given to another mode.
    """
    if prune_on not in PRUNE_ON:
        raise ValueError(f"`prune_on` must be one of {list(PRUNE_ON)}, got {prune_on!r}")
    needs = {
        "epoch": ("train_epoch_end", 0, "the zero-based epoch after which to prune (an int >= 0)"),
        "step": ("train_step", 1, "the number of optimizer steps after which to prune (an int >= 1)"),
    }
    for value, argument in ((epoch, "epoch"), (step, "step")):
        mode, least, meaning = needs[argument]
        if value is not None and prune_on != mode:
            raise ValueError(
                f"`{argument}`={value!r} is only used with `prune_on`={mode!r}, got `prune_on`={prune_on!r}"
            )
        if prune_on == mode and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ValueError(f"`prune_on`={mode!r} needs `{argument}`=k, {meaning}, got {value!r}")
    if prune_on == "train_epoch_end":
        assert epoch is not None
        return AfterEpoch(epoch)
    if prune_on == "train_step":
        assert step is not None
        return AfterStep(step)
    modes: dict[str, type[Trigger]] = {
        "fit_start": AtFitStart,
        "fit_end": AtFitEnd,
        "validate": OnValidate,
        "checkpoint": AtCheckpoints,
    }
    return modes[prune_on]()
