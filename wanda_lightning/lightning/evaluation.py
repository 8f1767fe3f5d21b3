"""Measuring a module with its own ``validation_step``, outside the trainer's loops: what it logs is captured and
reduced as Lightning would, so that the callbacks can compare dense and pruned models on the user's own metrics."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from copy import deepcopy
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torchmetrics import Metric

from .calibration import safe_len, transfer_batch
from .patches import patch_method
from .progress import TrainerProgress
from .strategies import fsdp1_wrapper

__all__ = ["LogCapture", "measure_validation", "quiet_steps", "run_step"]


def measure_validation(
    trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable[Any], stage: str, limit: int | None = None
) -> dict[str, float]:
    """Runs ``validation_step`` over up to ``limit`` batches of ``loader`` and returns what the module logged, reduced
    like Lightning reduces it (and across processes).

    Nothing reaches the trainer's results or loggers; the module's modes, its torchmetrics states and the random state
    are restored afterwards.

    Args:
        trainer: The running trainer (for the precision plugin, the strategy and the progress bar).
        pl_module: The module.
        loader: Validation batches (before the module's batch-transfer hooks).
        stage: Shown on the progress bar (``"dense"``, ``"pruned"``).
        limit: Most batches; ``None`` for as many as the trainer validates (``limit_val_batches``).

    Returns:
        ``{name: value}`` for every scalar (or torchmetrics ``Metric``) the module logged.
    """
    if limit is None and trainer.num_val_batches:
        bound = trainer.num_val_batches[0]
        limit = None if bound == float("inf") else int(bound)
    total = limit if limit is not None else safe_len(loader)
    capture = LogCapture()
    metrics = [module for module in pl_module.modules() if isinstance(module, Metric)]
    snapshots = [_metric_snapshot(metric) for metric in metrics]
    modes = [(module, module.training) for module in pl_module.modules()]
    wrapper = fsdp1_wrapper(trainer, pl_module)
    many_loaders = isinstance(trainer.val_dataloaders, (list, tuple, Mapping)) and len(trainer.val_dataloaders) > 1
    progress = TrainerProgress(trainer, f"Wanda eval ({stage})", total)
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
            batch = transfer_batch(trainer, pl_module, batch)
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


@contextmanager
def quiet_steps(pl_module: pl.LightningModule) -> Iterator[None]:
    """For the ``with`` block, what the module's steps log goes nowhere (a :class:`LogCapture` that is thrown away)
    and its torchmetrics states are restored afterwards: the steps can run on calibration batches without touching
    the run's results.

    Example::

        >>> module = pl.LightningModule()
        >>> with quiet_steps(module):
        ...     module.log("loss", 1.0)  # captured, thrown away
    """
    metrics = [module for module in pl_module.modules() if isinstance(module, Metric)]
    snapshots = [_metric_snapshot(metric) for metric in metrics]
    with ExitStack() as stack:
        stack.callback(_restore, pl_module, [], metrics, snapshots)
        stack.enter_context(LogCapture().attached(pl_module))
        yield


def run_step(pl_module: pl.LightningModule, step: str, batch: Any) -> Any:
    """Runs ``pl_module.<step>(batch, 0)`` (``validation_step`` or ``training_step``); with a ``dataloader_idx``
    argument that has no default, ``(batch, 0, 0)``."""
    method = getattr(pl_module, step)
    parameter = inspect.signature(method).parameters.get("dataloader_idx")
    if parameter is not None and parameter.default is inspect.Parameter.empty:
        return method(batch, 0, 0)
    return method(batch, 0)


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


class LogCapture:
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
        """Stands in for ``pl_module.log`` until the returned stack closes (a
        :func:`~wanda_lightning.lightning.patches.patch_method` patch, undone exactly)."""
        stack = ExitStack()
        stack.callback(patch_method(pl_module, "log", self._log_instead))
        return stack

    def _log_instead(self, original: Any, *args: Any, **kwargs: Any) -> None:
        self.log(*args, **kwargs)  # the module's own `log` is not called

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
