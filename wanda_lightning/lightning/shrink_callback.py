r"""
WandaShrinkCallback
^^^^^^^^^^^^^^^^^^^

Width pruning inside a Lightning run: remove whole MLP hidden units and attention heads at a chosen point, then
recover by training in the same ``fit``, distilling from the dense model.

Its hooks consult a :mod:`trigger <wanda_lightning.lightning.triggers>` like
:class:`~wanda_lightning.WandaPruningCallback`'s and share its calibration, evaluation and reporting parts; the action
is :func:`~wanda_lightning.width.shrink_with` instead of masking.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader

from ..core.batches import default_forward
from ..core.layers import find_pretrained
from ..core.validation import as_device, check_bool, check_number, check_positive
from ..distributed.sharding import holds_shards
from ..width.api import shrink_with
from ..width.config import ShrinkConfig, Widths
from ..width.methods import Update, WidthMethodName
from ..width.report import ShrinkReport
from ..width.surgery import fit_to_state_dict
from .calibration import CalibrationData, CalibrationSource, first_loader, warn_if_no_validation
from .distillation import Distiller
from .errors import misconfiguration
from .evaluation import measure_validation
from .shrinking import wrap_loads
from .strategies import strategy_sync
from .summary import log_to_loggers, metric_deltas
from .triggers import Due, make_trigger

__all__ = ["WandaShrinkCallback"]

ShrinkOn = Literal["fit_start", "train_step", "train_epoch_end", "fit_end", "validate"]
_STATE_VERSION = 1
TEACHER_KEY = "wanda_teacher_state_dict"


class WandaShrinkCallback(Callback):
    r"""Shrinks the LightningModule's model by whole MLP hidden units and attention heads, then lets it recover.

    At the chosen point (``prune_on``) the callback calibrates on the run's batches (the validation dataloader by
    default), measures the module's validation metrics, removes the lowest-scoring units of every block
    (:func:`~wanda_lightning.shrink`: ``wanda-sp``, ``flap`` or ``magnitude-sp``, uniform widths, the transformers
    config rewritten), measures again, and logs the deltas, the parameters and the linear MACs per token before and
    after. When training goes on, the optimizers and LR schedulers are rebuilt from ``configure_optimizers`` for the
    new parameters (their state starts afresh for the recovery phase) and, with ``distill``, every training step
    distils from a frozen copy of the model as it was just before shrinking (the fine-tuned dense model): the step's
    loss becomes ``(1 - distill_weight) * task + distill_weight * KD``, without ``training_step`` being rewritten.

    Checkpoints hold the new shapes. ``Trainer.fit(ckpt_path=...)`` resumes them (the module is resized to the
    checkpoint before its weights load; full checkpoints also carry the teacher, so distillation resumes too), and
    :func:`~wanda_lightning.load_shrunk_checkpoint` loads one for inference. ``save_dir`` writes the final model as a
    plain transformers folder that stock ``from_pretrained`` loads.

    Under DDP (``strategy="ddp"``) the statistics are all-reduced, so every process removes the same units, and the
    DDP wrapper is rebuilt around the new parameters. Refused with a clear error: sharded strategies (FSDP), whose
    every shard would change shape, and the spawning ones (``"ddp_spawn"``, ``"ddp_fork"``, notebooks), after which
    Lightning loads the workers' weights into the main process's original-sized module.

    Args:
        mlp: Fraction of each MLP's hidden units to remove, in ``[0, 1)``.
        heads: Fraction of attention heads (key/value groups under grouped-query attention) to remove, in ``[0, 1)``.
        method: ``"wanda-sp"``, ``"flap"`` (with bias compensation) or ``"magnitude-sp"``.
        update: What happens to the kept weights of each layer that lost inputs: ``"none"``, ``"bias"`` (the removed
            units' mean contribution goes into its bias) or ``"least-squares"`` (kept columns and bias refitted to the
            dense outputs on the calibration data); ``None``: the method's default.
        widths: ``"uniform"`` or ``"adaptive"`` (per-layer widths by FLAP's global ranking; for modules without a
            transformers config, see :func:`~wanda_lightning.shrink`).
        sequential: Block-sequential calibration (default) or one forward pass.
        blocks: Module name of the block stack; found automatically when ``None``.
        num_samples: Most calibration sequences over all processes; ``None`` for the whole dataloader.
        batch_size: Sequences per calibration forward pass; ``None`` keeps the dataloader's batches.
        offload_device: Where block inputs wait between blocks; ``None`` keeps them where they were computed.
        calibration: ``"val"``, ``"train"`` or a ``DataLoader``, as for
            :class:`~wanda_lightning.WandaPruningCallback`.
        prune_on: When to shrink: ``"fit_start"`` (a fine-tuned model is shrunk, then the whole fit recovers it),
            ``"train_step"`` with ``step=k`` (fine-tune ``k`` steps, shrink, recover in the rest of the fit),
            ``"train_epoch_end"`` with ``epoch=k``, ``"fit_end"`` (no recovery in this fit) or ``"validate"``
            (``trainer.validate`` shrinks and reports).
        epoch: With ``prune_on="train_epoch_end"`` only: the zero-based epoch after which to shrink.
        step: With ``prune_on="train_step"`` only: shrink once this many optimizer steps are done.
        distill: Distil from the model as it was before shrinking while training goes on.
        distill_weight: Share of the distillation term in the loss, in ``[0, 1]`` (1: distillation alone).
        temperature: Distillation temperature (> 0).
        teacher_device: Where the frozen teacher lives (say ``"cpu"``); ``None``: where the model is.
        evaluate: Measure the module's validation metrics before and after shrinking and log the deltas.
        num_eval_batches: Most validation batches (per process) for each measurement; ``None``: as the trainer.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the module on one calibration batch (or override
            :meth:`calibration_forward`).
        save_dir: When the fit ends (or after a shrinking ``validate``), rank zero writes the transformers model the
            module holds there with ``save_pretrained`` (and its ``tokenizer`` attribute, if any).
        verbose: Print the summary on rank zero.

    Raises:
        MisconfigurationException: For an invalid argument, or, before training, a module with no layout that can
            lose units, a config that cannot express the widths, or an unsupported strategy.

    Example::

        from lightning.pytorch import Trainer
        from wanda_lightning import WandaShrinkCallback

        shrinking = WandaShrinkCallback(mlp=0.5, prune_on="train_step", step=100)
        trainer = Trainer(max_steps=300, callbacks=[shrinking])
        trainer.fit(module, train_loader, val_loader)  # 100 steps dense, shrink, 200 steps of recovery
    """

    def __init__(
        self,
        mlp: float = 0.0,
        heads: float = 0.0,
        method: WidthMethodName = "wanda-sp",
        update: Update | None = None,
        widths: Widths = "uniform",
        sequential: bool = True,
        blocks: str | None = None,
        num_samples: int | None = 128,
        batch_size: int | None = None,
        offload_device: str | None = None,
        calibration: CalibrationSource | DataLoader = "val",
        prune_on: ShrinkOn = "fit_end",
        epoch: int | None = None,
        step: int | None = None,
        distill: bool = True,
        distill_weight: float = 1.0,
        temperature: float = 2.0,
        teacher_device: str | None = None,
        evaluate: bool = True,
        num_eval_batches: int | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        save_dir: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        with misconfiguration():
            self._config = ShrinkConfig.create(
                mlp=mlp,
                heads=heads,
                method=method,
                update=update,
                widths=widths,
                sequential=sequential,
                blocks=blocks,
                num_samples=num_samples,
                batch_size=batch_size,
                offload_device=offload_device,
            )
            unsupported = {
                "checkpoint": "checkpoints of other shapes than the live model could not be resumed",
                "schedule": "units are removed once (a gradual width schedule is not offered)",
            }
            if prune_on in unsupported:
                raise ValueError(
                    f"`prune_on`={prune_on!r} is not offered for shrinking: {unsupported[prune_on]}; use 'fit_start', "
                    "'train_step', 'train_epoch_end', 'fit_end' or 'validate'"
                )
            self._trigger = make_trigger(prune_on, epoch, step)
            for flag, name in ((distill, "distill"), (evaluate, "evaluate"), (verbose, "verbose")):
                check_bool(flag, name)
            check_positive(num_eval_batches, "num_eval_batches")
            check_number(distill_weight, "distill_weight", 0.0, 1.0, closed=True)
            check_number(temperature, "temperature", 0.0, float("inf"), closed=False)
            as_device(teacher_device, "teacher_device")
            if forward_fn is not None and not callable(forward_fn):
                raise TypeError(
                    f"`forward_fn` must be callable as forward_fn(pl_module, batch), or None, got {forward_fn!r}"
                )
            if save_dir is not None and (not isinstance(save_dir, (str, os.PathLike)) or not str(save_dir)):
                raise TypeError(f"`save_dir` must be a directory path or None, got {save_dir!r}")
            self._calibration = CalibrationData(calibration, num_samples, batch_size, self.calibration_forward)
        self.mlp, self.heads, self.method, self.widths = self._config.mlp, self._config.heads, method, widths
        self.update = update
        self.prune_on, self.epoch, self.step = prune_on, epoch, step
        self.distill, self.distill_weight, self.temperature = distill, float(distill_weight), float(temperature)
        self.teacher_device = teacher_device
        self.calibration = calibration
        self.evaluate, self.num_eval_batches = evaluate, num_eval_batches
        self.forward_fn = forward_fn
        self.save_dir = save_dir
        self.verbose = verbose

        self.report: ShrinkReport | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.evaluation_seconds = 0.0
        self.shrunk = False
        self._when = "a restored checkpoint"
        self._distiller: Distiller | None = None
        self._teacher_state: dict[str, Any] | None = None
        self._undo: list[Callable[[], None]] = []
        self._acted_in_this_run = False

    # --- public -------------------------------------------------------------------------------------------------------

    def calibration_forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Runs ``pl_module`` on one calibration batch (``forward_fn`` when given, else as ``prune()`` does)."""
        if self.forward_fn is not None:
            return self.forward_fn(pl_module, batch)
        return default_forward(pl_module, batch)

    def summary(self) -> str:
        """The report, then dense/shrunk/delta for each validation metric."""
        if self.report is None:
            return "WandaShrinkCallback: nothing shrunk yet"
        lines = [f"WandaShrinkCallback: shrunk at {self._when}", str(self.report)]
        if self.metrics:
            width = max(len("metric"), *(len(name) for name in self.metrics))
            lines += ["", f"{'metric':<{width}}  {'dense':>12}  {'shrunk':>12}  {'delta':>12}"]
            lines.append("  ".join(["-" * width] + ["-" * 12] * 3))
            for name, values in self.metrics.items():
                lines.append(
                    f"{name:<{width}}  {values['dense']:>12.4f}  {values['shrunk']:>12.4f}  {values['delta']:>+12.4f}"
                )
        return "\n".join(lines)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen dense model distilled from, once shrunk (with ``distill``)."""
        return self._distiller.teacher if self._distiller is not None else None

    # --- hooks --------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy and the module's layout; makes checkpoint loading resize the module to the checkpoint;
        with ``distill``, wraps ``training_step``."""
        with misconfiguration():
            _check_strategy(trainer)
        self._undo.append(wrap_loads(pl_module))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Undoes the wrappers."""
        while self._undo:
            self._undo.pop()()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks before training that shrinking will be possible (or resumes distillation after a restore)."""
        if self.shrunk:
            self._start_distilling(pl_module)
            return
        if self._trigger.checks_at_train_start:
            self._preflight(trainer, pl_module)
        self._act(trainer, pl_module, self._trigger.at_train_start(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Shrinks when the trigger says so."""
        self._act(trainer, pl_module, self._trigger.after_train_batch(trainer, batch_idx))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fallback for ``"train_epoch_end"``."""
        self._act(trainer, pl_module, self._trigger.after_train_epoch(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Shrinks a fit that stopped early (``"fit_end"``), saves ``save_dir`` and prints the summary."""
        self._act(trainer, pl_module, self._trigger.at_train_end(trainer, acted=self.shrunk))
        if self.shrunk and self.save_dir is not None:
            self._save(trainer, pl_module)
        if self._acted_in_this_run and self.verbose:
            rank_zero_info(self.summary())
        self._acted_in_this_run = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``prune_on="validate"``, shrinks before ``trainer.validate`` runs (once)."""
        due = self._trigger.before_validation(trainer)
        if due is not None and not self.shrunk:
            self._preflight(trainer, pl_module)
            self._act(trainer, pl_module, due)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Saves and prints the summary after a shrinking ``trainer.validate``."""
        if trainer.state.fn == TrainerFn.VALIDATING and self._acted_in_this_run:
            if self.save_dir is not None:
                self._save(trainer, pl_module)
            if self.verbose:
                rank_zero_info(self.summary())
            self._acted_in_this_run = False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Full checkpoints carry the teacher's weights, so that distillation resumes."""
        if self._distiller is not None:
            checkpoint[TEACHER_KEY] = {k: v.detach().cpu() for k, v in self._distiller.teacher.state_dict().items()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keeps the teacher's weights of a resumed run until training starts."""
        self._teacher_state = checkpoint.get(TEACHER_KEY)

    def state_dict(self) -> dict[str, Any]:
        """Whether the model was shrunk, the report and the measured metrics."""
        return {
            "version": _STATE_VERSION,
            "shrunk": self.shrunk,
            "report": self.report.to_dict() if self.report is not None else None,
            "metrics": copy.deepcopy(self.metrics),
            "when": self._when,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the state; a shrunk run is not shrunk again."""
        self.shrunk = bool(state_dict.get("shrunk", False))
        report = state_dict.get("report")
        self.report = ShrinkReport.from_dict(report) if report else None
        self.metrics = copy.deepcopy(state_dict.get("metrics", {}))
        self._when = str(state_dict.get("when", self._when))

    # --- shrinking ----------------------------------------------------------------------------------------------------

    def _preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ..width.api import plan_shrink

        with misconfiguration():
            _check_strategy(trainer)
            plan_shrink(pl_module, self._config)  # the layout, the counts and the config, checked on the live model
            if self._config.method.needs_data:
                self._calibration.check(trainer)
            if self.distill:
                _student(pl_module)
        warn_if_no_validation(trainer, self.evaluate)

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due | None) -> None:
        if due is None or self.shrunk:
            return
        fitting = trainer.training or trainer.state.fn == TrainerFn.FITTING
        teacher = copy.deepcopy(_student(pl_module)) if self.distill and fitting else None
        with isolate_rng(), torch.inference_mode(False):
            report, before, after = self._shrink(trainer, pl_module)
        self.report, self.shrunk, self._when, self._acted_in_this_run = report, True, due.when, True
        self.metrics = metric_deltas(before, after, "shrunk")
        logged = {
            "wanda/parameters": float(report.parameters_after),
            "wanda/parameter_ratio": report.parameter_ratio,
            "wanda/macs_per_token": float(report.macs_after),
            "wanda/macs_ratio": report.macs_ratio,
        }
        for name, values in self.metrics.items():
            logged.update({f"{name}/{key}": value for key, value in values.items()})
        log_to_loggers(trainer, logged)
        if fitting:
            _rebuild_optimizers(trainer)
            if teacher is not None:
                self._distiller = Distiller(
                    teacher,
                    _student(pl_module),
                    weight=self.distill_weight,
                    temperature=self.temperature,
                    device=self.teacher_device,
                )
                del teacher
                self._undo.append(self._distiller.wrap_training_step(pl_module))

    def _shrink(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[ShrinkReport, dict[str, float], dict[str, float]]:
        batches = self._calibration.batches(trainer, pl_module) if self._config.method.needs_data else None
        loader = first_loader(trainer.val_dataloaders) if self.evaluate else None
        start = time.perf_counter()
        before = self._measure(trainer, pl_module, loader, "dense")
        with torch.no_grad(), trainer.precision_plugin.forward_context(), misconfiguration():
            report = shrink_with(
                pl_module,
                batches,
                self._config.with_batches_as_given(),
                forward_fn=self._calibration.forward_fn(trainer, pl_module),
                sync_statistics=strategy_sync(trainer),
            )
        after = self._measure(trainer, pl_module, loader, "shrunk")
        self.evaluation_seconds = time.perf_counter() - start - report.total_seconds
        return report, before, after

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable[Any] | None, stage: str
    ) -> dict[str, float]:
        if loader is None:
            return {}
        return measure_validation(trainer, pl_module, loader, stage, self.num_eval_batches)

    def _start_distilling(self, pl_module: pl.LightningModule) -> None:
        """After a resume: the teacher comes back from the checkpoint (shaped as before shrinking)."""
        if not self.distill or self._distiller is not None or self._teacher_state is None:
            return
        student = _student(pl_module)
        teacher = copy.deepcopy(student)
        fit_to_state_dict(teacher, self._teacher_state)
        teacher.load_state_dict(self._teacher_state)
        self._teacher_state = None
        self._distiller = Distiller(
            teacher, student, weight=self.distill_weight, temperature=self.temperature, device=self.teacher_device
        )
        self._undo.append(self._distiller.wrap_training_step(pl_module))

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ..width.saving import save_plain_pretrained

        if trainer.is_global_zero:
            assert self.save_dir is not None
            save_plain_pretrained(_student(pl_module), self.save_dir, getattr(pl_module, "tokenizer", None))
            rank_zero_info(f"WandaShrinkCallback: saved the shrunk model to {self.save_dir} (from_pretrained loads it)")
        trainer.strategy.barrier("wanda_shrink_save")


def _student(pl_module: nn.Module) -> nn.Module:
    """The transformers model inside the module (what distillation and ``save_dir`` use)."""
    found = find_pretrained(pl_module)
    if found is None:
        raise ValueError(
            f"{type(pl_module).__name__} holds no transformers model: distillation and `save_dir` need one; pass "
            "distill=False"
        )
    return found[0]


def _check_strategy(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names & {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy", "XLAStrategy", "XLAFSDPStrategy"}:
        raise ValueError(
            f"WandaShrinkCallback does not support {type(strategy).__name__}: removing units changes the shape of "
            "every shard. Use a single device or DDP, or shrink the model before sharding it"
        )
    if trainer.lightning_module is not None and holds_shards(trainer.lightning_module):
        raise ValueError("WandaShrinkCallback: the module's weights are sharded (FSDP); shrink before sharding")
    if type(getattr(strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
        raise ValueError(
            f"WandaShrinkCallback does not support the spawning strategy {type(strategy).__name__} "
            f"(start method {getattr(strategy, '_start_method', '?')!r}): when the fit ends, Lightning loads the "
            "workers' weights into the main process's module, which still has the original shapes. Use "
            "strategy='ddp' (processes started from your script or by torchrun)"
        )


def _rebuild_optimizers(trainer: pl.Trainer) -> None:
    """New optimizers and LR schedulers from ``configure_optimizers`` for the new parameters (and, under DDP, a new
    wrapper: its gradient buckets were sized for the old ones)."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and strategy.lightning_module is not None:
        strategy.model = strategy._setup_model(strategy.lightning_module)
        strategy._register_ddp_hooks()
    strategy.setup_optimizers(trainer)
    _optimizers_to_device(strategy.optimizers, strategy.root_device)
