r"""
WandaPruningCallback
^^^^^^^^^^^^^^^^^^^^

Wanda pruning inside a Lightning run: calibrated on the run's own data, measured with the module's own validation
metrics, logged to the trainer's loggers, and kept through checkpoints, resumption and DDP.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from copy import deepcopy
from dataclasses import fields
from typing import Any, ClassVar, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

from .allocation import get_allocation
from .calibration import default_forward, prepare_batches
from .methods import PruningMethod, get_method
from .metrics import Sparsity
from .pruner import prune
from .refinement import get_refinement
from .report import LayerReport, PruningReport, SkippedLayer
from .sharding import is_dtensor, is_fsdp1, local_tensor
from .structure import SparsityStructure, parse_structure
from .targets import _validate_patterns, find_targets

__all__ = ["WandaPruningCallback"]

PruneOn = Literal["fit_end", "train_epoch_end", "validate", "checkpoint"]
_PRUNE_ON: tuple[str, ...] = ("fit_end", "train_epoch_end", "validate", "checkpoint")
_CALIBRATION: tuple[str, ...] = ("val", "train")
# Checked by name so that none of them has to be importable; DeepSpeedStrategy subclasses DDPStrategy.
_UNSUPPORTED_STRATEGIES = frozenset({"DeepSpeedStrategy", "XLAStrategy", "XLAFSDPStrategy"})
# Top-level checkpoint key of the dense weights that `prune_on="checkpoint"` replaced by pruned ones.
DENSE_WEIGHTS_KEY = "wanda_dense_weights"
_STATE_VERSION = 1
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class WandaPruningCallback(Callback):
    r"""Prunes the LightningModule with Wanda (``|W| * ||X||`` per output row) once, at a chosen point of the run.

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
    - ``"validate"``: ``trainer.validate(model)`` prunes the model before validating it, and reports.
    - ``"checkpoint"``: every checkpoint saved holds a pruned ``state_dict`` (computed on a temporary copy of the
      affected weights), while the live run keeps training dense. Full checkpoints also keep the dense weights under
      the top-level key ``"wanda_dense_weights"``: resuming with this callback continues the dense run; loading the
      checkpoint anywhere else gives the pruned model.

    While training continues after pruning, the gradients of pruned weights are zeroed before each optimizer step, and
    after each step the masks are re-applied and the optimizer states of pruned entries (``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``, ...) are zeroed, so sparsity stays exact. The masks (bit-packed), the
    configuration and the report go through :meth:`state_dict`: a run resumed from a checkpoint saved after pruning
    keeps its masks and does not prune again.

    Logged with ``logger.log_metrics`` at ``trainer.global_step``: ``wanda/sparsity`` (over all pruned layers),
    ``wanda/sparsity/<layer>`` (through :class:`~wanda_lightning.metrics.Sparsity`), and, with ``evaluate=True``, for
    every metric the module logs in validation: ``<name>/dense``, ``<name>/pruned`` and ``<name>/delta``
    (pruned minus dense), measured by running the module's ``validation_step`` over the same validation batches
    before and after pruning.

    Under DDP (``"ddp"``, ``"ddp_spawn"``, any number of nodes) the calibration statistics (float32 sums and int64
    counts) are all-reduced, so every process computes the same masks as one process would over the union of all
    processes' calibration batches.

    Under ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``, ``tensor_parallel_size=1``)
    each process prunes its own rows of every weight (``Shard(0)``) from the all-reduced statistics: no weight is
    gathered. Every process runs as many calibration batches (the fewest any has, with a warning when they differ), so
    the sharded forwards stay in step. The masks are not kept in the callback state (each process holds only its
    shards'); a resumed run reads them back from the zeros of the restored weights. ``prune_on="checkpoint"`` is
    refused there; ``export_dir`` gathers the full weights on rank zero's CPU. Methods that compare weights across
    rows (SparseGPT unstructured, RIA, Wanda's variant) are refused with sharded weights.

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
            ``"ria"``, ``"ria-permuted"`` (N:M only; not with ``prune_on="train_epoch_end"``), or another name
            registered with :func:`~wanda_lightning.register_method`.
        variant: For ``"wanda"``, the reference code's per-row cumulative-score selection (``--use_variant``).
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"``: per-block sparsities from the outlier
            share of Wanda scores (unstructured only; see :class:`~wanda_lightning.OWL`).
        refine: ``"none"`` or DSnoT swaps of pruned and kept weights (see :class:`~wanda_lightning.DSnoT`):
            ``"dsnot"`` (its default guard, ``"expected"``), ``"dsnot-expected"`` (swaps that lower the expected output
            error under DSnoT's input model; Wanda's calibration cost), ``"dsnot-exact"`` (swaps that lower the exact
            reconstruction error; needs each layer's input Gram matrix) or ``"dsnot-unguarded"`` (the paper's rules
            alone).
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
        prune_on: When to prune: ``"fit_end"``, ``"train_epoch_end"``, ``"validate"`` or ``"checkpoint"`` (see
            above).
        epoch: With ``prune_on="train_epoch_end"`` only (and required there): the zero-based epoch after which to
            prune.
        evaluate: Measure the module's validation metrics before and after pruning and log the deltas.
        num_eval_batches: Most validation batches (per process) for each of the two measurements; ``None`` for as
            many as the trainer validates (``limit_val_batches``).
        forward_fn: ``forward_fn(pl_module, batch)`` runs the module on one calibration batch, for modules whose
            ``forward`` does not take the batch as is (default: ``pl_module(**batch)`` for a mapping,
            ``pl_module(batch[0])`` for a tuple or list, ``pl_module(batch)`` for a tensor). Or override
            :meth:`calibration_forward`.
        export_dir: After pruning, rank zero writes the compressed export there (see
            :func:`~wanda_lightning.save_pruned`; an existing export is replaced) and logs ``wanda/export_bytes`` and
            ``wanda/export_ratio``. Not with ``prune_on="checkpoint"``.
        verbose: Print the summary table (the report and the metric deltas) on rank zero.

    Raises:
        MisconfigurationException: For an invalid argument (the message names it, the value and what is allowed), or
            later, before any weight changes, when the run cannot be pruned: no validation dataloader for
            ``calibration="val"``, a calibration dataloader that yields nothing, batches the module's forward cannot
            take, an unsupported strategy (DeepSpeed, tensor parallelism, FSDP1 with ``use_orig_params=False``, ...),
            target patterns that match no layer.

    Example::

        from lightning.pytorch import Trainer
        from wanda_lightning.callback import WandaPruningCallback

        trainer = Trainer(max_steps=100, callbacks=[WandaPruningCallback(sparsity=0.5, num_eval_batches=8)])
        trainer.fit(model, train_loader, val_loader)  # fine-tunes, then prunes; the last checkpoint is sparse

    In a LightningCLI YAML config::

        trainer:
          callbacks:
            - class_path: wanda_lightning.callback.WandaPruningCallback
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
        allocation: Literal["uniform", "owl"] = "uniform",
        refine: Literal["none", "dsnot", "dsnot-expected", "dsnot-exact", "dsnot-unguarded"] = "none",
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] | None = None,
        sequential: bool = True,
        blocks: str | None = None,
        num_samples: int | None = 128,
        batch_size: int | None = None,
        offload_device: str | None = None,
        calibration: Literal["val", "train"] | DataLoader = "val",
        prune_on: PruneOn = "fit_end",
        epoch: int | None = None,
        evaluate: bool = True,
        num_eval_batches: int | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        export_dir: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        try:
            self._structure: SparsityStructure = parse_structure(structure, sparsity)
            _check_bool(variant, "variant")
            if variant and (not isinstance(method, str) or method.lower() != "wanda"):
                raise ValueError(f"`variant`=True applies to method 'wanda' only, got `method`={method!r}")
            self._method: PruningMethod = get_method(method, variant=True) if variant else get_method(method)
            self._allocation = get_allocation(allocation)
            self._refinement = get_refinement(refine)
            if self._allocation is not None and self._structure.is_n_m:
                raise ValueError(
                    f"`allocation`='owl' gives blocks different sparsities, which `structure`={structure!r} fixes; "
                    "use structure='unstructured' with OWL"
                )
            self.targets = _patterns(targets, "targets")
            self.ignore = _patterns(ignore, "ignore")
        except (ValueError, TypeError) as error:
            raise MisconfigurationException(str(error)) from None
        for flag, name in ((sequential, "sequential"), (evaluate, "evaluate"), (verbose, "verbose")):
            _check_bool(flag, name)
        for value, name in (
            (num_samples, "num_samples"),
            (batch_size, "batch_size"),
            (num_eval_batches, "num_eval_batches"),
        ):
            _check_positive(value, name)
        if blocks is not None and (not isinstance(blocks, str) or not blocks):
            raise MisconfigurationException(
                f"`blocks` must be a module name such as 'model.layers' or None, got {blocks!r}"
            )
        if offload_device is not None:
            try:
                torch.device(offload_device)
            except (RuntimeError, TypeError):
                raise MisconfigurationException(
                    "`offload_device` must be a torch device such as 'cpu' or 'cuda:0', or None, got "
                    f"{offload_device!r}"
                ) from None
        if isinstance(calibration, str):
            if calibration not in _CALIBRATION:
                raise MisconfigurationException(
                    "`calibration` must be 'val', 'train' or a DataLoader (or iterable of batches), got "
                    f"{calibration!r}"
                )
        elif isinstance(calibration, (Tensor, Mapping)) or not isinstance(calibration, Iterable):
            raise MisconfigurationException(
                "`calibration` must be 'val', 'train' or a DataLoader (or iterable of batches), got "
                f"{type(calibration).__name__}"
            )
        if prune_on not in _PRUNE_ON:
            raise MisconfigurationException(f"`prune_on` must be one of {list(_PRUNE_ON)}, got {prune_on!r}")
        if epoch is not None and prune_on != "train_epoch_end":
            raise MisconfigurationException(
                f"`epoch`={epoch!r} is only used with `prune_on`='train_epoch_end', got `prune_on`={prune_on!r}"
            )
        if prune_on == "train_epoch_end" and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
            raise MisconfigurationException(
                "`prune_on`='train_epoch_end' needs `epoch`=k, the zero-based epoch after which to prune (an int "
                f">= 0), got {epoch!r}"
            )
        if self._method.permute_channels and prune_on == "train_epoch_end":
            raise MisconfigurationException(
                f"`method`={method!r} reorders the hidden units of MLPs, and training goes on after "
                "`prune_on`='train_epoch_end' with optimizer state kept in their old order; use prune_on='fit_end', "
                "'validate' or 'checkpoint', or method='ria'"
            )
        if forward_fn is not None and not callable(forward_fn):
            raise MisconfigurationException(
                f"`forward_fn` must be callable as forward_fn(pl_module, batch), or None, got {forward_fn!r}"
            )
        self.sparsity = self._structure.sparsity
        self.structure = self._structure.name
        self.method = self._method.name
        self.variant = variant
        self.sequential = sequential
        self.blocks = blocks
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.offload_device = offload_device
        self.calibration = calibration
        self.prune_on = prune_on
        self.epoch = epoch
        self.evaluate = evaluate
        self.num_eval_batches = num_eval_batches
        self.forward_fn = forward_fn
        if export_dir is not None and (not isinstance(export_dir, (str, os.PathLike)) or not str(export_dir)):
            raise MisconfigurationException(f"`export_dir` must be a directory path or None, got {export_dir!r}")
        if export_dir is not None and prune_on == "checkpoint":
            raise MisconfigurationException(
                "`export_dir` exports the live pruned model, which `prune_on`='checkpoint' never prunes; use another "
                "`prune_on`, or export a checkpoint with `wanda-lightning prune`/`compress_checkpoint`"
            )
        self.export_dir = export_dir
        self.export_summary: Any = None
        self.allocation = allocation
        self.refine = refine
        self.verbose = verbose

        self.report: PruningReport | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.global_sparsity = 0.0
        self.sparsities: dict[str, float] = {}
        self.evaluation_seconds = 0.0
        self._pruned_masks: dict[str, Tensor] | None = None  # parameter name -> bool, True where pruned
        self._packed: dict[str, dict[str, Any]] | None = None
        self._handles: list[RemovableHandle] = []
        self._pruned_in_this_run = False
        self._masks_from_weights = False  # FSDP2: masks are this process's shards, not saved in the state
        self._wrapped_save = False
        self._when = "a restored checkpoint"

    # --- public -------------------------------------------------------------------------------------------------------

    @property
    def pruned(self) -> bool:
        """Whether the model was pruned (or its masks restored from a checkpoint); never for ``"checkpoint"``."""
        return self._pruned_masks is not None

    @property
    def masks(self) -> dict[str, Tensor]:
        """Keep masks by parameter name (``"model.model.layers.0.mlp.up_proj.weight"``), True where a weight is kept,
        shaped like the parameter; empty before pruning."""
        return {name: ~drop for name, drop in (self._pruned_masks or {}).items()}

    def calibration_forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """Runs ``pl_module`` on one calibration batch, already on its device; override for custom batch formats.

        The default calls ``forward_fn(pl_module, batch)`` when given, else ``pl_module(**batch)`` for a mapping,
        ``pl_module(batch[0])`` for a tuple or list and ``pl_module(batch)`` for a tensor. It runs in ``no_grad``,
        under the precision plugin's forward context, with the module in eval mode. The output is ignored.

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
        return default_forward(pl_module, batch)

    # --- hooks --------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy; for ``prune_on="checkpoint"`` also wraps the module's ``on_save_checkpoint`` so that
        weights-only checkpoints (which call no callback hook) are pruned too."""
        if stage in ("fit", "validate"):
            _check_strategy(trainer)
            if _is_sharded_strategy(trainer) and self.prune_on == "checkpoint":
                raise MisconfigurationException(
                    "`prune_on`='checkpoint' prunes temporary copies of the weights, which FSDP2 "
                    f"({type(trainer.strategy).__name__}) does not allow for its sharded parameters: use 'fit_end', "
                    "'train_epoch_end' or 'validate', or prune a saved checkpoint with `wanda-lightning prune`"
                )
        if stage == "fit" and self.prune_on == "checkpoint" and not self._wrapped_save:
            original = pl_module.on_save_checkpoint

            def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
                original(checkpoint)
                if "callbacks" not in checkpoint:  # weights-only: the callback hook was not called
                    self._prune_checkpoint(trainer, pl_module, checkpoint, keep_dense=False)

            pl_module.on_save_checkpoint = on_save_checkpoint  # type: ignore[method-assign]
            self._wrapped_save = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Removes the optimizer hooks and the ``on_save_checkpoint`` wrapper."""
        self._remove_hooks()
        if self._wrapped_save:
            vars(pl_module).pop("on_save_checkpoint", None)
            self._wrapped_save = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restores masks (after a resume or a pruning ``validate``) or checks that pruning will be possible."""
        if self._pruned_masks is not None:
            self._attach_masks(trainer, pl_module)
            return
        if self.prune_on == "validate":
            return
        self._preflight(trainer, pl_module)
        if self.prune_on == "train_epoch_end" and self.epoch is not None and trainer.current_epoch > self.epoch:
            # Resumed from a checkpoint of epoch `epoch` saved before this callback pruned: prune those weights now.
            self._prune(trainer, pl_module, f"resumed after epoch {self.epoch}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Prunes after the last training batch of the fit (``"fit_end"``) or of epoch ``epoch``."""
        if self._pruned_masks is not None or self.prune_on not in ("fit_end", "train_epoch_end"):
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        last_in_epoch = bool(epoch_loop.batch_progress.is_last_batch) or batch_idx + 1 >= trainer.num_training_batches
        if self.prune_on == "train_epoch_end":
            if last_in_epoch and trainer.current_epoch == self.epoch:
                self._prune(trainer, pl_module, f"end of epoch {self.epoch}")
            return
        max_steps_reached = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        if max_steps_reached or (last_in_epoch and last_epoch):
            self._prune(trainer, pl_module, "end of fit")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fallback for ``"train_epoch_end"`` when the last batch of the epoch could not be told in advance."""
        if self._pruned_masks is None and self.prune_on == "train_epoch_end" and trainer.current_epoch == self.epoch:
            self._prune(trainer, pl_module, f"end of epoch {self.epoch}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prunes a fit that stopped early (``"fit_end"``) and prints the summary."""
        if self._pruned_masks is None and self.prune_on == "fit_end":
            self._prune(trainer, pl_module, "end of fit (stopped early)")
            rank_zero_warn(
                "WandaPruningCallback: the fit stopped before its last planned step (early stopping, `max_time`, ...), "
                "so it was pruned in `on_train_end`: checkpoints saved during the fit hold dense weights; each "
                "ModelCheckpoint's last checkpoint is saved again, pruned"
            )
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
                    trainer.save_checkpoint(callback.last_model_path, weights_only=callback.save_weights_only)
        elif self._pruned_masks is None and self.prune_on == "train_epoch_end":
            rank_zero_warn(
                f"WandaPruningCallback: training ended at epoch {trainer.current_epoch} before the end of `epoch`="
                f"{self.epoch}, so nothing was pruned"
            )
        self._remove_hooks()
        if self._pruned_in_this_run or (self.prune_on == "checkpoint" and self.report is not None):
            self._print_summary()
            self._pruned_in_this_run = False

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``prune_on="validate"``, prunes before ``trainer.validate`` runs (once)."""
        if (
            self.prune_on == "validate"
            and self._pruned_masks is None
            and trainer.state.fn == TrainerFn.VALIDATING
            and not trainer.sanity_checking
        ):
            self._preflight(trainer, pl_module)
            self._prune(trainer, pl_module, "validate")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prints the summary after a pruning ``trainer.validate``."""
        if trainer.state.fn == TrainerFn.VALIDATING and self._pruned_in_this_run:
            self._print_summary()
            self._pruned_in_this_run = False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Zeroes the gradients of pruned weights (before gradient clipping and the step)."""
        if self._pruned_masks is None:
            return
        for param, drop in self._masked_parameters(pl_module, optimizer):
            if param.grad is not None:
                local_tensor(param.grad).masked_fill_(drop, 0)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """With ``prune_on="checkpoint"``, replaces the affected weights of ``checkpoint["state_dict"]`` by pruned
        ones and keeps the dense ones under ``checkpoint["wanda_dense_weights"]`` for resuming."""
        if self.prune_on == "checkpoint":
            self._prune_checkpoint(trainer, pl_module, checkpoint, keep_dense=True)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming from a ``prune_on="checkpoint"`` checkpoint restores the dense weights it kept."""
        dense = checkpoint.get(DENSE_WEIGHTS_KEY)
        if not dense:
            return
        parameters = dict(pl_module.named_parameters())
        missing = sorted(set(dense) - set(parameters))
        if missing:
            raise MisconfigurationException(
                f"the checkpoint's `{DENSE_WEIGHTS_KEY}` names parameters the module does not have: {missing[:5]}"
            )
        with torch.no_grad():
            for name, tensor in dense.items():
                parameters[name].copy_(tensor)
        rank_zero_info(
            f"WandaPruningCallback: restored the dense weights of {len(dense)} layers from the checkpoint "
            "(its `state_dict` holds their pruned copies)"
        )

    def state_dict(self) -> dict[str, Any]:
        """The configuration, the bit-packed masks, the report and the measured metrics."""
        if self._pruned_masks is not None and self._packed is None and not self._masks_from_weights:
            self._packed = {name: _pack(drop) for name, drop in self._pruned_masks.items()}
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            # Under FSDP2 each process holds masks of its own shards only, and checkpoints keep one callback state:
            # the masks are read back from the zeros of the restored weights instead.
            "masks": None if self._masks_from_weights else self._packed,
            "masks_from_weights": self._masks_from_weights and self._pruned_masks is not None,
            "report": self.report.to_dict() if self.report is not None else None,
            "metrics": deepcopy(self.metrics),
            "global_sparsity": self.global_sparsity,
            "sparsities": dict(self.sparsities),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores masks, report and metrics; the masks are applied when training starts, and nothing is pruned
        again."""
        config = state_dict.get("config", {})
        if config and config != self._config():
            changed = sorted(k for k in set(config) | set(self._config()) if config.get(k) != self._config().get(k))
            rank_zero_warn(
                f"WandaPruningCallback: the checkpoint was made with a different configuration ({changed}); its state "
                "(masks, report) is restored as saved"
            )
        packed = state_dict.get("masks")
        self._packed = packed
        self._pruned_masks = {name: _unpack(entry) for name, entry in packed.items()} if packed else None
        self._masks_from_weights = bool(state_dict.get("masks_from_weights", False))
        if self._masks_from_weights:
            self._pruned_masks = {}  # filled from the restored weights when the masks are attached
        report = state_dict.get("report")
        self.report = _report_from_dict(report) if report else None
        self.metrics = deepcopy(state_dict.get("metrics", {}))
        self.global_sparsity = float(state_dict.get("global_sparsity", 0.0))
        self.sparsities = dict(state_dict.get("sparsities", {}))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    # --- pruning ------------------------------------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "structure": self.structure,
            "method": self._method.describe(),
            "targets": list(self.targets) if self.targets is not None else None,
            "ignore": list(self.ignore) if self.ignore is not None else None,
            "sequential": self.sequential,
            "blocks": self.blocks,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "prune_on": self.prune_on,
            "epoch": self.epoch,
        }

    def _preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Every check that can be made before training, so that a misconfigured run fails before it trains."""
        _check_strategy(trainer)
        try:
            find_targets(pl_module, self.targets, self.ignore)
        except (ValueError, TypeError) as error:
            raise MisconfigurationException(str(error)) from None
        if self._method.requires_calibration:
            source = self._calibration_source(trainer)
            if _safe_len(source) == 0:
                raise MisconfigurationException(
                    f"`calibration`={_describe(self.calibration)} yielded no batch: its dataloader is empty"
                )
        if self.evaluate and _first_loader(trainer.val_dataloaders) is None:
            rank_zero_warn(
                "WandaPruningCallback: `evaluate`=True but the trainer has no validation dataloader: metric deltas "
                "will not be measured (pass `val_dataloaders`, or evaluate=False)"
            )

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        """Prunes the live module in place, keeps the masks, logs, and (when training) keeps the masks applied."""
        report, drops, before, after = self._run(trainer, pl_module, temporary=False)
        self._pruned_masks = drops
        self._masks_from_weights = _holds_shards(pl_module)
        self._packed = None
        self._record(trainer, report, before, after, when)
        self._pruned_in_this_run = True
        if self.export_dir is not None:
            self._export(trainer, pl_module)
        if trainer.training or trainer.state.fn == TrainerFn.FITTING:
            self._attach_masks(trainer, pl_module)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank zero writes the compressed export of the pruned module to ``export_dir`` and logs its size."""
        from .export import save_compressed, save_pruned

        full_state: dict[str, Tensor] | None = None
        hf_state: dict[str, Tensor] | None = None
        if _holds_shards(pl_module):
            # FSDP: every process takes part in gathering the full weights, which end up on rank zero's CPU only.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_state = cast(dict[str, Tensor], get_model_state_dict(pl_module, options=options))
            prefix = _hf_prefix(pl_module)
            if prefix is not None:
                start = f"{prefix}." if prefix else ""
                hf_state = {k.removeprefix(start): v for k, v in full_state.items() if k.startswith(start)}
        if trainer.is_global_zero:
            assert self.export_dir is not None
            # Masks come from the zeros of the weights: pruned weights are exactly 0 and the export is bit-exact.
            try:
                summary = save_pruned(
                    pl_module,
                    self.export_dir,
                    getattr(pl_module, "tokenizer", None),
                    overwrite=True,
                    state_dict=hf_state,
                )
            except (TypeError, ValueError) as error:
                if "PreTrainedModel" not in str(error):
                    raise
                # Not a transformers model: export the LightningModule's own state dict.
                state = full_state if full_state is not None else pl_module.state_dict()
                summary = save_compressed(state, self.export_dir, overwrite=True)
            self.export_summary = summary
            metrics = {"wanda/export_bytes": float(summary.disk_bytes), "wanda/export_ratio": summary.compressed_ratio}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            rank_zero_info(
                f"WandaPruningCallback: exported to {self.export_dir} ({summary.disk_bytes / 2**20:.1f} MiB on disk; "
                f"pruned weights at {summary.compressed_ratio:.3f}x their dense bytes)"
            )
        trainer.strategy.barrier("wanda_export")

    def _prune_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any], keep_dense: bool
    ) -> None:
        """Puts pruned weights, computed on temporary copies, into ``checkpoint["state_dict"]``; the live ones stay."""
        state = checkpoint["state_dict"]
        pruned: dict[str, Tensor] = {}
        report, _, before, after = self._run(trainer, pl_module, temporary=True, pruned_out=pruned)
        dense: dict[str, Tensor] = {}
        for name, tensor in pruned.items():
            if name not in state:
                raise MisconfigurationException(f"pruned parameter {name!r} is not in the checkpoint's `state_dict`")
            dense[name] = state[name]
            state[name] = tensor.to(state[name].device)
        if keep_dense:
            checkpoint[DENSE_WEIGHTS_KEY] = dense
        self._record(trainer, report, before, after, f"checkpoint at step {trainer.global_step}")

    def _run(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        temporary: bool,
        pruned_out: dict[str, Tensor] | None = None,
    ) -> tuple[PruningReport, dict[str, Tensor], dict[str, float], dict[str, float]]:
        """Calibrates, measures, prunes and measures again, leaving the random state as it found it.

        With ``temporary``, the target weights are swapped for copies that are pruned and measured, handed out in
        ``pruned_out``, and swapped back: the live weights are never written.
        """
        # `trainer.validate` runs its hooks under inference mode, whose tensors could not be updated in place later.
        with isolate_rng(), torch.inference_mode(False):
            return self._run_isolated(trainer, pl_module, temporary, pruned_out)

    def _run_isolated(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        temporary: bool,
        pruned_out: dict[str, Tensor] | None,
    ) -> tuple[PruningReport, dict[str, Tensor], dict[str, float], dict[str, float]]:
        _check_strategy(trainer)
        try:
            layers, _ = find_targets(pl_module, self.targets, self.ignore)
        except (ValueError, TypeError) as error:
            raise MisconfigurationException(str(error)) from None
        parameters = {f"{layer.name}.weight": cast(nn.Parameter, layer.module.weight) for layer in layers}
        needs_data = self._method.requires_calibration or self._allocation is not None or self._refinement is not None
        batches = self._calibration_batches(trainer, pl_module) if needs_data else None
        start = time.perf_counter()
        loader = _first_loader(trainer.val_dataloaders) if self.evaluate else None
        before = self._evaluate(trainer, pl_module, loader, "dense") if loader is not None else {}
        self.evaluation_seconds = time.perf_counter() - start

        drops: dict[str, Tensor] = {}
        layer_params = {layer.name: f"{layer.name}.weight" for layer in layers}
        transposed = {layer.name for layer in layers if layer.transposed}
        progress = _Progress(trainer, "Wanda pruning", len(layers))
        # FSDP1 hands out full masks while each process holds a flattened piece of each weight: the masks are read
        # back from the pruned shards afterwards instead.
        fsdp1 = is_fsdp1(pl_module)

        def on_layer_pruned(name: str, keep: Tensor) -> None:
            if not fsdp1:
                # Shaped like the parameter (Conv1D stores (in, out)); under FSDP2, like this rank's shard of it.
                drops[layer_params[name]] = (~keep).t().contiguous() if name in transposed else ~keep
            progress.advance()

        live = {name: param.data for name, param in parameters.items()}
        if temporary:
            for name, param in parameters.items():
                param.data = live[name].clone()
        try:
            with ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                stack.enter_context(trainer.precision_plugin.forward_context())
                stack.enter_context(progress)
                report = prune(
                    pl_module,
                    batches,
                    sparsity=self._structure.sparsity,
                    structure=self._structure.name,
                    method=self._method,
                    allocation=self._allocation,
                    refine=self._refinement,
                    targets=self.targets,
                    ignore=self.ignore,
                    sequential=self.sequential,
                    blocks=self.blocks,
                    num_samples=None,
                    batch_size=None,
                    forward_fn=self._forward_through(trainer, pl_module),
                    offload_device=self.offload_device,
                    progress=False,
                    sync_statistics=self._sync_fn(trainer),
                    on_layer_pruned=on_layer_pruned,
                )
            if fsdp1:
                drops = self._masks_of_zeros(pl_module)
            self.global_sparsity, self.sparsities = _measure_sparsity(parameters)
            start = time.perf_counter()
            after = self._evaluate(trainer, pl_module, loader, "pruned") if loader is not None else {}
            self.evaluation_seconds += time.perf_counter() - start
            if pruned_out is not None:
                pruned_out.update({name: param.data for name, param in parameters.items()})
        finally:
            if temporary:
                for name, param in parameters.items():
                    param.data = live[name]
        return report, drops, before, after

    def _forward_through(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[nn.Module, Any], Any]:
        """The calibration forward; under Lightning's FSDPStrategy it runs inside the FSDP1 root's ``forward``, which
        gathers the weights that no inner unit owns (embeddings), as Lightning does for ``validation_step``."""
        wrapper = _fsdp1_wrapper(trainer, pl_module)
        if wrapper is None:
            return self._forward

        def forward(model: nn.Module, batch: Any) -> Any:
            vars(pl_module)["_wanda_calibration_step"] = lambda inner: self._forward(pl_module, inner)
            try:
                return _ForwardRedirection()(wrapper, pl_module, "_wanda_calibration_step", batch)
            finally:
                vars(pl_module).pop("_wanda_calibration_step", None)

        return forward

    def _forward(self, model: nn.Module, batch: Any) -> Any:
        try:
            return self.calibration_forward(model, batch)  # type: ignore[arg-type]
        except (TypeError, KeyError, IndexError, AttributeError, ValueError, RuntimeError) as error:
            raise MisconfigurationException(
                f"{type(model).__name__} could not run on a calibration batch of type {type(batch).__name__}: "
                f"{type(error).__name__}: {error}. Pass `forward_fn=lambda pl_module, batch: ...` (or override "
                "`calibration_forward`) to run the module on your batches"
            ) from error

    @staticmethod
    def _sync_fn(trainer: pl.Trainer) -> Callable[[list[Tensor]], None] | None:
        if trainer.world_size <= 1:
            return None
        strategy = trainer.strategy

        def sync(tensors: list[Tensor]) -> None:
            for tensor in tensors:
                reduced = strategy.reduce(tensor, reduce_op="sum")
                if reduced is not tensor:
                    tensor.copy_(reduced)

        return sync

    # --- calibration data ---------------------------------------------------------------------------------------------

    def _calibration_source(self, trainer: pl.Trainer) -> Iterable[Any]:
        if self.calibration == "val":
            loader = _first_loader(trainer.val_dataloaders)
            if loader is None:
                raise MisconfigurationException(
                    "`calibration`='val' needs a validation dataloader, and the trainer has none: pass "
                    "`val_dataloaders` to `trainer.fit`/`trainer.validate`, define `val_dataloader()` in the "
                    "LightningModule or LightningDataModule (with `limit_val_batches` > 0), or set `calibration` to "
                    "'train' or a DataLoader"
                )
            return loader
        if self.calibration == "train":
            loader = _first_loader(trainer.train_dataloader) if trainer.state.fn == TrainerFn.FITTING else None
            if loader is None:
                raise MisconfigurationException(
                    "`calibration`='train' needs the training dataloader of `trainer.fit`; outside a fit (say with "
                    "`prune_on`='validate') use `calibration`='val' or pass a DataLoader"
                )
            return loader
        return cast(Iterable[Any], self.calibration)

    def _calibration_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """This process's calibration batches, on its device; the same decision (error or not) on every process."""
        source = self._calibration_source(trainer)
        world, rank = trainer.world_size, trainer.global_rank
        sharded = world > 1 and _has_distributed_sampler(source)

        def moved() -> Iterator[Any]:
            for batch in source:
                batch = trainer.precision_plugin.convert_input(batch)
                batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
                yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)

        batches: list[Any] = []
        error: Exception | None = None
        try:
            if world <= 1:
                batches = prepare_batches(moved(), self.num_samples, self.batch_size)
            elif sharded:
                quota = math.ceil(self.num_samples / world) if self.num_samples is not None else None
                batches = prepare_batches(moved(), quota, self.batch_size)
            else:
                batches = prepare_batches(moved(), self.num_samples, self.batch_size)[rank::world]
        except (ValueError, TypeError) as caught:
            error = caught
        fewest = most = len(batches)
        if world > 1:
            count = torch.tensor(len(batches), device=trainer.strategy.root_device)
            fewest = int(trainer.strategy.reduce(count, reduce_op="min"))
            most = int(trainer.strategy.reduce(count, reduce_op="max"))
        if _is_sharded_strategy(trainer) and fewest != most and fewest > 0:
            # FSDP2 all-gathers each block's weights in every forward: all processes must run as many.
            rank_zero_warn(
                f"WandaPruningCallback: the processes have {fewest} to {most} calibration batches; each uses its "
                f"first {fewest} so that the sharded forwards stay in step"
            )
            batches = batches[:fewest]
        if error is not None and not isinstance(error, ValueError):
            raise MisconfigurationException(f"`calibration`={_describe(self.calibration)}: {error}") from error
        if fewest == 0:
            where = "" if world <= 1 else f" on at least one of the {world} processes"
            raise MisconfigurationException(
                f"`calibration`={_describe(self.calibration)} yielded no batch{where}: give it a non-empty dataloader "
                f"(with at least {max(world, 1)} batches under DDP)"
            )
        return batches

    # --- evaluation ---------------------------------------------------------------------------------------------------

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable[Any], stage: str
    ) -> dict[str, float]:
        """Runs ``validation_step`` over up to ``num_eval_batches`` batches and returns what the module logged,
        reduced like Lightning reduces it (and across processes). Nothing reaches the trainer's results."""
        limit = self.num_eval_batches
        if limit is None and trainer.num_val_batches:
            bound = trainer.num_val_batches[0]
            limit = None if bound == float("inf") else int(bound)
        total = limit if limit is not None else _safe_len(loader)
        capture = _LogCapture()
        metrics = [module for module in pl_module.modules() if isinstance(module, Metric)]
        snapshots = [_metric_snapshot(metric) for metric in metrics]
        modes = [(module, module.training) for module in pl_module.modules()]
        wrapper = _fsdp1_wrapper(trainer, pl_module)
        many_loaders = isinstance(trainer.val_dataloaders, (list, tuple, Mapping)) and len(trainer.val_dataloaders) > 1
        progress = _Progress(trainer, f"Wanda eval ({stage})", total)
        with ExitStack() as stack:
            stack.callback(_restore, pl_module, modes, metrics, snapshots)
            stack.enter_context(capture.attached(pl_module))
            stack.enter_context(isolate_rng())
            stack.enter_context(torch.no_grad())
            stack.enter_context(progress)
            for metric in metrics:
                metric.reset()
            pl_module.eval()
            pl_module.on_validation_epoch_start()
            for batch_idx, batch in enumerate(loader):
                if limit is not None and batch_idx >= limit:
                    break
                batch = trainer.precision_plugin.convert_input(batch)
                batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
                capture.batch = batch
                step_args = (batch, batch_idx, 0) if many_loaders else (batch, batch_idx)
                with trainer.precision_plugin.val_step_context():
                    if wrapper is not None:  # FSDP1 root outside the module: its forward must unshard the weights
                        _ForwardRedirection()(wrapper, pl_module, "validation_step", *step_args)
                    else:
                        pl_module.validation_step(*step_args)
                progress.advance()
            pl_module.on_validation_epoch_end()
            return capture.reduce(trainer)

    # --- masks --------------------------------------------------------------------------------------------------------

    def _masked_parameters(
        self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None = None
    ) -> list[tuple[nn.Parameter, Tensor]]:
        assert self._pruned_masks is not None
        parameters = dict(pl_module.named_parameters())
        pairs = [(parameters[name], drop) for name, drop in self._pruned_masks.items()]
        if optimizer is None:
            return pairs
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [(param, drop) for param, drop in pairs if id(param) in owned]

    def _attach_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks the masks against the module, moves them to its devices, applies them and hooks every optimizer."""
        assert self._pruned_masks is not None
        parameters = dict(pl_module.named_parameters())
        if self._masks_from_weights:
            self._pruned_masks = self._masks_of_zeros(pl_module)
        for name, drop in list(self._pruned_masks.items()):
            param = parameters.get(name)
            if param is None or tuple(local_tensor(param).shape) != tuple(drop.shape):
                found = "missing" if param is None else f"shape {tuple(local_tensor(param).shape)}"
                raise MisconfigurationException(
                    f"the pruning mask of {name!r} (shape {tuple(drop.shape)}) does not fit the module ({found}): the "
                    "checkpoint was made for another model"
                )
            self._pruned_masks[name] = drop.to(param.device)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._enforce(pl_module, optimizer)
            self._handles.append(
                optimizer.register_step_post_hook(lambda opt, args, kwargs: self._enforce(pl_module, opt))
            )
        if not trainer.optimizers:
            self._enforce(pl_module, None)

    def _masks_of_zeros(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Drop masks read from the zeros of the target weights (this process's shards): pruned weights are exactly 0
        (a kept weight that happens to be exactly 0 is then held at 0 too)."""
        layers, _ = find_targets(pl_module, self.targets, self.ignore)
        weights = {f"{layer.name}.weight": cast(Tensor, layer.module.weight).detach() for layer in layers}
        return {name: local_tensor(weight) == 0 for name, weight in weights.items()}

    def _enforce(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer | None) -> None:
        """Re-applies the masks after an optimizer step and zeroes the optimizer state of pruned entries."""
        with torch.no_grad():
            for param, drop in self._masked_parameters(pl_module, optimizer):
                local_tensor(param).masked_fill_(drop, 0)
                state = optimizer.state.get(param) if optimizer is not None else None
                for value in (state or {}).values():
                    if isinstance(value, Tensor) and value.shape == param.shape:
                        local_tensor(value).masked_fill_(drop, 0)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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
        self.metrics = {
            name: {"dense": before[name], "pruned": after[name], "delta": after[name] - before[name]}
            for name in before
            if name in after
        }
        logged: dict[str, float] = {"wanda/sparsity": self.global_sparsity}
        logged.update({f"wanda/sparsity/{name}": value for name, value in self.sparsities.items()})
        for name, values in self.metrics.items():
            logged.update({f"{name}/{key}": value for key, value in values.items()})
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)

    def summary(self) -> str:
        """The summary table: the core report, then dense/pruned/delta for each validation metric, then times."""
        if self.report is None:
            return "WandaPruningCallback: nothing pruned yet"
        lines = [f"WandaPruningCallback: pruned at {self._when}", str(self.report)]
        if self.metrics:
            width = max(len("metric"), *(len(name) for name in self.metrics))
            lines += ["", f"{'metric':<{width}}  {'dense':>12}  {'pruned':>12}  {'delta':>12}"]
            lines.append("  ".join(["-" * width] + ["-" * 12] * 3))
            for name, values in self.metrics.items():
                lines.append(
                    f"{name:<{width}}  {values['dense']:>12.4f}  {values['pruned']:>12.4f}  {values['delta']:>+12.4f}"
                )
            lines.append(f"evaluation time: {self.evaluation_seconds:.2f} s")
        return "\n".join(lines)

    def _print_summary(self) -> None:
        if self.verbose:
            rank_zero_info(self.summary())


# --- helpers ----------------------------------------------------------------------------------------------------------


def _check_bool(value: Any, argument: str) -> None:
    if not isinstance(value, bool):
        raise MisconfigurationException(f"`{argument}` must be True or False, got {value!r}")


def _check_positive(value: Any, argument: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MisconfigurationException(f"`{argument}` must be a positive integer or None, got {value!r}")


def _patterns(value: Sequence[str] | None, argument: str) -> tuple[str, ...] | None:
    if isinstance(value, str):
        raise TypeError(f"`{argument}` must be a list of name patterns, not a single string: use [{value!r}]")
    return _validate_patterns(value, argument)


def _describe(calibration: Any) -> str:
    return repr(calibration) if isinstance(calibration, str) else type(calibration).__name__


def _is_sharded_strategy(trainer: pl.Trainer) -> bool:
    return type(trainer.strategy).__name__ in ("ModelParallelStrategy", "FSDPStrategy")


def _holds_shards(module: nn.Module) -> bool:
    """Whether ``module``'s weights are split across processes (FSDP1 units or FSDP2 DTensors)."""
    return is_fsdp1(module) or any(is_dtensor(p) for p in module.parameters())


def _fsdp1_wrapper(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
    """The FSDP1 root that wraps ``pl_module`` from outside (Lightning's ``FSDPStrategy``), or ``None``."""
    wrapper = getattr(trainer.strategy, "model", None)
    if isinstance(wrapper, nn.Module) and wrapper is not pl_module and is_fsdp1(wrapper):
        return wrapper
    return None


def _check_strategy(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    supported = (
        "a single device, DDP (`strategy`='ddp', 'ddp_spawn', ...), ModelParallelStrategy with FSDP2, or FSDPStrategy "
        "with use_orig_params=True"
    )
    if "DeepSpeedStrategy" in names:
        raise MisconfigurationException(
            f"WandaPruningCallback does not support DeepSpeed ({type(strategy).__name__}) yet: ZeRO keeps flattened "
            f"parameter partitions that pruning cannot address by rows. Use {supported}, or prune the consolidated "
            "model after training with `wanda_lightning.prune`"
        )
    if "ModelParallelStrategy" in names:
        try:
            mesh = strategy.device_mesh  # type: ignore[attr-defined]
        except RuntimeError:  # before the processes are set up: checked again when pruning
            return
        names_of_dims = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if "tensor_parallel" in names_of_dims and mesh["tensor_parallel"].size() > 1:
            raise MisconfigurationException(
                f"WandaPruningCallback prunes FSDP2 row shards; tensor parallelism (`tensor_parallel_size`="
                f"{mesh['tensor_parallel'].size()}) splits weights by columns too and is not supported yet: use "
                "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with fully_shard"
            )
        return
    if "FSDPStrategy" in names and "XLAFSDPStrategy" not in names:
        if not getattr(strategy, "kwargs", {}).get("use_orig_params", True):
            raise MisconfigurationException(
                "WandaPruningCallback needs FSDPStrategy(use_orig_params=True) (Lightning's default): with "
                "use_orig_params=False the pruned weights cannot be addressed by name to keep them at zero; or prune "
                "the model with `wanda_lightning.prune`, which works either way"
            )
        return
    if names & _UNSUPPORTED_STRATEGIES or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise MisconfigurationException(
            f"WandaPruningCallback does not support the {type(strategy).__name__} strategy yet: use {supported}, "
            "or prune the model after training with `wanda_lightning.prune`"
        )


def _hf_prefix(pl_module: nn.Module) -> str | None:
    """Module name of the one transformers model inside ``pl_module`` (``""`` for itself), or ``None``."""
    from .export.hf import _hf_model

    try:
        return _hf_model(pl_module)[1]
    except (ImportError, TypeError):
        return None


def _first_loader(loaders: Any) -> Iterable[Any] | None:
    """The first dataloader of what ``trainer.val_dataloaders`` / ``train_dataloader`` hold, or ``None``."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return _first_loader(loaders[0]) if loaders else None
    if isinstance(loaders, Mapping):
        return _first_loader(next(iter(loaders.values()))) if loaders else None
    return loaders


def _has_distributed_sampler(loader: Any) -> bool:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return isinstance(sampler, DistributedSampler) or isinstance(batch_sampler, DistributedSampler)


def _safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _measure_sparsity(parameters: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Overall and per-layer sparsity through :class:`Sparsity`, whose states are summed across processes (under DDP
    every process holds the same weights, so the fractions are those of one process; under FSDP2 each holds its own
    rows, so the sums are those of the whole weights)."""
    overall = Sparsity()
    per_layer: dict[str, float] = {}
    for name, weight in parameters.items():
        metric = Sparsity()
        metric.update(local_tensor(weight.detach()))
        overall.update(local_tensor(weight.detach()))
        per_layer[name.removesuffix(".weight")] = float(metric.compute())
    return float(overall.compute()), per_layer


def _pack(drop: Tensor) -> dict[str, Any]:
    """A boolean mask as 8 entries per byte (most significant bit first) plus its shape."""
    flat = drop.detach().reshape(-1).to("cpu", torch.uint8)
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return {"shape": list(drop.shape), "bits": (padded.view(-1, 8) * _BITS).sum(dim=1).to(torch.uint8)}


def _unpack(entry: dict[str, Any]) -> Tensor:
    shape = tuple(entry["shape"])
    numel = math.prod(shape)
    bits = (entry["bits"].unsqueeze(1) & _BITS) != 0  # (bytes, 8)
    return bits.reshape(-1)[:numel].reshape(shape)


def _report_from_dict(data: dict[str, Any]) -> PruningReport:
    names = {f.name for f in fields(PruningReport)}
    values = {k: v for k, v in data.items() if k in names}
    values["layers"] = [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in data.get("layers", [])]
    values["skipped"] = [SkippedLayer(**skipped) for skipped in data.get("skipped", [])]
    return PruningReport(**values)


def _metric_snapshot(metric: Metric) -> dict[str, Any]:
    state = {name: deepcopy(getattr(metric, name)) for name in metric._defaults}
    return {"state": state, "update_count": metric._update_count, "computed": metric._computed}


def _restore(
    pl_module: nn.Module, modes: list[tuple[nn.Module, bool]], metrics: list[Metric], snapshots: list[dict[str, Any]]
) -> None:
    for module, training in modes:
        module.training = training
    for metric, snapshot in zip(metrics, snapshots, strict=True):
        for name, value in snapshot["state"].items():
            setattr(metric, name, value)
        metric._update_count = snapshot["update_count"]
        metric._computed = snapshot["computed"]


class _LogCapture:
    """Stands in for ``LightningModule.log`` during the callback's own validation passes.

    Tensor values are reduced like Lightning reduces epoch-level validation logs (``reduce_fx`` mean weighted by batch
    size, sum, max or min), then across processes; logged ``Metric`` objects are computed (and synced) at the end.
    """

    _SIGNATURE = inspect.signature(pl.LightningModule.log)
    _REDUCE: ClassVar[dict[str, str]] = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}

    def __init__(self) -> None:
        self.batch: Any = None
        self.values: dict[str, list[tuple[Tensor, int]]] = {}
        self.reduce_fx: dict[str, str] = {}
        self.metrics: dict[str, Metric] = {}

    def attached(self, pl_module: nn.Module) -> ExitStack:
        stack = ExitStack()
        previous = vars(pl_module).get("log")
        object.__setattr__(pl_module, "log", self.log)

        def detach() -> None:
            if previous is None:
                vars(pl_module).pop("log", None)
            else:
                object.__setattr__(pl_module, "log", previous)

        stack.callback(detach)
        return stack

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        bound = self._SIGNATURE.bind(None, name, value, *args, **kwargs)
        bound.apply_defaults()
        options = bound.arguments
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        tensor = torch.as_tensor(value).detach()
        if tensor.numel() != 1:
            return
        reduce_fx = options.get("reduce_fx", "mean")
        reduce_name = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "mean")
        self.reduce_fx[name] = self._REDUCE.get(reduce_name.lower(), "mean")
        size = options.get("batch_size")
        if size is None:
            size = _batch_size(self.batch)
        self.values.setdefault(name, []).append((tensor.reshape(()).double().cpu(), int(size)))

    def reduce(self, trainer: pl.Trainer) -> dict[str, float]:
        result: dict[str, float] = {}
        distributed = trainer.world_size > 1
        device = trainer.strategy.root_device
        for name in sorted(self.values):
            entries = self.values[name]
            fx = self.reduce_fx[name]
            if fx == "mean":
                weighted = torch.stack([v * n for v, n in entries]).sum()
                pair = torch.stack([weighted, torch.tensor(float(sum(n for _, n in entries)), dtype=torch.float64)])
                if distributed:
                    pair = trainer.strategy.reduce(pair.to(device), reduce_op="sum").cpu()
                result[name] = float(pair[0] / pair[1])
                continue
            values = torch.stack([v for v, _ in entries])
            value = values.sum() if fx == "sum" else values.max() if fx == "max" else values.min()
            if distributed:
                value = trainer.strategy.reduce(value.to(device), reduce_op=fx).cpu()
            result[name] = float(value)
        for name in sorted(self.metrics):
            result[name] = float(self.metrics[name].compute())
        return result


def _batch_size(batch: Any) -> int:
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        return int(extract_batch_size(batch))
    except Exception:  # no tensor in the batch: weigh it as one
        return 1


class _Progress:
    """A progress bar in the style of the trainer's own (Rich or TQDM); silent when the trainer's is off, on other
    ranks, or for custom progress bars."""

    def __init__(self, trainer: pl.Trainer, description: str, total: int | None) -> None:
        self._tqdm: Any = None
        self._rich: Any = None
        self._own_rich = False
        self._task: Any = None
        self._description = description
        self._total = total
        self._bar = trainer.progress_bar_callback

    def __enter__(self) -> _Progress:
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        bar = self._bar
        if not isinstance(bar, (RichProgressBar, TQDMProgressBar)) or bar.is_disabled or not self._total:
            return self
        if isinstance(bar, RichProgressBar):
            progress: Any = bar.progress
            if progress is None:
                try:
                    from rich.progress import Progress

                    progress = Progress(transient=True)
                    progress.start()
                    self._own_rich = True
                except Exception:  # another live display is active: stay silent
                    return self
            self._rich = progress
            self._task = progress.add_task(self._description, total=self._total)
        elif isinstance(bar, TQDMProgressBar):
            from tqdm.auto import tqdm

            self._tqdm = tqdm(
                total=self._total, desc=self._description, leave=False, dynamic_ncols=True, file=sys.stdout
            )
        return self

    def advance(self) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)
        elif self._rich is not None:
            self._rich.update(self._task, advance=1)

    def __exit__(self, *exc_info: object) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._rich is not None:
            self._rich.remove_task(self._task)
            if self._own_rich:
                self._rich.stop()
        self._tqdm = self._rich = None
