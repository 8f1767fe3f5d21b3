r"""
WandaPruningCallback
^^^^^^^^^^^^^^^^^^^^

Wanda pruning inside a Lightning run: calibrated on the run's own data, measured with the module's own validation
metrics, logged to the trainer's loggers, and kept through checkpoints, resumption and DDP.

The hooks, calibration, measurement, reporting and distillation are :class:`~.calibrated_callback.CalibratedCallback`'s;
this class says what its action is (masks from :func:`~wanda_lightning.pruning.api.prune_with`) and keeps them:
:mod:`~wanda_lightning.lightning.masks` (pruned weights held at zero while training goes on),
:mod:`~wanda_lightning.lightning.checkpointing` (``prune_on="checkpoint"``) and
:mod:`~wanda_lightning.lightning.exporting` (``export``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..core import CalibrationOptions, Reconstruction, local_tensor
from ..distributed import holds_shards
from ..methods import AllocationName, PruningMethod, RefinementName
from ..pruning import PruneConfig, PrunePlan, PruningReport, check_keeps_pruned, plan_prune, prune_with
from .calibrated_callback import CalibratedCallback
from .calibration import CalibrationSource
from .checkpointing import (
    put_pruned_weights,
    restore_dense_weights,
    temporary_weights,
    wrap_weights_only_saves,
)
from .distillation import Distillation
from .errors import misconfiguration
from .exporting import ExportOption, Exports, export_module
from .masks import MaskKeeper
from .metrics import measure_sparsity
from .progress import TrainerProgress
from .strategies import check_strategy, strategy_sync
from .summary import log_to_loggers
from .triggers import Due, PruneOn, Schedule, Trigger

__all__ = ["WandaPruningCallback"]


class WandaPruningCallback(CalibratedCallback):
    r"""Prunes the LightningModule with Wanda (``|W| * ||X||`` per output row), or another method, at a chosen point
    of the run or gradually on a schedule.

    The callback calibrates on the run's own batches, measures every metric the module logs in ``validation_step``
    before and after pruning (``<metric>/dense``, ``/pruned``, ``/delta``), logs them and ``wanda/sparsity`` to every
    logger and to ``trainer.callback_metrics``, and prints a summary on rank zero. Pruned weights are zero under their
    own names, so checkpoints load without this callback; the masks hold while training goes on and are kept in the
    callback's state, so a resumed run does not prune again. DDP, FSDP2 and FSDP1 are supported; PEFT LoRA base
    weights, ``nn.MultiheadAttention`` and modules without ``forward`` are handled. The guides in ``docs/guides/``
    (the pruning callback, triggers and schedules) explain each of these.

    Args:
        sparsity: Fraction of weights zeroed in every output row, in ``[0, 1)``; default 0.5 (implied by N:M).
        structure: ``"unstructured"`` or ``"N:M"`` (N of every M consecutive input weights kept, such as ``"2:4"``).
        method: A method name (``"wanda"``, ``"magnitude"``, ``"sparsegpt"``, ``"admm"``, ``"ria"``,
            ``"ria-permuted"``, or one registered with :func:`~wanda_lightning.register_method`) or a
            :class:`~wanda_lightning.PruningMethod` such as ``Wanda(variant=True)``; see :func:`~wanda_lightning.prune`.
        allocation: ``"uniform"`` or ``"owl"`` (per-block sparsities; see :class:`~wanda_lightning.OWL`).
        refine: ``"none"``, ``"dsnot"``, ``"dsnot-expected"``, ``"dsnot-exact"``, ``"dsnot-unguarded"``,
            ``"admm-update"``, ``"reconstruct"`` or a :class:`~wanda_lightning.Reconstruction`; see
            :func:`~wanda_lightning.prune`.
        targets: Name patterns (glob, or ``re:`` regex) of the layers to prune, relative to the LightningModule;
            default every ``nn.Linear`` and ``Conv1D``.
        ignore: Name patterns to leave alone; default ``["lm_head"]``. Weights tied to an embedding are always left.
        calibration: ``"val"`` (the trainer's validation dataloader), ``"train"``, or a ``DataLoader`` (or any
            iterable of batches).
        calibration_options: How calibration runs, a :class:`~wanda_lightning.CalibrationOptions`.
        prune_on: When to prune: ``"fit_end"`` (default), ``"fit_start"``, ``"validate"``, ``"checkpoint"``, or a
            :class:`~wanda_lightning.Trigger`: :class:`~wanda_lightning.AfterStep`,
            :class:`~wanda_lightning.AfterEpoch` or :class:`~wanda_lightning.Schedule` (gradual pruning: unstructured,
            score-and-select methods, no ``refine``).
        distill: While training goes on after pruning, distil from the model as it was just before (masks held at
            zero): ``True`` or a :class:`~wanda_lightning.Distillation`. Default off.
        evaluate: Measure the validation metrics before and after pruning: ``True`` on as many batches as the trainer
            validates, an ``int`` on at most that many, ``False`` not at all.
        export: Written on rank zero: a folder (after pruning, after a schedule's last step: the compact export of
            :func:`~wanda_lightning.save_pruned`, adapters merged with the masks kept), a ``.gguf`` path or a
            :class:`~wanda_lightning.GGUFExport` (after pruning and again at the end of the fit), or a list of them.
            Not with ``prune_on="checkpoint"``.
        verbose: Print the summary table on rank zero.

    Raises:
        MisconfigurationException: For an invalid argument (naming it, the value and what is allowed), or, before any
            weight changes, when the run cannot be pruned: no validation data for ``calibration="val"``, calibration
            batches the module cannot take, an unsupported strategy, target patterns that match no layer.

    Example::

        from lightning.pytorch import Trainer
        from wanda_lightning import AfterStep, WandaPruningCallback

        pruning = WandaPruningCallback(sparsity=0.5, prune_on=AfterStep(100), export="pruned/")
        Trainer(max_steps=300, callbacks=[pruning]).fit(module, train_loader, val_loader)
        pruning.metrics["val_loss"]  # {'dense': ..., 'pruned': ..., 'delta': ...}
    """

    STATE_VERSION: ClassVar[int] = 2  # 2: masks packed as in the export format (least significant bit first)
    stage: ClassVar[str] = "pruned"
    report_class: ClassVar[Any] = PruningReport

    def __init__(
        self,
        sparsity: float | None = None,
        structure: str = "unstructured",
        method: str | PruningMethod = "wanda",
        *,
        allocation: AllocationName = "uniform",
        refine: RefinementName | Literal["reconstruct"] | Reconstruction = "none",
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] | None = None,
        calibration: CalibrationSource | DataLoader = "val",
        calibration_options: CalibrationOptions | None = None,
        prune_on: PruneOn | Trigger = "fit_end",
        distill: bool | Distillation = False,
        evaluate: bool | int = True,
        export: ExportOption = None,
        verbose: bool = True,
    ) -> None:
        with misconfiguration():
            for patterns, name in ((targets, "targets"), (ignore, "ignore")):
                if isinstance(patterns, str):  # a YAML scalar where a list was meant
                    raise TypeError(
                        f"`{name}` must be a list of name patterns, not a single string: use [{patterns!r}]"
                    )
            self._config = PruneConfig.create(
                sparsity=sparsity,
                structure=structure,
                method=method,
                allocation=allocation,
                refine=refine,
                targets=targets,
                ignore=ignore,
                options=CalibrationOptions.resolve(calibration_options),
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
        if self._exports and self._trigger.on_checkpoints:
            raise MisconfigurationException(
                "`export` exports the live pruned model, which `prune_on`='checkpoint' never prunes; use another "
                "`prune_on`, or export a checkpoint with `wanda-lightning prune`/`compress_checkpoint`"
            )
        self.sparsity = self._config.structure.sparsity
        self.structure = self._config.structure.name
        self.method = self._config.method.name
        self.allocation = allocation
        self.refine = refine
        self.targets = self._config.targets
        self.ignore = self._config.ignore
        self.export = export

        self.export_summary: Any = None
        self.global_sparsity = 0.0
        self.sparsities: dict[str, float] = {}
        self._keeper = MaskKeeper(self.targets, self.ignore)
        self._new_masks: dict[str, Tensor] = {}
        self._unwrap_save: Callable[[], None] | None = None

    # --- public ------------------------------------------------------------------------------------------------------

    @property
    def pruned(self) -> bool:
        """Whether the model was pruned (or its masks restored from a checkpoint); never for ``"checkpoint"``."""
        return self._keeper.active

    @property
    def masks(self) -> dict[str, Tensor]:
        """Keep masks by parameter name (``"model.model.layers.0.mlp.up_proj.weight"``), True where a weight is kept,
        shaped like the parameter; empty before pruning."""
        return dict(self._keeper.keeps or {})

    # --- the action --------------------------------------------------------------------------------------------------

    @property
    def acted(self) -> bool:
        return self.pruned

    @property
    def needs_calibration(self) -> bool:
        return self._config.needs_data

    def check_trigger(self, trigger: Trigger) -> None:
        if trigger.repeats:
            structure = self._config.structure
            if structure.is_n_m:
                raise ValueError(
                    f"`prune_on`=Schedule(...) raises the sparsity step by step, which `structure`={structure.name!r} "
                    f"fixes at {structure.sparsity:g} (N of every M kept from the first step); use "
                    "structure='unstructured', or another `prune_on` for N:M"
                )
            check_keeps_pruned(self._config)
            if isinstance(trigger, Schedule):
                trigger.toward(structure.sparsity)
        if self._config.method.permute_channels and (
            trigger.repeats or trigger.name in ("train_epoch_end", "train_step", "fit_start")
        ):
            raise ValueError(
                f"`method`={self._config.method.name!r} reorders the hidden units of MLPs, and training goes on after "
                f"`prune_on`={trigger.name!r} with optimizer state kept in their old order; use "
                "prune_on='fit_end', 'validate' or 'checkpoint', or method='ria'"
            )

    def plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PrunePlan:
        """The target layers, found and checked (:func:`~wanda_lightning.pruning.plan_prune`), and the GGUF export's
        tokenizer."""
        self._exports.check_tokenizer(pl_module)
        return plan_prune(pl_module, self._config)

    def apply(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any] | None, due: Due, plan: Any
    ) -> PruningReport:
        """Prunes with :func:`~wanda_lightning.pruning.prune_with` (at the due sparsity of a schedule, keeping what the
        masks already hold), keeps the masks it returns and measures the sparsity reached."""
        config = self._config.with_batches_as_given()
        if due.sparsity is not None:
            config = replace(config, structure=replace(config.structure, sparsity=due.sparsity))
        already = self._keeper.drops() if self._trigger.repeats and self._keeper.active else None
        with TrainerProgress(trainer, "Wanda pruning", len(plan.layers)) as progress:
            result = prune_with(
                pl_module,
                batches,
                config,
                forward_fn=self.forward(trainer, pl_module),
                sync_statistics=strategy_sync(trainer),
                on_layer_pruned=lambda name, keep: progress.advance(),
                already_pruned=already,
                keep_masks=True,
                plan=plan,
            )
        self._new_masks = result.masks
        self.global_sparsity, self.sparsities = measure_sparsity(
            {name: local_tensor(weight) for name, weight in result.parameters().items()}
        )
        return result.report

    def action_metrics(self) -> dict[str, float]:
        return {"wanda/sparsity": self.global_sparsity}

    def logged_only_metrics(self) -> dict[str, float]:
        return {f"wanda/sparsity/{name}": value for name, value in self.sparsities.items()}

    def on_action_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due, fitting: bool) -> None:
        """Keeps the masks (applied while training goes on) and exports after the last step."""
        self._keeper.set(self._new_masks, from_weights=holds_shards(pl_module))
        if self._exports.folder is not None and due.final:
            self.export_summary = export_module(trainer, pl_module, self._exports.folder, masks=self.masks)
            if self.export_summary is not None:
                summary = self.export_summary
                log_to_loggers(
                    trainer,
                    {"wanda/export_bytes": float(summary.disk_bytes), "wanda/export_ratio": summary.compressed_ratio},
                )
        if due.final:
            self._exports.write_ggufs(trainer, pl_module, type(self).__name__)
        if fitting:
            self._keeper.attach(trainer, pl_module)

    def on_restored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keeper.attach(trainer, pl_module)

    def on_run_finished(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Writes the GGUF files again (after training on sparse) and stops keeping the masks."""
        if self.pruned and trainer.state.fn == TrainerFn.FITTING:
            self._exports.write_ggufs(trainer, pl_module, type(self).__name__)
        self._keeper.detach()

    # --- hooks -------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy; for ``prune_on="checkpoint"`` also wraps the module's ``on_save_checkpoint`` so that
        weights-only checkpoints (which call no callback hook) are pruned too."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self._trigger.on_checkpoints and self._unwrap_save is None:
            self._unwrap_save = wrap_weights_only_saves(
                pl_module, lambda checkpoint: self._prune_checkpoint(trainer, pl_module, checkpoint, keep_dense=False)
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Removes the optimizer hooks and the ``on_save_checkpoint`` wrapper."""
        super().teardown(trainer, pl_module, stage)
        self._keeper.detach()
        if self._unwrap_save is not None:
            self._unwrap_save()
            self._unwrap_save = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Zeroes the gradients of pruned weights (before gradient clipping and the step)."""
        self._keeper.zero_gradients(pl_module, optimizer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """With ``prune_on="checkpoint"``, replaces the affected weights of ``checkpoint["state_dict"]`` by pruned
        ones and keeps the dense ones under ``checkpoint["wanda_dense_weights"]`` for resuming."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._trigger.on_checkpoints:
            self._prune_checkpoint(trainer, pl_module, checkpoint, keep_dense=True)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming from a ``prune_on="checkpoint"`` checkpoint restores the dense weights it kept."""
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        with misconfiguration():
            restored = restore_dense_weights(pl_module, checkpoint)
        if restored:
            rank_zero_info(
                f"WandaPruningCallback: restored the dense weights of {restored} layers from the checkpoint "
                "(its `state_dict` holds their pruned copies)"
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._keeper.detach()

    # --- state -------------------------------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """The configuration, the bit-packed masks and the sparsities."""
        return {
            "config": self._state_config(),
            **self._keeper.state_dict(),
            "global_sparsity": self.global_sparsity,
            "sparsities": dict(self.sparsities),
        }

    def load_extra_state(self, state: Mapping[str, Any], version: int) -> None:
        config, current = state.get("config", {}), self._state_config()
        if config and config != current:
            changed = sorted(k for k in set(config) | set(current) if config.get(k) != current.get(k))
            rank_zero_warn(
                f"WandaPruningCallback: the checkpoint was made with a different configuration ({changed}); its state "
                "(masks, report) is restored as saved"
            )
        self._keeper.load_state_dict(dict(state), version)
        self.global_sparsity = float(state.get("global_sparsity", 0.0))
        self.sparsities = dict(state.get("sparsities", {}))

    def _state_config(self) -> dict[str, Any]:
        config = self._config.to_dict()
        keys = ("sparsity", "structure", "method", "targets", "ignore", "sequential", "blocks", "num_samples")
        state = {key: config[key] for key in keys}
        trigger = cast(Any, self._trigger)
        state.update(
            batch_size=self.calibration_options.batch_size,
            prune_on=trigger.name,
            epoch=getattr(trigger, "epoch", None),
        )
        if isinstance(getattr(trigger, "step", None), int):
            state["step"] = trigger.step
        if trigger.repeats:
            state.update(start_step=trigger.start_step, end_step=trigger.end_step, every_n_steps=trigger.every_n_steps)
        return state

    def _prune_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any], keep_dense: bool
    ) -> None:
        """Puts pruned weights, computed on temporary copies, into ``checkpoint["state_dict"]``; the live ones stay."""
        with misconfiguration():
            check_strategy(trainer)
            plan = self.plan(trainer, pl_module)
        parameters = {name: cast(nn.Parameter, weight) for name, weight in plan.parameters().items()}
        with temporary_weights(parameters) as pruned:
            self._run_and_record(trainer, pl_module, Due(f"checkpoint at step {trainer.global_step}"), plan)
        put_pruned_weights(checkpoint, pruned, keep_dense)
