r"""
WandaShrinkCallback
^^^^^^^^^^^^^^^^^^^

Width pruning inside a Lightning run: remove whole MLP hidden units and attention heads at a chosen point, then
recover by training in the same ``fit``, distilling from the model as it was.

The hooks, calibration, measurement, reporting and distillation are :class:`~.calibrated_callback.CalibratedCallback`'s;
this class says what its action is (:func:`~wanda_lightning.width.shrink_with`) and what it needs after it: optimizers
rebuilt for the new parameters, checkpoints of the new shapes resumed (:mod:`.shrunk_checkpoints`), ``export``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

from ..core import CalibrationOptions, Reconstruction, find_pretrained
from ..width import (
    LayerScore,
    ShrinkConfig,
    ShrinkPlan,
    ShrinkReport,
    SpeedTarget,
    Update,
    WidthMethodName,
    Widths,
    plan_shrink,
    save_plain_pretrained,
    shrink_with,
)
from .calibrated_callback import CalibratedCallback
from .calibration import CalibrationSource
from .distillation import TEACHER_KEY, Distillation, student_of
from .errors import misconfiguration
from .exporting import ExportOption, Exports
from .progress import TrainerProgress
from .shrunk_checkpoints import REMOVED_BLOCKS_KEY, wrap_loads
from .strategies import rebuild_optimizers, strategy_sync
from .triggers import Due, Trigger

__all__ = ["WandaShrinkCallback"]

ShrinkOn = Literal["fit_start", "fit_end", "validate"]


class WandaShrinkCallback(CalibratedCallback):
    r"""Shrinks the LightningModule's model (whole blocks, MLP hidden units, attention heads) at a chosen point of the
    run, then lets the same fit recover it by distillation.

    When it acts, the callback calibrates on the run's batches, measures the module's validation metrics, shrinks the
    model as :func:`~wanda_lightning.shrink` does (the transformers config rewritten), measures again, and logs
    ``<metric>/dense``, ``/shrunk``, ``/delta`` and the parameters and MACs per token before and after to every
    logger and to ``trainer.callback_metrics``. Training then goes on with optimizers and LR schedulers rebuilt for the
    new parameters and, with ``distill``, a loss that distils from the model as it was, without a change to
    ``training_step``. Checkpoints hold the new shapes: ``Trainer.fit(ckpt_path=...)`` resumes them and
    :func:`~wanda_lightning.load_shrunk_checkpoint` loads them. DDP is supported; FSDP and the spawning strategies are
    refused. The guide ``docs/guides/shrink-callback.md`` explains each of these.

    Args:
        mlp: Fraction of each MLP's hidden units to remove, in ``[0, 1)``.
        heads: Fraction of attention heads (key/value groups under grouped-query attention) to remove, in ``[0, 1)``.
        method: ``"wanda-sp"``, ``"flap"`` or ``"magnitude-sp"``.
        update: ``"none"``, ``"bias"``, ``"least-squares"``, ``"reconstruct"`` or a
            :class:`~wanda_lightning.Reconstruction`; ``None``: the method's default (see
            :func:`~wanda_lightning.shrink`).
        widths: ``"uniform"`` or ``"adaptive"`` (for modules without a transformers config).
        layers: Fraction of the decoder blocks to remove, in ``[0, 1)``, rounded to whole blocks; the blocks go first.
        layer_score: ``"influence"`` (default) or ``"angular"``; see :func:`~wanda_lightning.shrink`.
        speedup: Instead of ``layers``, ``mlp`` and ``heads``: the speed-up to reach, or a
            :class:`~wanda_lightning.SpeedTarget` (what is timed, where, the grid); searched when the callback acts, in
            one process.
        multiple_of: Each kept width is rounded to a multiple of this; see :func:`~wanda_lightning.shrink`.
        calibration: ``"val"``, ``"train"`` or a ``DataLoader``, as for :class:`~wanda_lightning.WandaPruningCallback`.
        calibration_options: How calibration runs, a :class:`~wanda_lightning.CalibrationOptions`.
        prune_on: When to shrink: ``"fit_end"`` (default; no recovery in this fit), ``"fit_start"`` (shrink a
            fine-tuned model, recover in the whole fit), ``"validate"``, or :class:`~wanda_lightning.AfterStep` /
            :class:`~wanda_lightning.AfterEpoch` (fine-tune, shrink, recover in the rest of the fit).
        distill: Distil from the model as it was before shrinking while training goes on: ``True`` (default) for
            :class:`~wanda_lightning.Distillation`'s defaults, a ``Distillation`` (with a recovery learning rate), or
            ``False``.
        evaluate: Measure the validation metrics before and after: ``True``, an ``int`` (at most that many batches)
            or ``False``.
        export: Written on rank zero: a folder (at the end of the fit, or after a shrinking ``validate``: a plain
            transformers folder, with the module's ``tokenizer`` if any), a ``.gguf`` path or a
            :class:`~wanda_lightning.GGUFExport` (when the callback acts and again at the end of the fit), or a list
            of them.
        verbose: Print the summary on rank zero.

    Raises:
        MisconfigurationException: For an invalid argument, or, before training, a module with no layout that can
            lose units, a config that cannot express the widths, or an unsupported strategy.

    Example::

        from lightning.pytorch import Trainer
        from wanda_lightning import AfterStep, Distillation, WandaShrinkCallback

        shrinking = WandaShrinkCallback(mlp=0.5, prune_on=AfterStep(100), distill=Distillation(learning_rate=5e-4))
        Trainer(max_steps=300, callbacks=[shrinking]).fit(module, train_loader, val_loader)  # 100 dense, 200 recovery
    """

    STATE_VERSION: ClassVar[int] = 1
    stage: ClassVar[str] = "shrunk"
    reshapes_model: ClassVar[bool] = True
    report_class: ClassVar[Any] = ShrinkReport

    def __init__(
        self,
        mlp: float = 0.0,
        heads: float = 0.0,
        method: WidthMethodName = "wanda-sp",
        *,
        update: Update | Literal["reconstruct"] | Reconstruction | None = None,
        widths: Widths = "uniform",
        multiple_of: int | None = None,
        layers: float = 0.0,
        layer_score: LayerScore = "influence",
        speedup: float | SpeedTarget | None = None,
        calibration: CalibrationSource | DataLoader = "val",
        calibration_options: CalibrationOptions | None = None,
        prune_on: ShrinkOn | Trigger = "fit_end",
        distill: bool | Distillation = True,
        evaluate: bool | int = True,
        export: ExportOption = None,
        verbose: bool = True,
    ) -> None:
        with misconfiguration():
            self._config = ShrinkConfig.create(
                mlp=mlp,
                heads=heads,
                method=method,
                update=update,
                widths=widths,
                multiple_of=multiple_of,
                options=CalibrationOptions.resolve(calibration_options),
                layers=layers,
                layer_score=layer_score,
                speedup=speedup,
            )
            self._exports = Exports.parse(export)
        super().__init__(
            calibration=calibration,
            calibration_options=self._config.options,
            prune_on=prune_on,
            distill=distill,
            evaluate=evaluate,
            verbose=verbose,
        )
        self.mlp, self.heads, self.method, self.widths = self._config.mlp, self._config.heads, method, widths
        self.update = update
        self.multiple_of = multiple_of
        self.layers, self.layer_score = self._config.layers, layer_score
        self.speedup = speedup
        self.export = export
        self.shrunk = False
        self._undo: list[Callable[[], None]] = []

    # --- the action --------------------------------------------------------------------------------------------------

    @property
    def acted(self) -> bool:
        return self.shrunk

    @property
    def needs_calibration(self) -> bool:
        config = self._config
        return config.method.needs_data or bool(config.layers) or config.speed_target is not None

    def check_trigger(self, trigger: Trigger) -> None:
        unsupported = {
            "checkpoint": "checkpoints of other shapes than the live model could not be resumed",
            "schedule": "units are removed once (a gradual width schedule is not offered)",
        }
        if trigger.name in unsupported or trigger.repeats or trigger.on_checkpoints:
            reason = unsupported.get(trigger.name, "units are removed once, in the live model")
            raise ValueError(
                f"`prune_on`={trigger.name!r} is not offered for shrinking: {reason}; use 'fit_start', 'fit_end', "
                "'validate', AfterStep(k) or AfterEpoch(k)"
            )

    def plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ShrinkPlan:
        """The blocks, units and config the action will change, checked on the live model
        (:func:`~wanda_lightning.width.plan_shrink`); with ``speedup``, the shape is searched when acting."""
        if self._config.speed_target is not None:
            if trainer.world_size > 1:
                raise ValueError(
                    f"`speedup` times candidates on each process, and timings differ between the {trainer.world_size} "
                    "processes, which would choose different shapes: find the shape with shrink(speedup=...) on one "
                    "process, then pass its `layers`, `mlp` and `heads`"
                )
            if find_pretrained(pl_module) is None:
                raise ValueError("`speedup` needs a transformers causal LM inside the module; none was found")
        self._exports.check_tokenizer(pl_module)
        return plan_shrink(pl_module, self._config)

    def apply(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any] | None, due: Due, plan: Any
    ) -> ShrinkReport:
        """Shrinks with :func:`~wanda_lightning.width.shrink_with` as ``plan`` says, with a progress bar over the
        blocks whose widths change."""
        config = self._config
        what = "Shrinking and reconstructing blocks" if config.reconstruction is not None else "Shrinking blocks"
        with TrainerProgress(trainer, what, plan.block_steps) as progress:
            report = shrink_with(
                pl_module,
                batches,
                config.with_batches_as_given(),
                forward_fn=self.forward(trainer, pl_module),
                sync_statistics=strategy_sync(trainer),
                on_block_done=lambda name, block: progress.advance(),
                plan=plan,
            )
        self.shrunk = True
        return report

    def action_metrics(self) -> dict[str, float]:
        report = self.report
        return {
            "wanda/parameters": float(report.parameters_after),
            "wanda/parameter_ratio": report.parameter_ratio,
            "wanda/macs_per_token": float(report.macs_after),
            "wanda/macs_ratio": report.macs_ratio,
        }

    def on_action_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due, fitting: bool) -> None:
        """Writes the GGUF files and rebuilds the optimizers and LR schedulers for the new parameters while fitting."""
        self._exports.write_ggufs(trainer, pl_module, type(self).__name__)
        if fitting:
            rebuild_optimizers(trainer)

    def on_run_finished(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Writes the ``export`` folder and GGUF files."""
        if not self.shrunk:
            return
        folder = self._exports.folder
        if folder is not None:
            if trainer.is_global_zero:
                save_plain_pretrained(student_of(pl_module), folder, getattr(pl_module, "tokenizer", None))
                rank_zero_info(f"WandaShrinkCallback: saved the shrunk model to {folder} (from_pretrained loads it)")
            trainer.strategy.barrier("wanda_shrink_save")
        self._exports.write_ggufs(trainer, pl_module, type(self).__name__)

    # --- hooks -------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy and makes checkpoint loading resize the module to the checkpoint."""
        super().setup(trainer, pl_module, stage)
        self._undo.append(wrap_loads(pl_module, lambda checkpoint: self._keep_full_depth(pl_module, checkpoint)))

    def _keep_full_depth(self, pl_module: pl.LightningModule, checkpoint: Mapping[str, Any]) -> None:
        """A resumed teacher that has blocks the student lost is rebuilt from the module as built, before they go."""
        if checkpoint.get(REMOVED_BLOCKS_KEY) and checkpoint.get(TEACHER_KEY) is not None:
            self._distillation.template = copy.deepcopy(student_of(pl_module))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Undoes the wrappers."""
        super().teardown(trainer, pl_module, stage)
        while self._undo:
            self._undo.pop()()

    # --- state -------------------------------------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Also names the blocks depth pruning removed, so that a module built at full depth loses the same ones."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        report = self.report
        if self.shrunk and report is not None and report.removed_blocks and report.removed_from is not None:
            checkpoint[REMOVED_BLOCKS_KEY] = {report.removed_from: list(report.removed_blocks)}

    def extra_state(self) -> dict[str, Any]:
        """Whether the model was shrunk."""
        return {"shrunk": self.shrunk}

    def load_extra_state(self, state: Mapping[str, Any], version: int) -> None:
        self.shrunk = bool(state.get("shrunk", False))
