"""Where a callback's calibration batches come from inside a run, and how the module runs on them.

Calibration uses the trainer's own dataloaders (the validation one by default, with its distributed sampler, or the
training one) or one the user passes; batches go through the module's batch-transfer hooks and the precision
plugin as in the trainer's loops, and every process ends up with its share.

Lightning loads a fit's validation dataloaders lazily, when its first validation is due: not at all before
``on_train_start`` when ``check_val_every_n_epoch`` skips the first epoch. :func:`validation_loaders` loads them
when a callback needs them, whatever the validation schedule, as the fit loop would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, cast

import lightning.pytorch as pl
from lightning.pytorch.strategies.strategy import _ForwardRedirection
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from ..core import prepare_batches
from ..distributed import same_count_on_every_rank
from .patches import patched
from .strategies import fsdp1_wrapper, is_sharded_strategy, strategy_all_reduce

__all__ = [
    "CALIBRATION_SOURCES",
    "CalibrationData",
    "CalibrationSource",
    "check_calibration",
    "first_loader",
    "has_forward",
    "safe_len",
    "transfer_batch",
    "validation_loaders",
]

CalibrationSource = Literal["val", "train"]
CALIBRATION_SOURCES: tuple[str, ...] = ("val", "train")


def check_calibration(calibration: Any) -> None:
    """Raises ``ValueError`` unless ``calibration`` is ``"val"``, ``"train"`` or an iterable of batches."""
    if isinstance(calibration, str):
        if calibration not in CALIBRATION_SOURCES:
            raise ValueError(
                f"`calibration` must be 'val', 'train' or a DataLoader (or iterable of batches), got {calibration!r}"
            )
    elif isinstance(calibration, (Tensor, Mapping)) or not isinstance(calibration, Iterable):
        raise ValueError(
            "`calibration` must be 'val', 'train' or a DataLoader (or iterable of batches), got "
            f"{type(calibration).__name__}"
        )


def describe(calibration: Any) -> str:
    """``'val'`` or the loader's class name, for messages."""
    return repr(calibration) if isinstance(calibration, str) else type(calibration).__name__


def first_loader(loaders: Any) -> Iterable[Any] | None:
    """The first dataloader of what ``trainer.val_dataloaders`` / ``train_dataloader`` hold, or ``None``."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return first_loader(loaders[0]) if loaders else None
    if isinstance(loaders, Mapping):
        return first_loader(next(iter(loaders.values()))) if loaders else None
    return cast(Iterable[Any], loaders)


def validation_loaders(trainer: pl.Trainer) -> Any:
    """``trainer.val_dataloaders``, loaded first if the fit has validation data that Lightning has not loaded yet.

    During a fit Lightning loads the validation dataloaders when its first validation is due (in the sanity check,
    or at the start of the first epoch that validates), so a callback that needs them earlier (at ``on_train_start``,
    with ``check_val_every_n_epoch`` > 1) would find none. This loads them the way the fit loop does at its start:
    the same ``val_dataloader()`` request, distributed sampler and ``limit_val_batches``, kept by the loop, which then
    does not load them again. The random state is left as it was.

    Nothing is loaded where Lightning would load nothing either: no validation data (no ``val_dataloaders`` and no
    ``val_dataloader()``), a module without ``validation_step``, or ``limit_val_batches=0`` (validation switched off).

    Args:
        trainer: The trainer, attached to its module.

    Returns:
        What ``trainer.val_dataloaders`` holds now (``None`` when there is no validation data).

    Example::

        def on_train_start(self, trainer, pl_module):
            loader = first_loader(validation_loaders(trainer))  # also with check_val_every_n_epoch=10
    """
    loaders = trainer.val_dataloaders
    if loaders is not None or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        return loaders
    if trainer.lightning_module is None or not trainer.enable_validation:
        return None
    stage = trainer.state.stage
    with isolate_rng():
        trainer.validating = True  # as the fit loop does when it loads them at its start
        try:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        finally:
            trainer.state.stage = stage
    return trainer.val_dataloaders


def _no_validation_reason(trainer: pl.Trainer) -> str:
    """Why ``trainer.val_dataloaders`` is empty when validation data may have been given, for messages."""
    if trainer.limit_val_batches == 0:
        return " (validation is switched off: `limit_val_batches`=0)"
    module = trainer.lightning_module
    if module is not None and not is_overridden("validation_step", module):
        return f" ({type(module).__name__} defines no `validation_step`, so the trainer loads none)"
    return ""


def has_forward(pl_module: nn.Module) -> bool:
    """Whether the module's class defines ``forward`` (a LightningModule that does everything in its steps does not).

    Example::

        >>> has_forward(pl.LightningModule()), has_forward(nn.Linear(2, 2))
        (False, True)
    """
    forward = getattr(type(pl_module), "forward", None)
    return forward is not None and forward not in (pl.LightningModule.forward, nn.Module.forward)


def safe_len(loader: Any) -> int | None:
    """``len(loader)``, or ``None`` for an iterable without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def _has_distributed_sampler(loader: Any) -> bool:
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return isinstance(sampler, DistributedSampler) or isinstance(batch_sampler, DistributedSampler)


def transfer_batch(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """A batch as the trainer's loops hand it to a step: precision conversion, the module's batch-transfer hooks and
    the strategy's device move."""
    batch = trainer.precision_plugin.convert_input(batch)
    batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


class CalibrationData:
    """A callback's calibration: the batches of one process and the forward that runs the module on one of them.

    Args:
        calibration: ``"val"``, ``"train"`` or an iterable of batches (see :func:`check_calibration`).
        num_samples: Most sequences over all processes (``None``: all).
        batch_size: Sequences per forward pass (``None``: the loader's batches).
        forward: Runs the module on one batch already on its device (the callback's ``calibration_forward``).
    """

    def __init__(
        self,
        calibration: CalibrationSource | Iterable[Any],
        num_samples: int | None,
        batch_size: int | None,
        forward: Callable[[pl.LightningModule, Any], Any],
    ) -> None:
        check_calibration(calibration)
        self.calibration = calibration
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.forward = forward
        #: Forward calls since the batches were last prepared: only the first is told apart (a batch format the
        #: module does not take is a configuration error; anything later is the run's own failure).
        self._calls = 0

    @property
    def step_name(self) -> str:
        """The step that runs a module without ``forward`` on these batches: ``"training_step"`` for training data,
        else ``"validation_step"``."""
        return "training_step" if self.calibration == "train" else "validation_step"

    def source(self, trainer: pl.Trainer) -> Iterable[Any]:
        """The loader the batches come from.

        Raises:
            ValueError: When the trainer has no such loader.
        """
        if self.calibration == "val":
            loader = first_loader(validation_loaders(trainer))
            if loader is None:
                why = _no_validation_reason(trainer)
                raise ValueError(
                    f"`calibration`='val' needs a validation dataloader, and the trainer has none{why}: pass "
                    "`val_dataloaders` to `trainer.fit`/`trainer.validate`, define `val_dataloader()` in the "
                    "LightningModule or LightningDataModule (with `limit_val_batches` > 0), or set `calibration` to "
                    "'train' or a DataLoader"
                )
            return loader
        if self.calibration == "train":
            loader = first_loader(trainer.train_dataloader) if trainer.state.fn == TrainerFn.FITTING else None
            if loader is None:
                raise ValueError(
                    "`calibration`='train' needs the training dataloader of `trainer.fit`; outside a fit (say with "
                    "`prune_on`='validate') use `calibration`='val' or pass a DataLoader"
                )
            return loader
        return cast(Iterable[Any], self.calibration)

    def check(self, trainer: pl.Trainer) -> None:
        """Fails before training when the source is missing or visibly empty.

        Raises:
            ValueError: Naming ``calibration``.
        """
        if safe_len(self.source(trainer)) == 0:
            raise ValueError(f"`calibration`={describe(self.calibration)} yielded no batch: its dataloader is empty")

    def batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """This process's calibration batches, on its device; the same decision (error or not) on every process.

        Under DDP with a distributed sampler each process takes about ``num_samples / world`` from its shard; a
        loader without one is split by batches. Under FSDP every process keeps as many batches as the one with
        fewest, so that sharded forwards stay in step.

        Raises:
            MisconfigurationException: When a process has no batch (on every process), or batches are malformed.
        """
        source = self.source(trainer)
        world, rank = trainer.world_size, trainer.global_rank
        sharded = world > 1 and _has_distributed_sampler(source)

        def moved() -> Iterator[Any]:
            for batch in source:
                yield transfer_batch(trainer, pl_module, batch)

        self._calls = 0
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
            error, batches = caught, []  # raised after the collective below, in which every process takes part
        what = f"`calibration`={describe(self.calibration)}"
        try:
            batches = same_count_on_every_rank(
                batches, strategy_all_reduce(trainer), world, what=what, truncate=is_sharded_strategy(trainer)
            )
        except ValueError:
            batches = []
        if error is not None and not isinstance(error, ValueError):
            raise MisconfigurationException(f"{what}: {error}") from error
        if not batches:
            where = "" if world <= 1 else f" on at least one of the {world} processes"
            raise MisconfigurationException(
                f"{what} yielded no batch{where}: give it a non-empty dataloader (with at least {max(world, 1)} "
                "batches under DDP)"
            )
        return batches

    def forward_fn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[nn.Module, Any], Any]:
        """The forward ``prune()`` calls on each batch; under Lightning's FSDPStrategy it runs inside the FSDP1 root's
        ``forward``, which gathers the weights that no inner unit owns (embeddings), as Lightning does for
        ``validation_step``."""
        wrapper = fsdp1_wrapper(trainer, pl_module)
        if wrapper is None:
            return self._forward

        def forward(model: nn.Module, batch: Any) -> Any:
            with patched(pl_module, "_wanda_calibration_step", lambda _, inner: self._forward(pl_module, inner)):
                return _ForwardRedirection()(wrapper, pl_module, "_wanda_calibration_step", batch)

        return forward

    def _forward(self, model: nn.Module, batch: Any) -> Any:
        """Runs the module on one batch. The first batch of a calibration failing with a type, key, index, attribute,
        value or runtime error is most likely a batch format the module does not take: a configuration error, with the
        original chained. A failure on a later batch is the run's own and propagates as it is."""
        first = self._calls == 0
        self._calls += 1
        try:
            return self.forward(cast(pl.LightningModule, model), batch)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError, RuntimeError) as error:
            if not first:
                raise
            what = type(model).__name__ if has_forward(model) else f"{type(model).__name__}.{self.step_name}"
            raise MisconfigurationException(
                f"{what} could not run on a calibration batch of type {type(batch).__name__}: "
                f"{type(error).__name__}: {error}. Pass `calibration_options=CalibrationOptions(forward_fn=lambda "
                "pl_module, batch: ...)` (or override `calibration_forward`) to run the module on your batches"
            ) from error


def warn_if_no_validation(trainer: pl.Trainer, evaluate: bool, owner: str = "WandaPruningCallback") -> None:
    """Warns that metric deltas cannot be measured without a validation dataloader (loaded first where the fit has
    one that Lightning has not loaded yet: :func:`validation_loaders`)."""
    if evaluate and first_loader(validation_loaders(trainer)) is None:
        rank_zero_warn(
            f"{owner}: `evaluate` is on but the trainer has no validation dataloader{_no_validation_reason(trainer)}: "
            "metric deltas will not be measured (pass `val_dataloaders`, or evaluate=False)"
        )
