"""Which Lightning strategies the callbacks support, and the few collectives they need from them."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from ..distributed import holds_shards, is_fsdp1

__all__ = [
    "check_strategy",
    "fsdp1_wrapper",
    "is_sharded_strategy",
    "rebuild_optimizers",
    "strategy_all_reduce",
    "strategy_sync",
]

# Checked by name so that none of them has to be importable; DeepSpeedStrategy subclasses DDPStrategy.
_UNSUPPORTED_STRATEGIES = frozenset({"DeepSpeedStrategy", "XLAStrategy", "XLAFSDPStrategy"})
_SUPPORTED = (
    "a single device, DDP (`strategy`='ddp', 'ddp_spawn', ...), ModelParallelStrategy with FSDP2, or FSDPStrategy "
    "with use_orig_params=True"
)


def check_strategy(trainer: pl.Trainer, owner: str = "WandaPruningCallback", *, reshapes: bool = False) -> None:
    """Raises ``ValueError`` for a strategy whose weights the callback cannot address (DeepSpeed, tensor parallelism,
    FSDP1 without ``use_orig_params``, XLA, ...); with ``reshapes`` (the callback changes the shapes of weights), also
    for sharded strategies and sharded weights, whose every shard would change shape, and for the spawning launchers,
    which load the workers' weights back into the main process's module of the old shapes."""
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if reshapes:
        _check_reshapable(trainer, owner, names)
    if "DeepSpeedStrategy" in names:
        raise ValueError(
            f"{owner} does not support DeepSpeed ({type(strategy).__name__}) yet: ZeRO keeps flattened "
            f"parameter partitions that pruning cannot address by rows. Use {_SUPPORTED}, or prune the consolidated "
            "model after training with `wanda_lightning.prune`"
        )
    if "ModelParallelStrategy" in names:
        try:
            mesh = strategy.device_mesh  # type: ignore[attr-defined]
        except RuntimeError:  # before the processes are set up: checked again when pruning
            return
        names_of_dims = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if "tensor_parallel" in names_of_dims and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"{owner} prunes FSDP2 row shards; tensor parallelism (`tensor_parallel_size`="
                f"{mesh['tensor_parallel'].size()}) splits weights by columns too and is not supported yet: use "
                "ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with fully_shard"
            )
        return
    if "FSDPStrategy" in names and "XLAFSDPStrategy" not in names:
        if not getattr(strategy, "kwargs", {}).get("use_orig_params", True):
            raise ValueError(
                f"{owner} needs FSDPStrategy(use_orig_params=True) (Lightning's default): with "
                "use_orig_params=False the pruned weights cannot be addressed by name to keep them at zero; or prune "
                "the model with `wanda_lightning.prune`, which works either way"
            )
        return
    if names & _UNSUPPORTED_STRATEGIES or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"{owner} does not support the {type(strategy).__name__} strategy yet: use {_SUPPORTED}, "
            "or prune the model after training with `wanda_lightning.prune`"
        )


def _check_reshapable(trainer: pl.Trainer, owner: str, names: set[str]) -> None:
    strategy = trainer.strategy
    if names & {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy", "XLAStrategy", "XLAFSDPStrategy"}:
        raise ValueError(
            f"{owner} does not support {type(strategy).__name__}: removing units changes the shape of every shard. "
            "Use a single device or DDP, or shrink the model before sharding it"
        )
    if trainer.lightning_module is not None and holds_shards(trainer.lightning_module):
        raise ValueError(f"{owner}: the module's weights are sharded (FSDP); shrink before sharding")
    if type(getattr(strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
        raise ValueError(
            f"{owner} does not support the spawning strategy {type(strategy).__name__} (start method "
            f"{getattr(strategy, '_start_method', '?')!r}): when the fit ends, Lightning loads the workers' weights "
            "into the main process's module, which still has the original shapes. Use strategy='ddp' (processes "
            "started from your script or by torchrun)"
        )


def rebuild_optimizers(trainer: pl.Trainer) -> None:
    """New optimizers and LR schedulers from ``configure_optimizers`` for the module's new parameters (and, under DDP,
    a new wrapper: its gradient buckets were sized for the old ones). The new schedulers go on where the old ones were
    (their state, and the learning rates they had set), so the module's schedule carries on across the rebuild."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and strategy.lightning_module is not None:
        strategy.model = strategy._setup_model(strategy.lightning_module)
        strategy._register_ddp_hooks()
    schedulers = [config.scheduler.state_dict() for config in strategy.lr_scheduler_configs]
    strategy.setup_optimizers(trainer)
    _optimizers_to_device(strategy.optimizers, strategy.root_device)
    configs = strategy.lr_scheduler_configs
    if len(configs) != len(schedulers):
        return
    for config, state in zip(configs, schedulers, strict=True):
        scheduler = config.scheduler
        if type(state.get("_last_lr")) is not list or len(state["_last_lr"]) != len(scheduler.optimizer.param_groups):
            continue
        scheduler.load_state_dict(state)
        for group, rate in zip(scheduler.optimizer.param_groups, state["_last_lr"], strict=True):
            group["lr"] = rate


def is_sharded_strategy(trainer: pl.Trainer) -> bool:
    """Whether the trainer shards weights across processes (``ModelParallelStrategy`` or ``FSDPStrategy``)."""
    return type(trainer.strategy).__name__ in ("ModelParallelStrategy", "FSDPStrategy")


def fsdp1_wrapper(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module | None:
    """The FSDP1 root that wraps ``pl_module`` from outside (Lightning's ``FSDPStrategy``), or ``None``."""
    wrapper = getattr(trainer.strategy, "model", None)
    if isinstance(wrapper, nn.Module) and wrapper is not pl_module and is_fsdp1(wrapper):
        return wrapper
    return None


def strategy_all_reduce(trainer: pl.Trainer) -> Callable[[list[Tensor], str], None]:
    """An in-place all-reduce (``op``: ``"sum"``, ``"min"``, ``"max"``) through the trainer's strategy; a no-op on
    one process."""
    strategy = trainer.strategy

    def all_reduce(tensors: list[Tensor], op: str = "sum") -> None:
        if trainer.world_size <= 1:
            return
        for tensor in tensors:
            reduced = strategy.reduce(tensor.to(strategy.root_device), reduce_op=op)
            if reduced is not tensor:
                tensor.copy_(reduced)

    return all_reduce


def strategy_sync(trainer: pl.Trainer) -> Callable[[list[Tensor]], None] | None:
    """The statistics sync for ``prune()`` (an in-place sum across processes), or ``None`` on one process."""
    if trainer.world_size <= 1:
        return None
    all_reduce = strategy_all_reduce(trainer)
    return lambda tensors: all_reduce(tensors, "sum")
