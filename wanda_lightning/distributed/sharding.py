"""Row-sharded weights (FSDP2 ``fully_shard``, DTensor ``Shard(0)``): what can be pruned shard-locally, and the few
collectives that keep every rank's decisions identical.

Wanda decides each output row from that row's weights and the input statistics, so a rank that holds rows
``[a, b)`` of a weight (``Shard(0)``) prunes them on its own once the statistics are all-reduced: no weight is ever
gathered. Everything here works on plain tensors too, so the engine calls it unconditionally.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ShardedLayout",
    "fsdp1_layout",
    "holds_shards",
    "is_dtensor",
    "is_fsdp1",
    "reshard_fsdp_modules",
    "same_count_on_every_rank",
    "sharded_layout",
    "with_full_weights",
]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (or a parameter wrapping one).

    Example::

        >>> is_dtensor(torch.zeros(2))
        False
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def reshard_fsdp_modules(model: nn.Module) -> None:
    """Puts every FSDP2 module of ``model`` back in its sharded state, also after an interrupted forward.

    Block-sequential calibration stops the model's forward with an exception once the first block's inputs are
    captured; FSDP2's post-forward hooks then never run, leaving the root module "in forward" with unsharded copies
    as its parameters. Those hooks are run here (innermost modules first), then every module is resharded, so masks
    go to the sharded parameters and the next forward starts clean.

    Example::

        >>> reshard_fsdp_modules(nn.Linear(2, 2))  # no FSDP module: nothing to do
    """
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    for module in reversed(list(model.modules())):
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        if state._training_state == TrainingState.FORWARD:
            state._post_forward(module, (), None)
        module.reshard()


AllReduce = Callable[[list[Tensor], str], None]
"""An in-place all-reduce of a list of tensors with an op (``"sum"``, ``"min"`` or ``"max"``) across processes."""


@dataclass
class ShardedLayout:
    """How a model's target weights are distributed.

    Attributes:
        group: The process group of the data-parallel mesh dimension the weights are sharded over.
        world_size: Ranks in ``group``.
        sharded_layers: Target layers whose weights are split by rows (``Shard(0)``) across ``group``.
        device_type: Device type of the collectives (``"cuda"`` for NCCL).
        fsdp1_owners: FSDP1: target layer name -> the ``FullyShardedDataParallel`` unit that owns its weight, whose
            full parameters are summoned (one unit at a time) while its layers are scored and pruned.
    """

    group: Any
    world_size: int
    sharded_layers: list[str]
    device_type: str = "cpu"
    fsdp1_owners: dict[str, Any] = field(default_factory=dict)

    def all_reduce(self, tensors: Iterable[Tensor], op: str = "sum") -> None:  # an AllReduce
        """In-place all-reduce (``"sum"``, ``"min"`` or ``"max"``) over the data-parallel group.

        Tensors are moved to the mesh's device type for the collective (NCCL needs CUDA tensors) and back.
        """
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        for tensor in tensors:
            wire = tensor
            if tensor.device.type != self.device_type:
                cuda = self.device_type == "cuda"
                wire = tensor.to(torch.device("cuda", torch.cuda.current_device()) if cuda else self.device_type)
            dist.all_reduce(wire, op=reduce_op, group=self.group)
            if wire is not tensor:
                tensor.copy_(wire)


def _describe_mesh(mesh: Any) -> str:
    names = getattr(mesh, "mesh_dim_names", None)
    return f"{mesh.ndim}-D mesh {tuple(names) if names else tuple(mesh.shape)}"


def sharded_layout(layers: Sequence[Any]) -> ShardedLayout | None:
    """Checks that every DTensor target weight can be pruned shard-locally and returns their common layout.

    Supported: ``Shard(0)`` (rows; FSDP2's ``fully_shard``) or ``Replicate()`` on a one-dimensional device mesh, the
    same mesh for all layers. Tensor parallelism (a second mesh dimension, or ``Shard(1)``), and transposed GPT-2
    ``Conv1D`` weights sharded along their stored rows (the input dimension) are refused: their output rows are not
    local to one rank.

    Args:
        layers: :class:`~wanda_lightning.core.targets.TargetLayer` objects.

    Returns:
        ``None`` when no weight is a DTensor, else the layout.

    Raises:
        ValueError: Naming the first layer whose placement cannot be pruned shard-locally, and its placement.

    Example::

        >>> from wanda_lightning.core.targets import find_targets
        >>> sharded_layout(find_targets(nn.Sequential(nn.Linear(4, 4)))[0]) is None
        True
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh: Any = None
    sharded: list[str] = []
    for layer in layers:
        weight = layer.tensor
        if not is_dtensor(weight):
            continue
        if layer.rows is not None:
            raise ValueError(
                f"layer {layer.name!r} is some rows of the sharded parameter {layer.parameter_name!r} (a packed "
                "MultiheadAttention projection), whose shards do not follow those rows; prune before sharding, or "
                "leave it out with `ignore`"
            )
        placements = tuple(weight.placements)
        row_dim = 1 if layer.transposed else 0
        row_sharded = placements == (Shard(row_dim),)
        if weight.device_mesh.ndim != 1 or not (row_sharded or placements == (Replicate(),)):
            raise ValueError(
                f"layer {layer.name!r} is sharded as {placements} on a {_describe_mesh(weight.device_mesh)}; pruning "
                f"works on weights split by output rows (Shard({row_dim}), as FSDP2's fully_shard does) or replicated, "
                "on one data-parallel mesh dimension. Tensor parallelism is not supported yet: apply only "
                "fully_shard (ModelParallelStrategy(tensor_parallel_size=1)), or leave the layer out with `ignore`"
            )
        if mesh is None:
            mesh = weight.device_mesh
        elif weight.device_mesh != mesh:
            raise ValueError(
                f"layer {layer.name!r} lives on another device mesh ({_describe_mesh(weight.device_mesh)}) than the "
                "first sharded target layer; all sharded target layers must share one data-parallel mesh"
            )
        if row_sharded:
            sharded.append(layer.name)
    if mesh is None:
        return None
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("target weights are DTensors but torch.distributed is not initialized")
    group = mesh.get_group()
    return ShardedLayout(
        group=group, world_size=dist.get_world_size(group), sharded_layers=sharded, device_type=mesh.device_type
    )


def fsdp1_layout(model: nn.Module, layers: Sequence[Any]) -> ShardedLayout | None:
    """For a model holding FSDP1 (``FullyShardedDataParallel``) units: each target layer's owning unit, and the
    process group; ``None`` when there is no FSDP1 unit.

    FSDP1 flattens and shards each unit's parameters, so a weight cannot be addressed by rows; instead every rank
    summons one unit's full parameters at a time (``summon_full_params(writeback=True)``), computes the same masks
    from the all-reduced statistics, and writes its shard back. Peak memory: one unit's full parameters.

    Raises:
        ValueError: If a target layer's weight is flattened by an FSDP1 unit outside ``model``.

    Example::

        >>> fsdp1_layout(nn.Linear(2, 2), []) is None
        True
    """
    try:
        from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    units = {name: module for name, module in model.named_modules() if isinstance(module, FullyShardedDataParallel)}
    if not units:
        return None
    owners: dict[str, Any] = {}
    for layer in layers:
        found = [name for name in units if not name or layer.name.startswith(f"{name}.")]
        if found:
            owners[layer.name] = units[max(found, key=len)]
        elif layer.tensor.dim() != 2:
            raise ValueError(
                f"layer {layer.name!r} is flattened by an FSDP unit outside the module given to prune(); pass the "
                "module that holds its FullyShardedDataParallel wrapper"
            )
    root = next(iter(units.values()))
    group = root.process_group
    device = getattr(root, "compute_device", None)
    device_type = device.type if isinstance(device, torch.device) else "cpu"
    return ShardedLayout(
        group=group,
        world_size=dist.get_world_size(group),
        sharded_layers=[],
        device_type=device_type,
        fsdp1_owners=owners,
    )


def is_fsdp1(module: nn.Module) -> bool:
    """Whether ``module`` is or holds an FSDP1 ``FullyShardedDataParallel`` unit.

    Example::

        >>> is_fsdp1(nn.Linear(2, 2))
        False
    """
    try:
        from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def with_full_weights(layers: Sequence[Any], layout: ShardedLayout | None) -> Iterator[Any]:
    """Yields ``layers`` in order; under FSDP1, while the full parameters of each layer's owning unit are summoned
    (written back to every rank's shard when the unit's layers are done). Every rank must iterate the same layers.

    Example::

        >>> list(with_full_weights([1, 2], None))
        [1, 2]
    """
    if layout is None or not layout.fsdp1_owners:
        yield from layers
        return
    from torch.distributed.fsdp.fully_sharded_data_parallel import FullyShardedDataParallel

    index = 0
    while index < len(layers):
        owner = layout.fsdp1_owners.get(layers[index].name)
        run = [layers[index]]
        index += 1
        while index < len(layers) and layout.fsdp1_owners.get(layers[index].name) is owner:
            run.append(layers[index])
            index += 1
        with ExitStack() as stack:
            if owner is not None:
                stack.enter_context(FullyShardedDataParallel.summon_full_params(owner, recurse=False, writeback=True))
            yield from run


def holds_shards(module: nn.Module) -> bool:
    """Whether ``module``'s weights are split across processes (FSDP1 units or FSDP2 DTensors).

    Example::

        >>> holds_shards(nn.Linear(2, 2))
        False
    """
    return is_fsdp1(module) or any(is_dtensor(p) for p in module.parameters())


def same_count_on_every_rank(
    batches: list[Any], all_reduce: AllReduce, world_size: int, *, what: str = "calibration", truncate: bool = True
) -> list[Any]:
    """Makes every process agree on how many calibration batches it runs; every process must call it.

    Sharded forwards (FSDP) all-gather each block's weights in every forward, so a process running one forward more
    than the others would wait for them forever: with ``truncate`` every process keeps its first ``fewest`` batches
    (with a warning when the counts differ). A process with no batch at all makes every process raise, together.

    Args:
        batches: This process's batches.
        all_reduce: In-place all-reduce across the processes (``ShardedLayout.all_reduce`` or the strategy's).
        world_size: Number of processes, for the message.
        what: What the batches come from, for the messages.
        truncate: Cut to the fewest any process has.

    Raises:
        ValueError: On every process, when one of them has no batch.

    Example::

        >>> same_count_on_every_rank([1, 2], lambda tensors, op: None, world_size=1)
        [1, 2]
    """
    counts = torch.tensor([len(batches), -len(batches)], dtype=torch.float64)
    all_reduce([counts], "min")
    fewest, most = int(counts[0]), -int(counts[1])
    if fewest == 0:
        where = f" on at least one of the {world_size} processes" if world_size > 1 else ""
        raise ValueError(f"{what} yielded no batch{where}; every process needs at least one")
    if truncate and fewest != most:
        warnings.warn(
            f"{what}: batch counts differ across processes ({fewest} to {most}); every process uses its first "
            f"{fewest} so that sharded forwards stay in step",
            stacklevel=3,
        )
        return batches[:fewest]
    return batches
