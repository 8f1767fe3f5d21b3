r"""
WandaPruningCallback
^^^^^^^^^^^^^^^^^^^^

Wanda pruning inside a Lightning run: calibrated on the run's own data, measured with the module's own validation
metrics, logged to the trainer's loggers, and kept through checkpoints, resumption and DDP.

The hooks, calibration, measurement, reporting and distillation are :class:`~.calibrated_callback.CalibratedCallback`'s;
this class says what its action is (masks from :func:`~wanda_lightning.pruning.api.prune_with`) and keeps them:
:mod:`~wanda_lightning.lightning.masks` (pruned weights held at zero while training goes on),
:mod:`~wanda_lightning.lightning.checkpointing` (``prune_on="checkpoint"``) and
:mod:`~wanda_lightning.lightning.exporting` (``export_dir``).
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
    r"""Prunes the LightningModule with Wanda (``|W| * ||X||`` per output row) at a chosen point of the run, or
    gradually on a sparsity schedule.

    The callback calibrates on the run's own batches (by default the validation dataloader, with its DDP sampler),
    measures every metric the module logs in ``validation_step`` before and after pruning, logs sparsity and metric
    deltas to all of the trainer's loggers, and prints a summary on rank zero. Pruned weights are physically zero
    under their own parameter names, so every checkpoint loads with ``load_from_checkpoint`` (or in plain
    transformers) without this callback.

    When pruning happens (``prune_on``):

    - ``"fit_end"`` (default): after the last training step of ``fit`` (``max_steps`` or the last batch of
      ``max_epochs``), so the final validation, the last checkpoint and anything exported after ``fit`` see the pruned
      model. A fit that stops early (early stopping, ``max_time``) is pruned in ``on_train_end`` instead, and each
      ``ModelCheckpoint``'s last checkpoint is saved again.
    - ``AfterEpoch(k)`` (:class:`~wanda_lightning.AfterEpoch`): after the last training batch of epoch ``k`` (before
      that epoch's validation and checkpoint); training then goes on sparse.
    - ``AfterStep(k)`` (:class:`~wanda_lightning.AfterStep`): once ``k`` optimizer steps are done; training then goes on
      sparse.
    - ``"fit_start"``: when training starts, so that the whole fit is sparse fine-tuning.
    - ``"validate"``: ``trainer.validate(model)`` prunes the model before validating it, and reports.
    - ``"checkpoint"``: every checkpoint saved holds a pruned ``state_dict`` (computed on a temporary copy of the
      affected weights), while the live run keeps training dense. Full checkpoints also keep the dense weights under
      the top-level key ``"wanda_dense_weights"``: resuming with this callback continues the dense run; loading the
      checkpoint anywhere else gives the pruned model.
    - ``Schedule(end_step=..., start_step=0, every_n_steps=None)`` (:class:`~wanda_lightning.Schedule`): gradual pruning
      (Zhu & Gupta, 2017). Every ``every_n_steps`` optimizer steps from ``start_step`` to ``end_step`` the model is
      re-scored with Wanda on the calibration batches and pruned to the sparsity of a cubic ramp from 0 to ``sparsity``
      (``s(t) = sparsity * (1 - (1 - (t - start_step) / (end_step - start_step)) ** 3)``), with training in between.
      Weights pruned at one step stay pruned at the next (they score below every other weight). Unstructured only,
      with methods that score and select (``"wanda"``, ``"magnitude"``, ``"ria"``), no ``refine``; not under FSDP.
      ``<metric>/dense`` is measured once, before the first step; ``/pruned`` after each step.

    While training continues after pruning, the gradients of pruned weights are zeroed before each optimizer step, and
    after each step the masks are re-applied and the optimizer states of pruned entries (``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``, ...) are zeroed, so sparsity stays exact. The masks (bit-packed), the
    configuration and the report go through :meth:`state_dict`: a run resumed from a checkpoint saved after pruning
    keeps its masks and does not prune again (a schedule goes on with its next step).

    Models that are not a causal LM called through ``forward``:

    - PEFT LoRA / DoRA (``get_peft_model``): the base layers' weights are pruned, from the statistics of the LoRA
      layer's input (``...q_proj.base_layer``); the adapter matrices (``lora_A``, ``lora_B``, DoRA's magnitude) are
      never targets, and target patterns match base layers by the wrapped layer's name too (``"*.q_proj"``). The masks
      hold while the adapters train. ``export_dir`` merges the adapters on a copy with
      :func:`~wanda_lightning.merge_adapters`, which keeps the pruned entries at zero (peft's own ``merge_and_unload``
      cannot know the masks and fills them with the adapters' dense update). A bitsandbytes-quantized base is refused
      with an error naming the layer.
    - ``torch.nn.MultiheadAttention`` (``nn.TransformerEncoder``/``Decoder``, torchvision's ViT, custom models): the
      query, key and value thirds of ``in_proj_weight`` (or the separate weights) are pruned from the statistics of
      the ``query``, ``key`` and ``value`` inputs, ``out_proj`` from the attention output before the projection (see
      :mod:`~wanda_lightning.core.attention`). Masks are by parameter name (``...self_attn.in_proj_weight``).
    - A LightningModule without ``forward``: calibration runs ``validation_step`` on validation batches (or on a
      ``DataLoader`` given as ``calibration``) and ``training_step`` on training batches (``calibration="train"``),
      under ``no_grad``, with what they log captured and thrown away and their torchmetrics states restored.
      ``calibration_options.forward_fn`` / :meth:`calibration_forward` still override.

    Logged with ``logger.log_metrics`` at ``trainer.global_step``: ``wanda/sparsity`` (over all pruned layers),
    ``wanda/sparsity/<layer>`` (through :class:`~wanda_lightning.lightning.metrics.Sparsity`), and, with
    ``evaluate=True``, for every metric the module logs in validation: ``<name>/dense``, ``<name>/pruned`` and
    ``<name>/delta`` (pruned minus dense), measured by running the module's ``validation_step`` over the same
    validation batches before and after pruning. The same values (``wanda/sparsity`` and the three per metric) are put
    in ``trainer.callback_metrics``, identical on every process, so that ``ModelCheckpoint(monitor="val_loss/pruned")``
    and ``EarlyStopping`` can monitor them (again after a resume).

    Under DDP (``"ddp"``, ``"ddp_spawn"``, any number of nodes) the calibration statistics (float32 sums and int64
    counts) are all-reduced, so every process computes the same masks as one process would over the union of all
    processes' calibration batches.

    Under ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``, ``tensor_parallel_size=1``)
    each process prunes its own rows of every weight (``Shard(0)``) from the all-reduced statistics: no weight is
    gathered. Every process runs as many calibration batches (the fewest any has, with a warning when they differ), so
    the sharded forwards stay in step. The masks are not kept in the callback state (each process holds only its
    shards'); a resumed run reads them back from the zeros of the restored weights. ``prune_on="checkpoint"`` is
    refused there; ``export_dir`` gathers the full weights on rank zero's CPU. Methods that compare weights across
    rows (SparseGPT unstructured, RIA, Wanda's variant) are refused with sharded weights; ADMM ranks within each row
    there instead of over whole layers, with a warning.

    Under ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``, Lightning's default) calibration runs in one pass through
    the FSDP root (block-sequential calibration would stop FSDP1 forwards midway), then each FSDP unit's full
    parameters are summoned in turn (``summon_full_params(writeback=True)``), pruned identically on every process and
    written back to the shards: peak memory is one unit (one decoder block). Every method works there. DeepSpeed and
    tensor parallelism get a clear error.

    Args:
        sparsity: Fraction of weights zeroed in every output row, in ``[0, 1)``; default 0.5 when unstructured and
            implied by an ``N:M`` structure.
        structure: ``"unstructured"`` or ``"N:M"`` (N of every M consecutive input weights are kept, such as
            ``"2:4"``).
        method: Pruning method name: ``"wanda"``, ``"magnitude"`` (which needs no calibration), ``"sparsegpt"``,
            ``"admm"`` (see :class:`~wanda_lightning.ADMM`), ``"ria"``, ``"ria-permuted"`` (N:M only; not with
            ``prune_on=AfterEpoch(k)``), or another name registered with
            :func:`~wanda_lightning.register_method`; or a method object (``Wanda(variant=True)``: the reference
            code's per-row cumulative-score selection, ``--use_variant``; in YAML a ``class_path`` with ``init_args``).
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"``: per-block sparsities from the outlier
            share of Wanda scores (unstructured only; see :class:`~wanda_lightning.OWL`).
        refine: ``"none"`` or DSnoT swaps of pruned and kept weights (see :class:`~wanda_lightning.DSnoT`):
            ``"dsnot"`` (its default guard, ``"expected"``), ``"dsnot-expected"`` (swaps that lower the expected output
            error under DSnoT's input model; Wanda's calibration cost), ``"dsnot-exact"`` (swaps that lower the exact
            reconstruction error; needs each layer's input Gram matrix) or ``"dsnot-unguarded"`` (the paper's rules
            alone); or ``"admm-update"``: the method's mask with the kept weights that best reproduce the dense
            layer's outputs (ADMM on each layer's Gram matrix, see :class:`~wanda_lightning.ADMMUpdate`); or
            ``"reconstruct"`` / a :class:`~wanda_lightning.Reconstruction`: each pruned block's kept weights trained
            to the dense block's outputs on the calibration activations, the pruned ones held at zero.
        targets: Name patterns (glob, or regex prefixed with ``re:``) of the layers to prune, relative to the
            LightningModule (``"model.model.layers.*"``); default every ``nn.Linear`` and transformers ``Conv1D``.
        ignore: Name patterns to leave alone; default ``["lm_head"]``. Weights tied to an embedding are always left
            alone.
        calibration: ``"val"``: the trainer's validation dataloader (the first one, as the trainer processed it,
            with its distributed sampler); ``"train"``: the training dataloader; or a ``DataLoader`` (or any iterable
            of batches), whose batches are split between DDP processes.
        calibration_options: How calibration runs: :class:`~wanda_lightning.CalibrationOptions` (``num_samples``
            over all processes, default 128; ``batch_size``; ``sequential``; ``blocks``, such as
            ``"model.model.layers"``; ``device``; ``offload_device``; ``forward_fn(pl_module, batch)``).
        prune_on: When to prune: ``"fit_end"``, ``"fit_start"``, ``"validate"``, ``"checkpoint"``, or a trigger
            object: ``AfterEpoch(k)``, ``AfterStep(k)``, ``Schedule(end_step=200)`` (see above).
        distill: While training goes on after pruning, distil from the model as it was just before (masks held at
            zero): ``True`` or a :class:`~wanda_lightning.Distillation` (weight, temperature, teacher device). The
            teacher is kept in full checkpoints, so distillation resumes. Default off.
        evaluate: Measure the module's validation metrics before and after pruning and log the deltas: ``True`` on
            as many validation batches (per process) as the trainer validates (``limit_val_batches``), an ``int`` on
            at most that many, ``False`` not at all.
        export: What to write for deployment, on rank zero: a folder (after pruning, after the last step of a
            schedule: the compact export, :func:`~wanda_lightning.save_pruned`'s format, where the pruned weights take
            about half their dense bytes), a path ending in ``.gguf`` or a :class:`~wanda_lightning.GGUFExport` (a GGUF
            file for llama.cpp and Ollama, written when the callback acts and again at the end of fit; masks do not
            make it smaller or faster there, see :func:`~wanda_lightning.save_gguf`), or a list of them.
        verbose: Print the summary table (the report and the metric deltas) on rank zero.

    Raises:
        MisconfigurationException: For an invalid argument (the message names it, the value and what is allowed), or
            later, before any weight changes, when the run cannot be pruned: no validation dataloader for
            ``calibration="val"``, a calibration dataloader that yields nothing, batches the module's forward cannot
            take, an unsupported strategy (DeepSpeed, tensor parallelism, FSDP1 with ``use_orig_params=False``, ...),
            target patterns that match no layer.

    Example::

        from lightning.pytorch import Trainer
        from wanda_lightning import WandaPruningCallback

        trainer = Trainer(max_steps=100, callbacks=[WandaPruningCallback(sparsity=0.5, evaluate=8)])
        trainer.fit(model, train_loader, val_loader)  # fine-tunes, then prunes; the last checkpoint is sparse

    Gradually, to 70 % over 200 steps (pruning at steps 50, 100, 150 and 200), keeping the best pruned checkpoint::

        pruning = WandaPruningCallback(sparsity=0.7, prune_on=Schedule(end_step=200, every_n_steps=50))
        best = ModelCheckpoint(monitor="val_loss/pruned", mode="min")
        Trainer(max_steps=300, callbacks=[pruning, best]).fit(model, train_loader, val_loader)

    In a LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: wanda_lightning.WandaPruningCallback
              init_args:
                sparsity: 0.5
                structure: "2:4"
                prune_on:
                  class_path: wanda_lightning.AfterEpoch
                  init_args:
                    epoch: 0
                calibration_options:
                  num_samples: 64
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
