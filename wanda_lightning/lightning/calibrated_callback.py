r"""
CalibratedCallback
^^^^^^^^^^^^^^^^^^

The base of the callbacks that change a LightningModule from calibration data at one moment of a run (or at each step
of a schedule): :class:`~wanda_lightning.WandaPruningCallback` (masks) and :class:`~wanda_lightning.WandaShrinkCallback`
(whole units removed).

The base owns every hook and the state; a subclass says what its action is (:meth:`CalibratedCallback.apply`) and what
it needs. The parts it orchestrates: :mod:`~wanda_lightning.lightning.triggers` (when), :mod:`.calibration` (batches
and forward, modules without ``forward`` included), :mod:`.evaluation` (metrics before and after),
:mod:`.summary` (loggers, ``trainer.callback_metrics``, the table), :mod:`.strategies` and :mod:`.distillation`
(recovery from the model as it was).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from copy import deepcopy
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader

from ..core import CalibrationOptions, check_bool, default_forward
from .calibration import (
    CalibrationData,
    CalibrationSource,
    first_loader,
    has_forward,
    validation_loaders,
    warn_if_no_validation,
)
from .distillation import Distillation, DistillationPhase, student_of
from .errors import misconfiguration
from .evaluation import measure_validation, quiet_steps, run_step
from .recovery_lr import RecoverySchedule
from .strategies import check_strategy, is_sharded_strategy
from .summary import format_summary, log_to_loggers, metric_deltas, publish_metrics
from .triggers import Due, PruneOn, Trigger, make_trigger

__all__ = ["CalibratedCallback"]


class CalibratedCallback(Callback, ABC):
    r"""The base of callbacks that change a LightningModule from calibration data at one moment of a run (or at each
    step of a schedule), measure its validation metrics before and after, report, and optionally distil from the
    module as it was while training goes on.

    The base owns every hook and the state: the trigger, the calibration batches and forward (a module without
    ``forward`` runs its ``validation_step``/``training_step``), the dense and after measurements, logging to every
    logger and to ``trainer.callback_metrics`` (so ``ModelCheckpoint`` and ``EarlyStopping`` can monitor
    ``<metric>/dense``, ``<metric>/<stage>`` and ``<metric>/delta``), the summary, strategy checks, the state with its
    version, and distillation.

    How to subclass (as :class:`~wanda_lightning.WandaPruningCallback` and :class:`~wanda_lightning.WandaShrinkCallback`
    do):

    - Must provide :meth:`apply` (the action: change the module from the batches, return a report with ``to_dict``
      and, as :attr:`report_class`, ``from_dict``) and :attr:`acted` (whether the module holds the action's result).
    - May provide :meth:`plan` (find and check what the action will change; made once per act and handed to
      :meth:`apply`; a ``ValueError`` there is reported as a configuration error before anything changes),
      :meth:`action_metrics`, :meth:`on_action_done`, :meth:`on_restored`, :meth:`on_run_finished`,
      :meth:`extra_state`/:meth:`load_extra_state`, :meth:`check_trigger`, :attr:`needs_calibration`, and the class
      attributes :attr:`stage`, :attr:`reshapes_model`, :attr:`STATE_VERSION`.
    - Pass the base's keyword arguments through ``super().__init__(**kwargs)``.

    Args:
        calibration: ``"val"``: the trainer's validation dataloader (the first one, as the trainer processed it, with
            its distributed sampler); ``"train"``: the training dataloader; or a ``DataLoader`` (or any iterable of
            batches), whose batches are split between DDP processes.
        calibration_options: How calibration runs (:class:`~wanda_lightning.CalibrationOptions`); default
            ``CalibrationOptions()``.
        prune_on: When to act: a mode name (``"fit_end"``, ``"fit_start"``, ``"validate"``, ``"checkpoint"``) or a
            trigger object: :class:`~wanda_lightning.AfterEpoch`, :class:`~wanda_lightning.AfterStep`,
            :class:`~wanda_lightning.Schedule`.
        distill: While training goes on after the action, distil from the module as it was just before it
            (``True`` for the defaults of :class:`~wanda_lightning.Distillation`, or one with your settings).
        evaluate: Measure the module's validation metrics before and after the action and log the deltas: ``True``
            on as many validation batches (per process) as the trainer validates, an ``int`` on at most that many,
            ``False`` not at all.
        verbose: Print the summary on rank zero.

    Example::

        class MagnitudeMLP(CalibratedCallback):  # zero the smallest half of every MLP weight at the end of fit
            stage = "masked"
            report_class = MyReport

            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.done = False

            @property
            def acted(self):
                return self.done

            def apply(self, trainer, pl_module, batches, due, plan):
                ...  # change pl_module
                self.done = True
                return MyReport(...)
    """

    #: Version of :meth:`state_dict`'s layout (a subclass raises it when its own part changes).
    STATE_VERSION: ClassVar[int] = 1
    #: What the action makes of the model, in metric names and the summary (``"<metric>/pruned"``).
    stage: ClassVar[str] = "changed"
    #: Whether the action changes the shapes of weights (refuses sharded strategies and spawning launchers).
    reshapes_model: ClassVar[bool] = False
    #: The class of :attr:`report` (restored with its ``from_dict``).
    report_class: ClassVar[Any] = None

    def __init__(
        self,
        *,
        calibration: CalibrationSource | DataLoader = "val",
        calibration_options: CalibrationOptions | None = None,
        prune_on: PruneOn | Trigger = "fit_end",
        distill: bool | Distillation = False,
        evaluate: bool | int = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        with misconfiguration():
            self.calibration_options = CalibrationOptions.resolve(calibration_options)
            self._trigger = make_trigger(prune_on)
            self.check_trigger(self._trigger)
            self._distillation = DistillationPhase(Distillation.resolve(distill))
            recovery = self._distillation.options
            self._recovery_lr = (
                RecoverySchedule(recovery.learning_rate, recovery.warmup_steps)
                if recovery is not None and recovery.learning_rate is not None
                else None
            )
            if not isinstance(evaluate, bool) and (not isinstance(evaluate, int) or evaluate < 1):
                raise ValueError(
                    f"`evaluate` must be True, False or a positive number of validation batches, got {evaluate!r}"
                )
            check_bool(verbose, "verbose")
            options = self.calibration_options
            self._calibration = CalibrationData(
                calibration, options.num_samples, options.batch_size, self.calibration_forward
            )
        self.calibration = calibration
        self.prune_on = prune_on
        self.distill = self._distillation.options
        self.evaluate = evaluate
        self.verbose = verbose

        self.report: Any = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.evaluation_seconds = 0.0
        #: A schedule's dense measurement, taken before its first step and kept for the deltas of the later ones.
        self._dense_metrics: dict[str, float] | None = None
        self._when = "a restored checkpoint"
        self._acted_in_this_run = False

    # --- what a subclass says ---------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def acted(self) -> bool:
        """Whether the action ran on the live module (or its result was restored from a checkpoint)."""

    @property
    def needs_calibration(self) -> bool:
        """Whether the action needs calibration batches."""
        return True

    def check_trigger(self, trigger: Trigger) -> None:
        """Raises ``ValueError`` for a trigger the action cannot follow (called when constructed)."""

    def plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Finds and checks what the action will change on ``pl_module`` as it is now, before anything changes; made
        once per act (also before training, as a check) and handed to :meth:`apply`. Raises ``ValueError`` or
        ``TypeError`` when the action cannot run on this module (reported as a ``MisconfigurationException``).
        Default: ``None``."""
        return None

    @abstractmethod
    def apply(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any] | None, due: Due, plan: Any
    ) -> Any:
        """The action: changes ``pl_module`` from ``batches`` (``None`` when not :attr:`needs_calibration`) as ``plan``
        (from :meth:`plan`) says, and returns its report. Runs under ``no_grad`` and the precision plugin's forward
        context; :meth:`forward` runs the module on one batch. What it raises propagates as it is."""

    def action_metrics(self) -> dict[str, float]:
        """What the last action did, logged and published in ``trainer.callback_metrics`` (``wanda/sparsity``)."""
        return {}

    def logged_only_metrics(self) -> dict[str, float]:
        """Further values for the loggers alone (per-layer detail)."""
        return {}

    def on_action_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due, fitting: bool) -> None:
        """After an action on the live module, before distillation starts (keep masks, rebuild optimizers, export)."""

    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """When training starts after the result was restored from a checkpoint (or a validating action)."""

    def on_run_finished(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the end of a fit, or of an acting ``validate``."""

    def extra_state(self) -> dict[str, Any]:
        """The subclass's part of :meth:`state_dict`."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any], version: int) -> None:
        """Restores :meth:`extra_state` from a state of layout ``version``."""

    # --- public ------------------------------------------------------------------------------------------------------

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen model distilled from, once the callback acted with ``distill``."""
        return self._distillation.teacher

    def calibration_forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Runs ``pl_module`` on one calibration batch, already on its device; override for custom batch formats.

        The default calls ``calibration_options.forward_fn(pl_module, batch)`` when given, else
        ``pl_module(**batch)`` for a mapping, ``pl_module(batch[0])`` for a tuple or list and ``pl_module(batch)`` for a
        tensor. A module that does not define ``forward`` runs the step the trainer runs on such batches instead:
        ``training_step(batch, 0)`` for ``calibration="train"``, else ``validation_step(batch, 0)`` (what it logs is
        captured and thrown away, and its torchmetrics states are restored afterwards). It runs in ``no_grad``, under
        the precision plugin's forward context, with the module in eval mode. The output is ignored.

        Args:
            pl_module: The LightningModule being calibrated.
            batch: One calibration batch, after the module's batch-transfer hooks.

        Returns:
            Whatever the forward returns.

        Example::

            class MyPruning(WandaPruningCallback):
                def calibration_forward(self, pl_module, batch):
                    tokens, _labels = batch
                    return pl_module.model(input_ids=tokens)
        """
        forward_fn = self.calibration_options.forward_fn
        if forward_fn is not None:
            return forward_fn(pl_module, batch)
        if not has_forward(pl_module):
            return run_step(pl_module, self._calibration.step_name, batch)
        return default_forward(pl_module, batch)

    def forward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The forward the calibration pipeline calls on each batch (through the FSDP1 root where there is one)."""
        return self._calibration.forward_fn(trainer, pl_module)

    def summary(self) -> str:
        """The summary table: the report, then dense/after/delta for each validation metric, then times."""
        return format_summary(
            type(self).__name__, self.report, self._when, self.metrics, self.evaluation_seconds, self.stage
        )

    # --- hooks -------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy, and that the trigger can work with it."""
        if stage not in ("fit", "validate"):
            return
        with misconfiguration():
            check_strategy(trainer, type(self).__name__, reshapes=self.reshapes_model)
        if is_sharded_strategy(trainer) and self._trigger.repeats:
            raise MisconfigurationException(
                f"`prune_on`={self._trigger.describe()!r} acts again on a partly changed model, which is not "
                f"supported under {type(trainer.strategy).__name__} (sharded weights) yet: use DDP or a single device, "
                "or another `prune_on`"
            )
        if is_sharded_strategy(trainer) and self._trigger.on_checkpoints:
            raise MisconfigurationException(
                "`prune_on`='checkpoint' works on temporary copies of the weights, which FSDP "
                f"({type(trainer.strategy).__name__}) does not allow for its sharded parameters: use 'fit_end', "
                "'train_epoch_end' or 'validate', or prune a saved checkpoint with `wanda-lightning prune`"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Stops distilling (undoes the ``training_step`` wrapper)."""
        self._distillation.stop()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restores the result (after a resume or an acting ``validate``) or checks that the action will be possible,
        then acts when the trigger says so."""
        if self.acted:
            with misconfiguration():
                self.on_restored(trainer, pl_module)
                self._distillation.resume(pl_module)
            if self._recovery_lr is not None:
                self._recovery_lr.install(trainer)
            self._publish(trainer)
            if not self._trigger.repeats:
                return
        plan = self._preflight(trainer, pl_module) if not self.acted and self._trigger.checks_at_train_start else None
        self._act(trainer, pl_module, self._trigger.at_train_start(trainer), plan)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Acts when the trigger says so."""
        self._act(trainer, pl_module, self._trigger.after_train_batch(trainer, batch_idx))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fallback for ``"train_epoch_end"`` when the last batch of the epoch could not be told in advance."""
        self._act(trainer, pl_module, self._trigger.after_train_epoch(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Acts on a fit that stopped early (``"fit_end"``), finishes and prints the summary."""
        self._act(trainer, pl_module, self._trigger.at_train_end(trainer, acted=self.acted))
        self.on_run_finished(trainer, pl_module)
        if self._acted_in_this_run or (self._trigger.on_checkpoints and self.report is not None):
            self._print_summary()
            self._acted_in_this_run = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``prune_on="validate"``, acts before ``trainer.validate`` runs (once)."""
        due = self._trigger.before_validation(trainer)
        if due is not None and not self.acted:
            self._act(trainer, pl_module, due, self._preflight(trainer, pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Finishes and prints the summary after an acting ``trainer.validate``."""
        if trainer.state.fn == TrainerFn.VALIDATING and self._acted_in_this_run:
            self.on_run_finished(trainer, pl_module)
            self._print_summary()
            self._acted_in_this_run = False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Full checkpoints carry the teacher's weights, so that distillation resumes."""
        self._distillation.save(checkpoint)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keeps the teacher's weights of a resumed run until training starts."""
        self._distillation.load(checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """The report, the measured metrics, where the trigger stands, and the subclass's part, with a version."""
        return {
            "version": self.STATE_VERSION,
            "report": self.report.to_dict() if self.report is not None else None,
            "metrics": deepcopy(self.metrics),
            "dense_metrics": deepcopy(self._dense_metrics),
            "when": self._when,
            "trigger": self._trigger.state_dict(),
            "recovery_lr": self._recovery_lr.state_dict() if self._recovery_lr is not None else None,
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state; the action is not run again (a schedule goes on with its next step)."""
        report = state_dict.get("report")
        self.report = self.report_class.from_dict(report) if report else None
        self.metrics = deepcopy(state_dict.get("metrics", {}))
        dense = state_dict.get("dense_metrics")
        self._dense_metrics = deepcopy(dense) if dense is not None else None
        self._when = str(state_dict.get("when", self._when))
        self._trigger.load_state_dict(state_dict.get("trigger") or {})
        if self._recovery_lr is not None:
            self._recovery_lr.load_state_dict(state_dict.get("recovery_lr") or {})
        self.load_extra_state(state_dict, int(state_dict.get("version", 1)))

    # --- acting ------------------------------------------------------------------------------------------------------

    def _preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Every check that can be made before training, so that a misconfigured run fails before it trains; returns
        the plan, which an action due at once uses."""
        with misconfiguration():
            check_strategy(trainer, type(self).__name__, reshapes=self.reshapes_model)
            plan = self.plan(trainer, pl_module)
            if self.needs_calibration:
                self._calibration.check(trainer)
            if self.distill is not None and self.distill.uses_teacher:
                student_of(pl_module)
        warn_if_no_validation(trainer, self.evaluate is not False, type(self).__name__)
        return plan

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due | None, plan: Any = None) -> None:
        """Acts on the live module when ``due`` (once, or at every step of a schedule), then keeps the result, starts
        distilling and handles a fit that stopped early. ``plan``: made by the checks just before, else made here."""
        if due is None or (self.acted and not self._trigger.repeats):
            return
        if plan is None:
            with misconfiguration():
                plan = self.plan(trainer, pl_module)
        fitting = trainer.training or trainer.state.fn == TrainerFn.FITTING
        teacher = self._distillation.snapshot(pl_module) if fitting else None
        self._run_and_record(trainer, pl_module, due, plan)
        self._acted_in_this_run = True
        self.on_action_done(trainer, pl_module, due, fitting)
        if teacher is not None:
            self._distillation.start(teacher, pl_module)
        if fitting and self._recovery_lr is not None:
            self._recovery_lr.install(trainer)
        self._trigger.acted(due)
        if due.stopped_early:
            rank_zero_warn(
                f"{type(self).__name__}: the fit stopped before its last planned step (early stopping, `max_time`, "
                "...), so it acted in `on_train_end`: checkpoints saved during the fit hold the model before; each "
                "ModelCheckpoint's last checkpoint is saved again"
            )
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
                    trainer.save_checkpoint(callback.last_model_path, weights_only=callback.save_weights_only)

    def _run_and_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due, plan: Any) -> None:
        """Calibrates, measures, applies the action and measures again, leaving the random state as it found it; then
        logs, publishes and keeps the report."""
        # `trainer.validate` runs its hooks under inference mode, whose tensors could not be updated in place later.
        with isolate_rng(), torch.inference_mode(False):
            batches = self._calibration.batches(trainer, pl_module) if self.needs_calibration else None
            loader = first_loader(validation_loaders(trainer)) if self.evaluate is not False else None
            start = time.perf_counter()
            if self._trigger.repeats and self._dense_metrics is not None:
                before = dict(self._dense_metrics)  # a schedule's later step: deltas against the dense model
            else:
                before = self._measure(trainer, pl_module, loader, "dense")
                if self._trigger.repeats:
                    self._dense_metrics = dict(before)
            self.evaluation_seconds = time.perf_counter() - start
            with ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                stack.enter_context(trainer.precision_plugin.forward_context())
                if self._runs_steps(pl_module):
                    stack.enter_context(quiet_steps(pl_module))
                report = self.apply(trainer, pl_module, batches, due, plan)
            start = time.perf_counter()
            after = self._measure(trainer, pl_module, loader, self.stage)
            self.evaluation_seconds += time.perf_counter() - start
        self.report, self._when = report, due.when
        self.metrics = metric_deltas(before, after, self.stage)
        metric_values = {
            f"{name}/{key}": value for name, values in self.metrics.items() for key, value in values.items()
        }
        published = {**self.action_metrics(), **metric_values}
        log_to_loggers(trainer, {**published, **self.logged_only_metrics()})
        publish_metrics(trainer, published)

    def _runs_steps(self, pl_module: pl.LightningModule) -> bool:
        """Whether calibration runs the module's ``validation_step``/``training_step`` (a module without forward)."""
        return (
            self.calibration_options.forward_fn is None
            and type(self).calibration_forward is CalibratedCallback.calibration_forward
            and not has_forward(pl_module)
        )

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable[Any] | None, stage: str
    ) -> dict[str, float]:
        if loader is None:
            return {}
        limit = None if isinstance(self.evaluate, bool) else self.evaluate
        return measure_validation(trainer, pl_module, loader, stage, limit)

    def _publish(self, trainer: pl.Trainer) -> None:
        """Puts what the last action did and every ``<metric>/dense|<stage>|delta`` in ``trainer.callback_metrics``,
        where ``ModelCheckpoint`` and ``EarlyStopping`` look for what they monitor (the values are the same on every
        process: they were reduced across processes when measured)."""
        if self.report is None:
            return
        values = dict(self.action_metrics())
        for name, measured in self.metrics.items():
            values.update({f"{name}/{key}": value for key, value in measured.items()})
        publish_metrics(trainer, values)

    def _print_summary(self) -> None:
        if self.verbose:
            rank_zero_info(self.summary())
