"""Running and measuring multi-process jobs, for the test suite and the benchmarks (test code, not installed): a
launcher that starts N local processes of a script with ``torch.distributed``'s environment variables, and counters
of collective traffic.

Example::

    results = launch_processes([sys.executable, "worker.py", "scenario", str(out)], out, world_size=2)
    # each process wrote out/rank{r}.pt; results[r] is what rank r saved
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["CollectiveCounter", "ProcessesFailed", "count_full_gathers", "free_port", "launch_processes"]


class ProcessesFailed(RuntimeError):
    """A launched process exited with an error, or the group did not finish in time (the message holds the output)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Example::

        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_processes(
    command: Sequence[str],
    out: str | os.PathLike[str],
    *,
    world_size: int = 2,
    timeout: float = 240.0,
    env: dict[str, str] | None = None,
    capture: bool = True,
) -> list[Any]:
    """Runs ``command`` in ``world_size`` local processes (ranks ``0 .. world_size - 1`` of one gloo/NCCL group) and
    returns what each saved as ``out/rank{r}.pt``.

    Each process gets ``RANK``, ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, one
    intra-op thread (``OMP_NUM_THREADS=1``) and ``HF_HUB_OFFLINE=1``, plus ``env``.

    Args:
        command: The program and its arguments, the same for every rank.
        out: Folder where each rank writes ``rank{r}.pt`` (with ``torch.save``).
        world_size: Number of processes.
        timeout: Seconds to wait for all of them; a hang raises instead of blocking forever.
        env: Extra environment variables.
        capture: Collect each process's output (shown when it fails) instead of letting it through.

    Raises:
        ProcessesFailed: If a process fails or the group outlives ``timeout`` (every process is then killed).
    """
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        environment = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            NODE_RANK="0",
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
            **(env or {}),
        )
        pipe = subprocess.PIPE if capture else None
        stderr = subprocess.STDOUT if capture else None
        procs.append(subprocess.Popen(list(command), env=environment, stdout=pipe, stderr=stderr, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0] or "")
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise ProcessesFailed(f"the {world_size}-process run of {list(command)} hung for {timeout:g} s") from None
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        if proc.returncode != 0:
            raise ProcessesFailed(f"rank {rank} of {list(command)} failed:\n{output[-6000:]}")
    return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


class CollectiveCounter:
    """Counts the calls and bytes of ``torch.distributed`` collectives while :attr:`active` (patched in place).

    ``counts[name]`` is the bytes of that collective's input tensors; ``counts[name + "_calls"]`` its calls. An
    all-gather's input is its second argument.

    Args:
        names: The ``torch.distributed`` functions to count.

    Example::

        counter = CollectiveCounter()
        with counter.counting():
            prune(model, batches)
        counter.counts["all_reduce"]
    """

    def __init__(
        self,
        names: Sequence[str] = (
            "all_reduce",
            "all_gather_into_tensor",
            "all_gather_single",
            "reduce_scatter_tensor",
            "broadcast",
        ),
    ) -> None:
        self.counts: dict[str, int] = {}
        self.active = False
        for name in names:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, original: Any) -> Any:
        def wrapped(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.active:
                source = args[0] if name.startswith("all_gather") and args else tensor
                self.counts[name] = self.counts.get(name, 0) + source.numel() * source.element_size()
                self.counts[f"{name}_calls"] = self.counts.get(f"{name}_calls", 0) + 1
            return original(tensor, *args, **kwargs)

        return wrapped

    @contextmanager
    def counting(self) -> Iterator[dict[str, int]]:
        """Counts for the duration of the ``with`` block."""
        self.active = True
        try:
            yield self.counts
        finally:
            self.active = False


def count_full_gathers() -> dict[str, int]:
    """Counts ``DTensor.full_tensor`` / ``redistribute`` calls from now on (what gathering a whole sharded weight
    would use); returns the live counts."""
    from torch.distributed.tensor import DTensor

    counts = {"full_tensor": 0, "redistribute": 0}
    for name in counts:
        original = getattr(DTensor, name)

        def wrapped(self: Any, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        setattr(DTensor, name, wrapped)
    return counts
