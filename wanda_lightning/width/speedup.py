"""The speed target: ``shrink(model, calibration, speedup=1.5)`` finds the shape (blocks, MLP width, heads) that runs
that much faster where the user runs it, at the least loss, instead of asking for fractions.

1. **Timing.** Candidate shapes are timed where the model will run (``SpeedTarget.runtime``): each is a model of the
   same class built from the planned config with throw-away weights (nothing is shrunk to time it), against the dense
   config built the same way. In PyTorch (``"torch"``) it runs on the compute device, decode at batch 1 with the KV
   cache and one prefill pass (:func:`~wanda_lightning.core.speed.measure_speed`); in llama.cpp (``"llama.cpp"``) it is
   written as a GGUF of the target's type with a placeholder vocabulary (:func:`~wanda_lightning.gguf.save_gguf`) and
   timed there on the CPU (:func:`~wanda_lightning.llamacpp.speed.time_in_turns`). Each timing keeps the best of
   ``repeats`` runs. For every MLP and head fraction of the grid, depth fractions are tried in increasing order until
   one meets the target (speed grows with each fraction, so the deeper ones would meet it too and lose more). A cost
   model fitted robustly to every one of these runs (:func:`~wanda_lightning.width.cost_model.fit_token_cost`: time
   per token linear in the blocks and parameters kept) then says which shapes meet the target or miss it by less than
   the timing noise (:data:`NEAR_MISS`), by their own run or by the fit; those are timed again in ``rounds`` turns
   with the dense config (a dense timing right before each of theirs; in llama.cpp the two alternate run by run), the
   lightest first (a heavier one only where no lighter one met the target in turns). A shape's speed-up is the median
   of its paired ratios, so one disturbed run decides nothing: neither that a shape is fast enough nor that it is
   not. Pairing keeps the count of runs equal on both sides of every ratio: the best of every dense run of the search
   would be faster than the best of a shape's few by chance alone (on SmolLM2 a shape read 1.39x that way and 1.53x
   in turns).
   **Noise.** The spread of one paired ratio is measured from the turns themselves (pooled over every shape timed
   in turns, on the log scale), and a shape meets the target only when its median clears it by ``margin`` standard
   errors (spread / sqrt(turns)): the search keeps the lightest shape that meets the target, which without a margin
   favours shapes whose readings were lucky. Each candidate also says how sure the turns make it that the shape
   reaches the target (``confidence``: the normal probability of the median's distance to the target in standard
   errors).
2. **Quality.** Among the candidates that meet the target, those not pruned at least as much as another that meets
   it in every dimension are shrunk one at a time, one-shot, on a copy of the model, and scored by their mean
   next-token loss on the calibration batches (lower is better: the estimate costs one ``shrink()`` and one forward
   pass per candidate, and ranks candidates as their perplexity would before recovery).
3. The best is applied to the model with the caller's method and update, and every candidate goes into the report
   (:meth:`~wanda_lightning.width.report.ShrinkReport.candidates_table`, :meth:`~.ShrinkReport.plot`).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.layers import find_pretrained
from ..core.speed import SpeedResult, measure_speed
from ..core.validation import units_to_remove
from .config import ShrinkConfig
from .cost_model import fit_token_cost
from .report import describe_shape
from .speed_target import SpeedTarget

__all__ = ["BROKEN", "NEAR_MISS", "Candidate", "calibration_loss", "search_speedup", "speed_target_record"]


@dataclass
class Candidate:
    """One shape the speed target timed.

    Attributes:
        layers: Depth fraction.
        mlp: MLP fraction.
        heads: Head fraction.
        parameters: Parameters of the shape.
        decode_speedup: Measured decode speed over the dense model's.
        prefill_speedup: Measured prefill speed over the dense model's.
        meets: Whether it reaches the target.
        quality: Mean next-token loss on the calibration batches of the one-shot shrunk model, or ``None`` where it
            was not estimated.
        chosen: Whether it was applied.
        fitted_speedup: The target's speed-up (decode or prefill) the cost model fitted to every first run puts this
            shape at, or ``None`` where too few shapes were timed to fit it. It only decides which shapes are timed
            again; ``meets`` comes from the measured runs.
        runs: How many times the shape was timed (1 + ``rounds`` where it was timed again in turns with the dense
            model, as a possible match).
        paired_speedups: The target's speed-up (decode or prefill) in each turn, against the dense run of that turn;
            empty where the shape was timed once. ``decode_speedup`` and ``prefill_speedup`` are their medians then.
        confidence: How likely the shape reaches the target given its turns and the spread measured over every
            shape's turns (0.5: its median is exactly the target), or ``None`` where the spread was not measured (one
            turn per shape) or the shape was timed once.
        config: The config entries of the shape timed (``num_hidden_layers``, ``intermediate_size``, ...): the widths
            kept, rounded as ``multiple_of`` asks.
    """

    layers: float
    mlp: float
    heads: float
    parameters: int
    decode_speedup: float
    prefill_speedup: float
    meets: bool = False
    quality: float | None = None
    chosen: bool = False
    fitted_speedup: float | None = None
    runs: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    paired_speedups: list[float] = field(default_factory=list)
    confidence: float | None = None

    @property
    def shape(self) -> str:
        """``"layers=0.2 mlp=0.25"`` (the fractions that are not 0)."""
        return describe_shape(self.to_dict())

    def at_most(self, other: Candidate) -> bool:
        """Whether this shape removes no more than ``other`` in every dimension."""
        return self.layers <= other.layers and self.mlp <= other.mlp and self.heads <= other.heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)


#: A shape whose first timing, or the cost model's fit, reached this share of the target is timed again before it is
#: judged: single CPU timings of the same shape vary by 5-20 % on a 2-core machine, and on SmolLM2 one disturbed run
#: (1.497x against 1.5x) kept the width-only shape that recovers best out of the scored set. A wider band re-times
#: more shapes (each costs a dense and a candidate timing).
NEAR_MISS = 0.95


#: A chosen shape whose one-shot calibration perplexity is more than this many times the dense model's is applied with
#: a warning: on SmolLM2-135M the shapes that recovered best at 1.5x decode started at 5-14x the teacher, while a
#: search on a slow machine period met 1.5x only by removing half the blocks, at about 1,600x.
BROKEN = 100.0


def calibration_loss(model: nn.Module, batches: Iterable[Any]) -> float:
    """Mean next-token cross-entropy of a causal LM over ``batches`` (mappings with ``input_ids`` and an optional
    ``attention_mask``, or ``input_ids`` tensors), the tokens whose mask is 0 left out; float32.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2))
        >>> calibration_loss(lm, [torch.randint(0, 16, (2, 5))]) > 0
        True
    """
    total, count = 0.0, 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids, mask = _tokens(batch)
                ids = ids.to(device)
                mask = mask.to(device) if mask is not None else None
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                counted = (mask[:, 1:] if mask is not None else torch.ones_like(ids[:, 1:])).flatten().bool()
                total += float(losses[counted].sum())
                count += int(counted.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _tokens(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), Tensor):
        mask = batch.get("attention_mask")
        return batch["input_ids"], mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
    raise ValueError(
        "`speedup` estimates each candidate's quality from its loss on the calibration batches, which must hold "
        f"`input_ids` (a mapping or a tensor); got {type(batch).__name__}"
    )


Shrinker = Callable[[nn.Module, ShrinkConfig], None]
"""Shrinks a model in place with a configuration (how :func:`search_speedup` makes each candidate it scores)."""


def search_speedup(
    model: nn.Module,
    batches: list[Any],
    config: ShrinkConfig,
    target: SpeedTarget,
    shrinker: Shrinker,
    *,
    device: torch.device | None = None,
    plan_widths: Callable[[ShrinkConfig], dict[str, Any]],
    num_blocks: int,
) -> list[Candidate]:
    """Times the candidate shapes, estimates the quality of the best ones and marks the chosen one.

    Args:
        model: The model (a transformers causal LM, or a module holding one).
        batches: Prepared calibration batches.
        config: The caller's configuration (method, update, options); its fractions are replaced per candidate.
        target: What to reach and the grid.
        shrinker: Shrinks a model in place with a configuration.
        device: Where to time; ``None``: where the model is.
        plan_widths: The config updates a width configuration makes (raises ``ValueError`` where it cannot).
        num_blocks: Blocks in the model's stack.

    Returns:
        Every timed candidate, in the order timed; exactly one has ``chosen``.

    Raises:
        ValueError: When no candidate reaches the target (naming the fastest one's measured speed-up), or the model
            is not a transformers causal LM.
    """
    found = find_pretrained(model)
    if found is None:
        raise ValueError(
            f"`speedup` times candidate models built from a transformers config, and {type(model).__name__} holds "
            "none; pass `layers`, `mlp` and `heads` instead"
        )
    pretrained = found[0]
    parameter = next(pretrained.parameters())
    where = device if device is not None else parameter.device

    def build(updates: dict[str, Any]) -> nn.Module:
        shaped = copy.deepcopy(pretrained.config)
        for name, value in updates.items():
            setattr(shaped, name, value)
        on_device = where if target.runtime == "torch" else torch.device("cpu")  # llama.cpp only reads the file
        return type(pretrained)(shaped).to(device=on_device, dtype=parameter.dtype).eval()

    timings: _Timings = _TorchTimings(build, target) if target.runtime == "torch" else _LlamaCppTimings(build, target)
    load, cores = _load(), _cores()
    if target.runtime == "llama.cpp" and load is not None and load > cores:
        if target.threads != 1:
            warnings.warn(
                f"`speedup`: this machine's load average ({load:.1f}) exceeds its {cores} cores, and llama.cpp's "
                "threads wait for each other at every operation, so each waits for the others to be scheduled "
                "(SmolLM2-135M decoded 2.5 tokens/s on two threads at a load of 10 on 2 cores, 34 on one): the "
                "timings will be slow and spread widely; pass SpeedTarget(threads=1), or time on a quieter machine",
                stacklevel=3,
            )
        else:
            warnings.warn(
                f"`speedup`: this machine's load average ({load:.1f}) exceeds its {cores} cores: the candidates are "
                "timed beside other work, whose bursts the turns and the margin absorb only in part (on SmolLM2-135M "
                "a search at a load of 10 chose a shape that re-timed at 1.37x for a 1.5x target; on a quiet machine "
                "its choice re-timed at 1.60x); time on a quieter machine to trust the choice",
                stacklevel=3,
            )
    try:
        candidates = _time_candidates(timings, pretrained.config, config, target, plan_widths, num_blocks)
    finally:
        timings.close()
    meeting = [c for c in candidates if c.meets]
    if not meeting:
        fastest = max(candidates, key=lambda c: _speedup_of(c, target), default=None)
        what = f"the fastest, {fastest.shape}, measured {_speedup_of(fastest, target):.2f}x" if fastest else "none fit"
        raise ValueError(
            f"`speedup`={target.speedup:g} ({target.on}): no candidate reaches it {_where(target, where)}; {what}; "
            "ask for less, or widen the grid with a SpeedTarget"
        )
    lightest = [c for c in meeting if not any(o is not c and o.at_most(c) for o in meeting)]
    for candidate in lightest:
        trial = copy.deepcopy(model)
        shrinker(trial, replace(config, layers=candidate.layers, mlp=candidate.mlp, heads=candidate.heads))
        found_trial = find_pretrained(trial)
        assert found_trial is not None
        candidate.quality = calibration_loss(found_trial[0], batches)
        del trial
    best = min(lightest, key=lambda c: (c.quality, -_speedup_of(c, target)))
    best.chosen = True
    assert best.quality is not None
    dense_loss = calibration_loss(pretrained, batches)
    if best.quality - dense_loss > math.log(BROKEN):
        warnings.warn(
            f"`speedup`={target.speedup:g}: the most accurate shape that reaches it, {best.shape}, has "
            f"{math.exp(best.quality - dense_loss):.0f}x the dense model's one-shot perplexity on the calibration "
            "data (on SmolLM2-135M the shapes that recovered best started at 5-14x); ask for less, or see "
            "report.candidates_table()",
            stacklevel=3,
        )
    return candidates


Speeds = tuple[float, float]
"""Decode and prefill tokens per second of one timing."""


class _Timings(Protocol):
    """How a search times shapes, given by their config updates (``{}``: the dense config)."""

    def single(self, updates: dict[str, Any]) -> tuple[Speeds, int]:
        """One timing of a shape on its own: its speeds and its parameters."""

    def paired(self, updates: dict[str, Any]) -> Speeds:
        """One turn: the shape's decode and prefill speed-ups over the dense config, timed side by side."""

    def close(self) -> None:
        """Frees what the timings hold."""


class _TorchTimings:
    """PyTorch eager: each timing builds the shape with throw-away weights and measures it; a turn is a dense
    timing, then the shape's."""

    def __init__(self, build: Callable[[dict[str, Any]], nn.Module], target: SpeedTarget) -> None:
        self.build, self.target = build, target

    def single(self, updates: dict[str, Any]) -> tuple[Speeds, int]:
        throwaway = self.build(updates)
        result = measure_speed(
            throwaway,
            new_tokens=cast(int, self.target.new_tokens),
            prefill_batch=self.target.prefill_batch,
            prefill_length=cast(int, self.target.prefill_length),
            repeats=cast(int, self.target.repeats),
        )
        return (result.decode_tokens_per_second, result.prefill_tokens_per_second), result.parameters

    def paired(self, updates: dict[str, Any]) -> Speeds:
        dense, _ = self.single({})
        shape, _ = self.single(updates)
        return shape[0] / dense[0], shape[1] / dense[1]

    def close(self) -> None:
        pass


class _LlamaCppTimings:
    """llama.cpp: each shape is built with throw-away weights once and written as a GGUF of the target's type (kept
    in a temporary folder until the search ends); a turn times the dense file and the shape's file run by run, in
    turns (:func:`~wanda_lightning.llamacpp.speed.time_in_turns`)."""

    def __init__(self, build: Callable[[dict[str, Any]], nn.Module], target: SpeedTarget) -> None:
        from ..llamacpp.runtime import import_llama_cpp

        import_llama_cpp()  # fails with the install hint before anything is written
        self.build, self.target = build, target
        self.folder = tempfile.TemporaryDirectory(prefix="wanda-speed-target-")
        self.files: dict[str, tuple[Path, int]] = {}

    def file(self, updates: dict[str, Any]) -> tuple[Path, int]:
        """The shape's GGUF and its parameters, written on first use."""
        from ..gguf import GGUFType, save_gguf

        key = repr(sorted(updates.items()))
        if key not in self.files:
            throwaway = self.build(updates)
            path = Path(self.folder.name) / f"shape-{len(self.files)}.gguf"
            save_gguf(
                throwaway, path, dtype=cast(GGUFType, self.target.dtype), tokenizer="placeholder", modelfile=False
            )
            self.files[key] = (path, sum(p.numel() for p in throwaway.parameters()))
            del throwaway
        return self.files[key]

    def time(self, paths: dict[str, Path]) -> dict[str, SpeedResult]:
        from ..llamacpp import speed

        return speed.time_in_turns(
            paths,
            repeats=cast(int, self.target.repeats),
            new_tokens=cast(int, self.target.new_tokens),
            prefill_length=cast(int, self.target.prefill_length),
            threads=self.target.threads,
        )

    def single(self, updates: dict[str, Any]) -> tuple[Speeds, int]:
        path, parameters = self.file(updates)
        result = self.time({"shape": path})["shape"]
        return (result.decode_tokens_per_second, result.prefill_tokens_per_second), parameters

    def paired(self, updates: dict[str, Any]) -> Speeds:
        """``repeats`` runs of each file, alternating (dense first in every other pair); the turn's speed-ups are the
        medians of the ratios of each pair of neighbouring runs, so a burst of other work spoils one pair, not the
        turn (on a busy 2-core machine the best run of each of two files read 2.4x for a shape measured at 1.6x)."""
        from ..llamacpp import speed

        def timer(path: Path) -> speed.GGUFTimer:
            return speed.GGUFTimer(
                path,
                new_tokens=cast(int, self.target.new_tokens),
                prefill_length=cast(int, self.target.prefill_length),
                threads=self.target.threads,
            )

        ratios: list[Speeds] = []
        with timer(self.file({})[0]) as dense, timer(self.file(updates)[0]) as shape:
            for run in range(cast(int, self.target.repeats)):
                if run % 2:
                    shape_speeds, dense_speeds = shape.run(), dense.run()
                else:
                    dense_speeds, shape_speeds = dense.run(), shape.run()
                ratios.append((shape_speeds[0] / dense_speeds[0], shape_speeds[1] / dense_speeds[1]))
        return statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)

    def close(self) -> None:
        self.folder.cleanup()


@dataclass
class _Row:
    """One MLP and head fraction of the grid: its widths, and the depth fractions not scanned yet."""

    widths: dict[str, Any]
    depths: list[float]
    last: int | None = None  # the candidate its scan stopped at


def _time_candidates(
    timings: _Timings,
    pretrained_config: Any,
    config: ShrinkConfig,
    target: SpeedTarget,
    plan_widths: Callable[[ShrinkConfig], dict[str, Any]],
    num_blocks: int,
) -> list[Candidate]:
    """The scan over the grid, then the turns (see the module docstring); sets every timing field of the
    candidates."""
    dense, dense_parameters = timings.single({})
    on = 0 if target.on == "decode" else 1  # index of the target's speed in a timing
    candidates: list[Candidate] = []
    speeds: list[Speeds] = []
    shapes: list[dict[str, Any]] = []  # the config updates each candidate was timed with
    rows: list[tuple[float, float, _Row]] = []
    for heads in target.heads:
        for mlp in target.mlp:
            try:
                widths = plan_widths(replace(config, mlp=mlp, heads=heads)) if mlp or heads else {}
            except ValueError:
                continue  # a shape the config cannot hold is no candidate
            rows.append((heads, mlp, _Row(widths, [f for f in target.layers if f or mlp or heads])))

    def scan(heads: float, mlp: float, row: _Row) -> None:
        """Times the row's next depths until one reads as reaching the target (the deeper ones would too)."""
        while row.depths:
            layers = row.depths.pop(0)
            try:
                depth = _depth_updates(pretrained_config, layers, num_blocks)
            except ValueError:
                continue
            if {**row.widths, **depth} in shapes:
                continue  # fractions that round to a shape already timed (``multiple_of``)
            speed, parameters = timings.single({**row.widths, **depth})
            kept = _kept(row.widths, depth)
            candidates.append(Candidate(layers, mlp, heads, parameters, 0.0, 0.0, config=kept))
            speeds.append(speed)
            shapes.append({**row.widths, **depth})
            row.last = len(candidates) - 1
            if speed[on] / dense[on] >= target.speedup:
                return

    for heads, mlp, row in rows:
        scan(heads, mlp, row)
    # Shapes are timed again, in turns with the dense model, where either their first run or the cost model fitted to
    # every run says they meet the target or miss it by less than the noise. The lightest such shapes go first; a
    # heavier one is timed again only where no lighter one timed again met it (with the margin the noise asks). Where
    # the shape a row's scan stopped at fails in turns, the row's scan goes on to its next depth.
    turns: list[list[Speeds]] = []  # per shape, its (decode, prefill) ratios in turns
    while True:
        turns += [[] for _ in range(len(candidates) - len(turns))]
        blocks = [num_blocks - _removed_blocks(c.layers, num_blocks) for c in candidates]
        fitted = _fitted_speedups(blocks, candidates, speeds, num_blocks, (*dense, dense_parameters), on)
        worth = [
            i
            for i, speed in enumerate(speeds)
            if max(speed[on] / dense[on], fitted[i] if fitted is not None else 0.0) >= target.speedup * NEAR_MISS
        ]
        spread = _spread([[t[on] for t in ratios] for ratios in turns])
        met = [i for i, ratios in enumerate(turns) if ratios and _clears([t[on] for t in ratios], spread, target)]
        pending = [i for i in worth if not turns[i] and not any(candidates[j].at_most(candidates[i]) for j in met)]
        first_in_line = [
            i for i in pending if not any(j != i and candidates[j].at_most(candidates[i]) for j in pending)
        ]
        if first_in_line:
            for index in first_in_line:
                for _ in range(target.rounds):
                    turns[index].append(timings.paired(shapes[index]))
                candidates[index].runs += target.rounds
            continue
        stalled = [
            (heads, mlp, row)
            for heads, mlp, row in rows
            if row.depths
            and row.last is not None
            and turns[row.last]
            and row.last not in met
            and not any(candidates[j].at_most(candidates[row.last]) for j in met)
        ]
        if not stalled:
            break
        for heads, mlp, row in stalled:
            scan(heads, mlp, row)
    for index, candidate in enumerate(candidates):
        candidate.fitted_speedup = fitted[index] if fitted is not None else None
        speed, ratios = speeds[index], turns[index]
        if not ratios:
            candidate.decode_speedup, candidate.prefill_speedup = speed[0] / dense[0], speed[1] / dense[1]
            candidate.meets = _speedup_of(candidate, target) >= target.speedup
            continue
        candidate.decode_speedup = statistics.median(t[0] for t in ratios)
        candidate.prefill_speedup = statistics.median(t[1] for t in ratios)
        candidate.paired_speedups = [t[on] for t in ratios]
        candidate.meets = _clears(candidate.paired_speedups, spread, target)
        if spread is not None and spread > 0:
            error = spread / math.sqrt(len(ratios))
            distance = math.log(_speedup_of(candidate, target) / target.speedup) / error
            candidate.confidence = 0.5 * (1.0 + math.erf(distance / math.sqrt(2.0)))
        elif spread is not None:
            candidate.confidence = 1.0 if candidate.meets else 0.0
    return candidates


def _spread(ratios: list[list[float]]) -> float | None:
    """The standard deviation of one paired ratio on the log scale, pooled over every shape timed in more than one
    turn (each about its own mean), or ``None`` where none was."""
    squares, freedom = 0.0, 0
    for readings in ratios:
        if len(readings) > 1:
            logs = [math.log(r) for r in readings]
            mean = sum(logs) / len(logs)
            squares += sum((x - mean) ** 2 for x in logs)
            freedom += len(logs) - 1
    return math.sqrt(squares / freedom) if freedom else None


def _clears(ratios: list[float], spread: float | None, target: SpeedTarget) -> bool:
    """Whether the median of a shape's paired ratios reaches the target with ``target.margin`` standard errors to
    spare (the median alone where the spread is unknown)."""
    error = spread / math.sqrt(len(ratios)) if spread is not None else 0.0
    return statistics.median(ratios) >= target.speedup * math.exp(target.margin * error)


def _load() -> float | None:
    """The one-minute load average, where the system reports one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _where(target: SpeedTarget, device: Any) -> str:
    return f"in llama.cpp ({target.dtype}, CPU)" if target.runtime == "llama.cpp" else f"on {device}"


def speed_target_record(target: SpeedTarget, candidates: list[Candidate], device: Any) -> dict[str, Any]:
    """What the report keeps of a speed target: ``speedup``, ``on``, ``device`` (where the candidates ran),
    ``runtime``, ``dtype`` (the GGUF type in llama.cpp, else ``None``), ``threads`` (llama.cpp's; ``None``: one per
    core), ``rounds``, ``margin`` and ``spread`` (the measured standard deviation of one paired ratio on the log
    scale, or ``None``).

    Example::

        >>> speed_target_record(SpeedTarget(1.5), [], "cpu")["device"]
        'cpu'
    """
    spread = _spread([c.paired_speedups for c in candidates])
    threads = f"{target.threads} thread{'s' if target.threads != 1 else ''}" if target.threads else "a thread per core"
    where = f"llama.cpp {target.dtype} (CPU, {threads})" if target.runtime == "llama.cpp" else str(device)
    return {
        "speedup": target.speedup,
        "on": target.on,
        "device": where,
        "runtime": target.runtime,
        "dtype": target.dtype,
        "threads": target.threads,
        "rounds": target.rounds,
        "margin": target.margin,
        "spread": spread,
    }


def _fitted_speedups(
    blocks: list[int],
    candidates: list[Candidate],
    speeds: list[tuple[float, float]],
    num_blocks: int,
    dense: tuple[float, float, int],
    on: int,
) -> list[float] | None:
    """Each candidate's speed-up by the cost model fitted to all first runs and the dense one (``None``: too few)."""
    if len(candidates) < 3:
        return None
    cost = fit_token_cost(
        [num_blocks, *blocks],
        [dense[2], *(c.parameters for c in candidates)],
        [1.0 / dense[on], *(1.0 / speed[on] for speed in speeds)],
    )
    dense_cost = cost(num_blocks, dense[2])
    return [dense_cost / max(cost(b, c.parameters), 1e-12) for b, c in zip(blocks, candidates, strict=True)]


def _kept(widths: dict[str, Any], depth: dict[str, Any]) -> dict[str, Any]:
    """The shape's config entries that count (``layer_types`` and ``head_dim`` follow from them)."""
    return {k: v for k, v in {**widths, **depth}.items() if k not in ("layer_types", "head_dim")}


def _removed_blocks(fraction: float, num_blocks: int) -> int:
    return units_to_remove(fraction, num_blocks, "layers", "the block stack", "block") if fraction else 0


def _speedup_of(candidate: Candidate, target: SpeedTarget) -> float:
    return candidate.decode_speedup if target.on == "decode" else candidate.prefill_speedup


def _depth_updates(config: Any, fraction: float, num_blocks: int) -> dict[str, Any]:
    """The config entries of a model ``fraction`` of whose blocks are gone (which ones does not change the timing)."""
    if not fraction:
        return {}
    kept = num_blocks - _removed_blocks(fraction, num_blocks)
    updates: dict[str, Any] = {"num_hidden_layers": kept}
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)):
        updates["layer_types"] = list(types)[:kept]
    return updates
