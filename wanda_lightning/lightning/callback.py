r"""
WandaPruningCallback
^^^^^^^^^^^^^^^^^^^^

Wanda pruning inside a Lightning run: calibrated on the run's own data, measured with the module's own validation
metrics, logged to the trainer's loggers, and kept through checkpoints, resumption and DDP.

The class is its hooks; each asks the run's :mod:`trigger <wanda_lightning.lightning.triggers>` whether pruning is due
and delegates to the parts: :mod:`~wanda_lightning.lightning.calibration` (batches and forward),
:mod:`~wanda_lightning.lightning.evaluation` (dense and pruned metrics), :mod:`~wanda_lightning.lightning.masks`
(keeping pruned weights at zero), :mod:`~wanda_lightning.lightning.checkpointing` (``prune_on="checkpoint"``),
:mod:`~wanda_lightning.lightning.exporting` (``export_dir``) and :mod:`~wanda_lightning.lightning.strategies`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from copy import deepcopy
from dataclasses import replace
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..core.batches import default_forward
from ..core.layers import local_tensor
from ..core.targets import find_targets, layer_masks, parameter_masks
from ..core.validation import check_bool, check_positive
from ..distributed.sharding import holds_shards, is_fsdp1
from ..methods.registry import AllocationName, RefinementName, get_method
from ..pruning.action import check_keeps_pruned
from ..pruning.api import prune_with
from ..pruning.config import PruneConfig
from ..pruning.report import PruningReport
from .calibration import CalibrationData, CalibrationSource, first_loader, has_forward, warn_if_no_validation
from .checkpointing import put_pruned_weights, restore_dense_weights, unwrap_saves, wrap_weights_only_saves
from .errors import misconfiguration
from .evaluation import measure_validation, quiet_steps, run_step
from .exporting import export_module
from .masks import MaskKeeper, masks_of_zeros
from .metrics import Sparsity
from .progress import TrainerProgress
from .strategies import check_strategy, is_sharded_strategy, strategy_sync
from .summary import format_summary, log_to_loggers, metric_deltas, publish_metrics
from .triggers import Due, PruneOn, make_trigger

__all__ = ["WandaPruningCallback"]

_STATE_VERSION = 2  # 2: masks packed as in the export format (least significant bit first)


def _check_schedulable(config: PruneConfig) -> None:
    """Raises ``ValueError`` unless ``config`` can prune on a schedule (unstructured, keeping what was pruned)."""
    structure = config.structure
    if structure.is_n_m:
        raise ValueError(
            f"`prune_on`='schedule' raises the sparsity step by step, which `structure`={structure.name!r} fixes at "
            f"{structure.sparsity:g} (N of every M kept from the first step); use structure='unstructured', or "
            "another `prune_on` for N:M"
        )
    check_keeps_pruned(config)


class WandaPruningCallback(Callback):
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
    - ``"train_epoch_end"`` with ``epoch=k``: after the last training batch of epoch ``k`` (before that epoch's
      validation and checkpoint); training then goes on sparse.
    - ``"train_step"`` with ``step=k``: once ``k`` optimizer steps are done; training then goes on sparse.
    - ``"fit_start"``: when training starts, so that the whole fit is sparse fine-tuning.
    - ``"validate"``: ``trainer.validate(model)`` prunes the model before validating it, and reports.
    - ``"checkpoint"``: every checkpoint saved holds a pruned ``state_dict`` (computed on a temporary copy of the
      affected weights), while the live run keeps training dense. Full checkpoints also keep the dense weights under
      the top-level key ``"wanda_dense_weights"``: resuming with this callback continues the dense run; loading the
      checkpoint anywhere else gives the pruned model.
    - ``"schedule"`` with ``end_step`` (and ``start_step``, ``every_n_steps``): gradual pruning (Zhu & Gupta, 2017).
      Every ``every_n_steps`` optimizer steps from ``start_step`` to ``end_step`` the model is re-scored with Wanda on
      the calibration batches and pruned to the sparsity of a cubic ramp from 0 to ``sparsity``
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
      ``forward_fn`` / :meth:`calibration_forward` still override.

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
            ``prune_on="train_epoch_end"``), or another name registered with
            :func:`~wanda_lightning.register_method`.
        variant: For ``"wanda"``, the reference code's per-row cumulative-score selection (``--use_variant``).
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"``: per-block sparsities from the outlier
            share of Wanda scores (unstructured only; see :class:`~wanda_lightning.OWL`).
        refine: ``"none"`` or DSnoT swaps of pruned and kept weights (see :class:`~wanda_lightning.DSnoT`):
            ``"dsnot"`` (its default guard, ``"expected"``), ``"dsnot-expected"`` (swaps that lower the expected output
            error under DSnoT's input model; Wanda's calibration cost), ``"dsnot-exact"`` (swaps that lower the exact
            reconstruction error; needs each layer's input Gram matrix) or ``"dsnot-unguarded"`` (the paper's rules
            alone); or ``"admm-update"``: the method's mask with the kept weights that best reproduce the dense
            layer's outputs (ADMM on each layer's Gram matrix, see :class:`~wanda_lightning.ADMMUpdate`).
        targets: Name patterns (glob, or regex prefixed with ``re:``) of the layers to prune, relative to the
            LightningModule (``"model.model.layers.*"``); default every ``nn.Linear`` and transformers ``Conv1D``.
        ignore: Name patterns to leave alone; default ``["lm_head"]``. Weights tied to an embedding are always left
            alone.
        sequential: Block-sequential calibration when a stack of repeated blocks is found (the Wanda reference);
            ``False`` for one forward pass over the whole model.
        blocks: Module name of the block stack (``"model.model.layers"``); found automatically when ``None``.
        num_samples: Most calibration sequences, over all processes (each of ``W`` DDP processes takes about
            ``num_samples / W`` from its shard); ``None`` for the whole dataloader.
        batch_size: Sequences per calibration forward pass; ``None`` keeps the dataloader's batches.
        offload_device: Where block inputs wait between blocks (say ``"cpu"`` to save accelerator memory); ``None``
            keeps them where they were computed.
        calibration: ``"val"``: the trainer's validation dataloader (the first one, as the trainer processed it,
            with its distributed sampler); ``"train"``: the training dataloader; or a ``DataLoader`` (or any iterable
            of batches), whose batches are split between DDP processes.
        prune_on: When to prune: ``"fit_end"``, ``"train_epoch_end"``, ``"train_step"``, ``"fit_start"``,
            ``"validate"``, ``"checkpoint"`` or ``"schedule"`` (see above).
        epoch: With ``prune_on="train_epoch_end"`` only (and required there): the zero-based epoch after which to
            prune.
        step: With ``prune_on="train_step"`` only (and required there): prune once this many optimizer steps are done
            (``trainer.global_step`` reaches it); training then goes on sparse.
        start_step: With ``prune_on="schedule"`` only: the global step where the sparsity ramp starts (default 0).
        end_step: With ``prune_on="schedule"`` only (and required there): the global step where the ramp reaches
            ``sparsity``; greater than ``start_step``.
        every_n_steps: With ``prune_on="schedule"`` only: optimizer steps between two pruning steps (default: a tenth
            of the ramp, at least 1).
        evaluate: Measure the module's validation metrics before and after pruning and log the deltas.
        num_eval_batches: Most validation batches (per process) for each of the two measurements; ``None`` for as
            many as the trainer validates (``limit_val_batches``).
        forward_fn: ``forward_fn(pl_module, batch)`` runs the module on one calibration batch, for modules whose
            ``forward`` does not take the batch as is (default: ``pl_module(**batch)`` for a mapping,
            ``pl_module(batch[0])`` for a tuple or list, ``pl_module(batch)`` for a tensor; for a module without
            ``forward``, its ``validation_step`` or ``training_step``). Or override :meth:`calibration_forward`.
        export_dir: After pruning (after the last step of a schedule), rank zero writes the compressed export there
            (see :func:`~wanda_lightning.save_pruned`; PEFT adapters merged with the masks kept; an existing export is
            replaced) and logs ``wanda/export_bytes`` and ``wanda/export_ratio``. Not with ``prune_on="checkpoint"``.
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

        trainer = Trainer(max_steps=100, callbacks=[WandaPruningCallback(sparsity=0.5, num_eval_batches=8)])
        trainer.fit(model, train_loader, val_loader)  # fine-tunes, then prunes; the last checkpoint is sparse

    Gradually, to 70 % over 200 steps (pruning at steps 50, 100, 150 and 200), keeping the best pruned checkpoint::

        pruning = WandaPruningCallback(sparsity=0.7, prune_on="schedule", start_step=0, end_step=200, every_n_steps=50)
        best = ModelCheckpoint(monitor="val_loss/pruned", mode="min")
        Trainer(max_steps=300, callbacks=[pruning, best]).fit(model, train_loader, val_loader)

    In a LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: wanda_lightning.WandaPruningCallback
              init_args:
                sparsity: 0.5
                structure: "2:4"
                prune_on: train_epoch_end
                epoch: 0
    """

    def __init__(
        self,
        sparsity: float | None = None,
        structure: str = "unstructured",
        method: str = "wanda",
        variant: bool = False,
        allocation: AllocationName = "uniform",
        refine: RefinementName = "none",
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] | None = None,
        sequential: bool = True,
        blocks: str | None = None,
        num_samples: int | None = 128,
        batch_size: int | None = None,
        offload_device: str | None = None,
        calibration: CalibrationSource | DataLoader = "val",
        prune_on: PruneOn = "fit_end",
        epoch: int | None = None,
        step: int | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        every_n_steps: int | None = None,
        evaluate: bool = True,
        num_eval_batches: int | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        export_dir: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        with misconfiguration():
            check_bool(variant, "variant")
            if variant and (not isinstance(method, str) or method.lower() != "wanda"):
                raise ValueError(f"`variant`=True applies to method 'wanda' only, got `method`={method!r}")
            for patterns, name in ((targets, "targets"), (ignore, "ignore")):
                if isinstance(patterns, str):  # a YAML scalar where a list was meant
                    raise TypeError(
                        f"`{name}` must be a list of name patterns, not a single string: use [{patterns!r}]"
                    )
            self._config = PruneConfig.create(
                sparsity=sparsity,
                structure=structure,
                method=get_method(method, variant=True) if variant else method,
                allocation=allocation,
                refine=refine,
                targets=targets,
                ignore=ignore,
                sequential=sequential,
                blocks=blocks,
                num_samples=num_samples,
                batch_size=batch_size,
                offload_device=offload_device,
            )
            for flag, name in ((evaluate, "evaluate"), (verbose, "verbose")):
                check_bool(flag, name)
            check_positive(num_eval_batches, "num_eval_batches")
            self._calibration = CalibrationData(calibration, num_samples, batch_size, self.calibration_forward)
            self._trigger = make_trigger(
                prune_on,
                epoch,
                step,
                sparsity=self._config.structure.sparsity,
                start_step=start_step,
                end_step=end_step,
                every_n_steps=every_n_steps,
            )
            if self._trigger.repeats:
                _check_schedulable(self._config)
            if self._config.method.permute_channels and prune_on in (
                "train_epoch_end",
                "train_step",
                "fit_start",
                "schedule",
            ):
                raise ValueError(
                    f"`method`={method!r} reorders the hidden units of MLPs, and training goes on after "
                    f"`prune_on`={prune_on!r} with optimizer state kept in their old order; use "
                    "prune_on='fit_end', 'validate' or 'checkpoint', or method='ria'"
                )
            if forward_fn is not None and not callable(forward_fn):
                raise TypeError(
                    f"`forward_fn` must be callable as forward_fn(pl_module, batch), or None, got {forward_fn!r}"
                )
            if export_dir is not None and (not isinstance(export_dir, (str, os.PathLike)) or not str(export_dir)):
                raise TypeError(f"`export_dir` must be a directory path or None, got {export_dir!r}")
            if export_dir is not None and self._trigger.on_checkpoints:
                raise ValueError(
                    "`export_dir` exports the live pruned model, which `prune_on`='checkpoint' never prunes; use "
                    "another `prune_on`, or export a checkpoint with `wanda-lightning prune`/`compress_checkpoint`"
                )
        self.sparsity = self._config.structure.sparsity
        self.structure = self._config.structure.name
        self.method = self._config.method.name
        self.variant = variant
        self.allocation = allocation
        self.refine = refine
        self.targets = self._config.targets
        self.ignore = self._config.ignore
        self.sequential = sequential
        self.blocks = blocks
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.offload_device = offload_device
        self.calibration = calibration
        self.prune_on = prune_on
        self.epoch = epoch
        self.step = step
        self.start_step = start_step
        self.end_step = end_step
        self.every_n_steps = every_n_steps
        self.evaluate = evaluate
        self.num_eval_batches = num_eval_batches
        self.forward_fn = forward_fn
        self.export_dir = export_dir
        self.verbose = verbose

        self.export_summary: Any = None
        self.report: PruningReport | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.global_sparsity = 0.0
        self.sparsities: dict[str, float] = {}
        self.evaluation_seconds = 0.0
        #: A schedule's dense measurement, taken before its first step and kept for the deltas of the later ones.
        self._dense_metrics: dict[str, float] | None = None
        self._keeper = MaskKeeper(self.targets, self.ignore)
        self._pruned_in_this_run = False
        self._wrapped_save = False
        self._when = "a restored checkpoint"

    # --- public -------------------------------------------------------------------------------------------------------

    @property
    def pruned(self) -> bool:
        """Whether the model was pruned (or its masks restored from a checkpoint); never for ``"checkpoint"``."""
        return self._keeper.active

    @property
    def masks(self) -> dict[str, Tensor]:
        """Keep masks by parameter name (``"model.model.layers.0.mlp.up_proj.weight"``), True where a weight is kept,
        shaped like the parameter; empty before pruning."""
        return self._keeper.keep_masks()

    def calibration_forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Runs ``pl_module`` on one calibration batch, already on its device; override for custom batch formats.

        The default calls ``forward_fn(pl_module, batch)`` when given, else ``pl_module(**batch)`` for a mapping,
        ``pl_module(batch[0])`` for a tuple or list and ``pl_module(batch)`` for a tensor. A module that does not
        define ``forward`` runs the step the trainer runs on such batches instead: ``training_step(batch, 0)`` for
        ``calibration="train"``, else ``validation_step(batch, 0)`` (what it logs is captured and thrown away, and its
        torchmetrics states are restored afterwards). It runs in ``no_grad``, under the precision plugin's forward
        context, with the module in eval mode. The output is ignored.

        Args:
            pl_module: The LightningModule being pruned.
            batch: One calibration batch, after the module's batch-transfer hooks.

        Returns:
            Whatever the forward returns.

        Example::

            class MyPruning(WandaPruningCallback):
                def calibration_forward(self, pl_module, batch):
                    tokens, _labels = batch
                    return pl_module.model(input_ids=tokens)
        """
        if self.forward_fn is not None:
            return self.forward_fn(pl_module, batch)
        if not has_forward(pl_module):
            return run_step(pl_module, self._calibration.step_name, batch)
        return default_forward(pl_module, batch)

    def summary(self) -> str:
        """The summary table: the core report, then dense/pruned/delta for each validation metric, then times."""
        return format_summary(type(self).__name__, self.report, self._when, self.metrics, self.evaluation_seconds)

    # --- hooks --------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy; for ``prune_on="checkpoint"`` also wraps the module's ``on_save_checkpoint`` so that
        weights-only checkpoints (which call no callback hook) are pruned too."""
        if stage in ("fit", "validate"):
            with misconfiguration():
                check_strategy(trainer)
            if is_sharded_strategy(trainer) and self._trigger.repeats:
                raise MisconfigurationException(
                    f"`prune_on`='schedule' re-prunes a partly pruned model, which is not supported under "
                    f"{type(trainer.strategy).__name__} (sharded weights) yet: use DDP or a single device, or another "
                    "`prune_on`"
                )
            if is_sharded_strategy(trainer) and self._trigger.on_checkpoints:
                raise MisconfigurationException(
                    "`prune_on`='checkpoint' prunes temporary copies of the weights, which FSDP2 "
                    f"({type(trainer.strategy).__name__}) does not allow for its sharded parameters: use 'fit_end', "
                    "'train_epoch_end' or 'validate', or prune a saved checkpoint with `wanda-lightning prune`"
                )
        if stage == "fit" and self._trigger.on_checkpoints and not self._wrapped_save:
            wrap_weights_only_saves(
                pl_module, lambda checkpoint: self._prune_checkpoint(trainer, pl_module, checkpoint, keep_dense=False)
            )
            self._wrapped_save = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Removes the optimizer hooks and the ``on_save_checkpoint`` wrapper."""
        self._keeper.detach()
        if self._wrapped_save:
            unwrap_saves(pl_module)
            self._wrapped_save = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restores masks (after a resume or a pruning ``validate``) or checks that pruning will be possible."""
        if self.pruned:
            with misconfiguration():
                self._keeper.attach(trainer, pl_module)
            self._publish(trainer)
            if not self._trigger.repeats:
                return
        elif self._trigger.checks_at_train_start:
            self._preflight(trainer, pl_module)
        self._act(trainer, pl_module, self._trigger.at_train_start(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Prunes when the trigger says so (after the last batch of the fit, or of epoch ``epoch``)."""
        self._act(trainer, pl_module, self._trigger.after_train_batch(trainer, batch_idx))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fallback for ``"train_epoch_end"`` when the last batch of the epoch could not be told in advance."""
        self._act(trainer, pl_module, self._trigger.after_train_epoch(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prunes a fit that stopped early (``"fit_end"``) and prints the summary."""
        self._act(trainer, pl_module, self._trigger.at_train_end(trainer, acted=self.pruned))
        self._keeper.detach()
        if self._pruned_in_this_run or (self._trigger.on_checkpoints and self.report is not None):
            self._print_summary()
            self._pruned_in_this_run = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``prune_on="validate"``, prunes before ``trainer.validate`` runs (once)."""
        due = self._trigger.before_validation(trainer)
        if due is not None and not self.pruned:
            self._preflight(trainer, pl_module)
            self._act(trainer, pl_module, due)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prints the summary after a pruning ``trainer.validate``."""
        if trainer.state.fn == TrainerFn.VALIDATING and self._pruned_in_this_run:
            self._print_summary()
            self._pruned_in_this_run = False

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
        if self._trigger.on_checkpoints:
            self._prune_checkpoint(trainer, pl_module, checkpoint, keep_dense=True)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming from a ``prune_on="checkpoint"`` checkpoint restores the dense weights it kept."""
        with misconfiguration():
            restored = restore_dense_weights(pl_module, checkpoint)
        if restored:
            rank_zero_info(
                f"WandaPruningCallback: restored the dense weights of {restored} layers from the checkpoint "
                "(its `state_dict` holds their pruned copies)"
            )

    def state_dict(self) -> dict[str, Any]:
        """The configuration, the bit-packed masks, the report, the measured metrics and where a schedule stands."""
        return {
            "version": _STATE_VERSION,
            "config": self._state_config(),
            **self._keeper.state_dict(),
            "report": self.report.to_dict() if self.report is not None else None,
            "metrics": deepcopy(self.metrics),
            "dense_metrics": deepcopy(self._dense_metrics),
            "global_sparsity": self.global_sparsity,
            "sparsities": dict(self.sparsities),
            "trigger": self._trigger.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores masks, report and metrics; the masks are applied when training starts, and nothing is pruned
        again."""
        config, current = state_dict.get("config", {}), self._state_config()
        if config and config != current:
            changed = sorted(k for k in set(config) | set(current) if config.get(k) != current.get(k))
            rank_zero_warn(
                f"WandaPruningCallback: the checkpoint was made with a different configuration ({changed}); its state "
                "(masks, report) is restored as saved"
            )
        self._keeper.load_state_dict(state_dict, int(state_dict.get("version", 1)))
        report = state_dict.get("report")
        self.report = PruningReport.from_dict(report) if report else None
        self.metrics = deepcopy(state_dict.get("metrics", {}))
        self.global_sparsity = float(state_dict.get("global_sparsity", 0.0))
        self.sparsities = dict(state_dict.get("sparsities", {}))
        dense = state_dict.get("dense_metrics")
        self._dense_metrics = deepcopy(dense) if dense is not None else None
        self._trigger.load_state_dict(state_dict.get("trigger") or {})

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._keeper.detach()

    # --- pruning ------------------------------------------------------------------------------------------------------

    def _state_config(self) -> dict[str, Any]:
        config = self._config.to_dict()
        keys = ("sparsity", "structure", "method", "targets", "ignore", "sequential", "blocks", "num_samples")
        state = {key: config[key] for key in keys}
        state.update(batch_size=self.batch_size, prune_on=self.prune_on, epoch=self.epoch)
        if self.step is not None:
            state["step"] = self.step
        if self._trigger.repeats:
            state.update(start_step=self.start_step, end_step=self.end_step, every_n_steps=self.every_n_steps)
        return state

    def _preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every check that can be made before training, so that a misconfigured run fails before it trains."""
        with misconfiguration():
            check_strategy(trainer)
            find_targets(pl_module, self.targets, self.ignore)
            if self._config.method.requires_calibration:
                self._calibration.check(trainer)
        warn_if_no_validation(trainer, self.evaluate)

    def _act(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due | None) -> None:
        """Prunes the live module when ``due`` (once, or at every step of a schedule), and handles a fit that stopped
        early."""
        if due is None or (self.pruned and not self._trigger.repeats):
            return
        self._prune(trainer, pl_module, due)
        self._trigger.acted(due)
        if due.stopped_early:
            rank_zero_warn(
                "WandaPruningCallback: the fit stopped before its last planned step (early stopping, `max_time`, ...), "
                "so it was pruned in `on_train_end`: checkpoints saved during the fit hold dense weights; each "
                "ModelCheckpoint's last checkpoint is saved again, pruned"
            )
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
                    trainer.save_checkpoint(callback.last_model_path, weights_only=callback.save_weights_only)

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: Due) -> None:
        """Prunes the live module in place, keeps the masks, logs, and (when training) keeps the masks applied."""
        report, drops, before, after = self._run(trainer, pl_module, temporary=False, sparsity=due.sparsity)
        self._keeper.set(drops, from_weights=holds_shards(pl_module))
        self._record(trainer, report, before, after, due.when)
        self._pruned_in_this_run = True
        if self.export_dir is not None and due.final:
            with misconfiguration():
                self.export_summary = export_module(trainer, pl_module, self.export_dir, masks=self.masks)
            if self.export_summary is not None:
                summary = self.export_summary
                log_to_loggers(
                    trainer,
                    {"wanda/export_bytes": float(summary.disk_bytes), "wanda/export_ratio": summary.compressed_ratio},
                )
        if trainer.training or trainer.state.fn == TrainerFn.FITTING:
            with misconfiguration():
                self._keeper.attach(trainer, pl_module)

    def _prune_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any], keep_dense: bool
    ) -> None:
        """Puts pruned weights, computed on temporary copies, into ``checkpoint["state_dict"]``; the live ones stay."""
        pruned: dict[str, Tensor] = {}
        report, _, before, after = self._run(trainer, pl_module, temporary=True, pruned_out=pruned)
        with misconfiguration():
            put_pruned_weights(checkpoint, pruned, keep_dense)
        self._record(trainer, report, before, after, f"checkpoint at step {trainer.global_step}")

    def _run(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        temporary: bool,
        pruned_out: dict[str, Tensor] | None = None,
        sparsity: float | None = None,
    ) -> tuple[PruningReport, dict[str, Tensor], dict[str, float], dict[str, float]]:
        """Calibrates, measures, prunes and measures again, leaving the random state as it found it.

        With ``temporary``, the target weights are swapped for copies that are pruned and measured, handed out in
        ``pruned_out``, and swapped back: the live weights are never written. ``sparsity`` overrides the configured
        one (a schedule's step); weights the masks already hold stay pruned.
        """
        # `trainer.validate` runs its hooks under inference mode, whose tensors could not be updated in place later.
        with isolate_rng(), torch.inference_mode(False):
            return self._run_isolated(trainer, pl_module, temporary, pruned_out, sparsity)

    def _run_isolated(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        temporary: bool,
        pruned_out: dict[str, Tensor] | None,
        sparsity: float | None,
    ) -> tuple[PruningReport, dict[str, Tensor], dict[str, float], dict[str, float]]:
        with misconfiguration():
            check_strategy(trainer)
            layers, _ = find_targets(pl_module, self.targets, self.ignore)
        # One entry per parameter: the query/key/value thirds of a MultiheadAttention share `in_proj_weight`.
        parameters = {layer.parameter_name: cast(nn.Parameter, layer.tensor) for layer in layers}
        batches = self._calibration.batches(trainer, pl_module) if self._config.needs_data else None
        start = time.perf_counter()
        loader = first_loader(trainer.val_dataloaders) if self.evaluate else None
        if self._trigger.repeats and self._dense_metrics is not None:
            before = dict(self._dense_metrics)  # a schedule's later step: deltas against the dense model
        else:
            before = self._measure(trainer, pl_module, loader, "dense")
            if self._trigger.repeats:
                self._dense_metrics = dict(before)
        self.evaluation_seconds = time.perf_counter() - start

        keeps: dict[str, Tensor] = {}
        progress = TrainerProgress(trainer, "Wanda pruning", len(layers))
        # FSDP1 hands out full masks while each process holds a flattened piece of each weight: the masks are read
        # back from the pruned shards afterwards instead.
        fsdp1 = is_fsdp1(pl_module)

        def on_layer_pruned(name: str, keep: Tensor) -> None:
            if not fsdp1:
                keeps[name] = keep
            progress.advance()

        config = self._config.with_batches_as_given()
        if sparsity is not None:
            config = replace(config, structure=replace(config.structure, sparsity=sparsity))
        already = layer_masks(layers, self._keeper.drops) if self._trigger.repeats and self._keeper.drops else None
        live = {name: param.data for name, param in parameters.items()}
        if temporary:
            for name, param in parameters.items():
                param.data = live[name].clone()
        try:
            with ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                stack.enter_context(trainer.precision_plugin.forward_context())
                stack.enter_context(progress)
                if self._runs_steps(pl_module):
                    stack.enter_context(quiet_steps(pl_module))
                report = prune_with(
                    pl_module,
                    batches,
                    config,
                    forward_fn=self._calibration.forward_fn(trainer, pl_module),
                    sync_statistics=strategy_sync(trainer),
                    on_layer_pruned=on_layer_pruned,
                    already_pruned=already,
                )
            if fsdp1:
                drops = masks_of_zeros(pl_module, self.targets, self.ignore)
            else:
                # Shaped like the parameters (Conv1D stores (in, out)); under FSDP2, like this rank's shard of them.
                drops = {name: ~keep for name, keep in parameter_masks(layers, keeps).items()}
            self.global_sparsity, self.sparsities = _measure_sparsity(parameters)
            start = time.perf_counter()
            after = self._measure(trainer, pl_module, loader, "pruned")
            self.evaluation_seconds += time.perf_counter() - start
            if pruned_out is not None:
                pruned_out.update({name: param.data for name, param in parameters.items()})
        finally:
            if temporary:
                for name, param in parameters.items():
                    param.data = live[name]
        return report, drops, before, after

    def _runs_steps(self, pl_module: pl.LightningModule) -> bool:
        """Whether calibration runs the module's ``validation_step``/``training_step`` (a module without forward)."""
        return (
            self.forward_fn is None
            and type(self).calibration_forward is WandaPruningCallback.calibration_forward
            and not has_forward(pl_module)
        )

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable[Any] | None, stage: str
    ) -> dict[str, float]:
        if loader is None:
            return {}
        return measure_validation(trainer, pl_module, loader, stage, self.num_eval_batches)

    # --- reporting ----------------------------------------------------------------------------------------------------

    def _record(
        self,
        trainer: pl.Trainer,
        report: PruningReport,
        before: dict[str, float],
        after: dict[str, float],
        when: str,
    ) -> None:
        self.report = report
        self._when = when
        self.metrics = metric_deltas(before, after)
        logged: dict[str, float] = {"wanda/sparsity": self.global_sparsity}
        logged.update({f"wanda/sparsity/{name}": value for name, value in self.sparsities.items()})
        for name, values in self.metrics.items():
            logged.update({f"{name}/{key}": value for key, value in values.items()})
        log_to_loggers(trainer, logged)
        self._publish(trainer)

    def _publish(self, trainer: pl.Trainer) -> None:
        """Puts ``wanda/sparsity`` and every ``<metric>/dense|pruned|delta`` in ``trainer.callback_metrics``, where
        ``ModelCheckpoint`` and ``EarlyStopping`` look for what they monitor (the values are the same on every
        process: they were reduced across processes when measured)."""
        if self.report is None:
            return
        values = {"wanda/sparsity": self.global_sparsity}
        for name, measured in self.metrics.items():
            values.update({f"{name}/{key}": value for key, value in measured.items()})
        publish_metrics(trainer, values)

    def _print_summary(self) -> None:
        if self.verbose:
            rank_zero_info(self.summary())


def _measure_sparsity(parameters: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Overall and per-layer sparsity through :class:`~wanda_lightning.lightning.metrics.Sparsity`, whose states are
    summed across processes (under DDP every process holds the same weights, so the fractions are those of one
    process; under FSDP2 each holds its own rows, so the sums are those of the whole weights)."""
    overall = Sparsity()
    per_layer: dict[str, float] = {}
    for name, weight in parameters.items():
        metric = Sparsity()
        metric.update(local_tensor(weight.detach()))
        overall.update(local_tensor(weight.detach()))
        per_layer[name.removesuffix(".weight")] = float(metric.compute())
    return float(overall.compute()), per_layer
