"""Tokens per second in llama.cpp, where users run small models, and one ``measure_speed`` for both runtimes.

How a GGUF is timed (:class:`GGUFTimer`), on the CPU with one thread per core:

- **Decode** (batch 1): a ``prompt_length``-token prompt is evaluated, then ``new_tokens`` single-token evaluations
  follow, each reading the key/value cache of all before it, as generation does. Only the single-token evaluations
  are timed: decode tokens/s is ``new_tokens`` over their time.
- **Prefill**: one evaluation of ``prefill_length`` tokens from an empty cache, the last token's logits computed.

Tokens are random ids of a fixed seed (speed does not depend on them, so no sampling is timed). A model is warmed up
once when loaded; each timed run does both measurements, and the best of ``repeats`` runs is kept (the least disturbed
by other work on the machine). Several GGUFs are timed in turns (:func:`time_in_turns`): all are loaded, then each
turn runs every model once, starting one model later each turn, so that a slow spell of a shared machine falls on all
of them, and ratios between them compare like with like.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import torch
from torch import nn

from ..core.speed import SpeedResult
from ..core.speed import measure_speed as measure_torch_speed
from .runtime import default_threads, import_llama_cpp, load_gguf

__all__ = ["RUNTIMES", "GGUFTimer", "measure_gguf_speed", "measure_speed", "temporary_gguf", "time_in_turns"]

#: Runtimes :func:`measure_speed` times in.
RUNTIMES: tuple[str, ...] = ("torch", "llama.cpp")

# `general.file_type` values (llama.cpp's `llama_ftype`) of the types this library writes, and a few more.
_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 32: "bf16"}


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


class GGUFTimer:
    """One GGUF loaded in llama.cpp and warmed up, timed one run at a time (see the module docstring).

    Args:
        path: The GGUF file.
        new_tokens: Single-token evaluations timed per decode run.
        prompt_length: Prompt tokens evaluated (untimed) before them.
        prefill_length: Tokens in the timed prefill evaluation.
        threads: llama.cpp threads; ``None``: one per core.
        seed: Seed of the random token ids.

    Raises:
        ModuleNotFoundError: If llama-cpp-python is not installed.
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If a count is not a positive integer, or llama.cpp cannot load the file.

    Example::

        with GGUFTimer("small.q8_0.gguf") as timer:
            decode, prefill = timer.run()
            result = timer.result("small", decode, prefill)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        new_tokens: int = 128,
        prompt_length: int = 64,
        prefill_length: int = 256,
        threads: int | None = None,
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.new_tokens = _positive("new_tokens", new_tokens)
        self.prompt_length = _positive("prompt_length", prompt_length)
        self.prefill_length = _positive("prefill_length", prefill_length)
        self.threads = default_threads() if threads is None else _positive("threads", threads)
        context = max(prompt_length + new_tokens, prefill_length)
        self.llama = load_gguf(
            path, n_ctx=context, threads=self.threads, batch=max(prompt_length, prefill_length, 1), logits_all=False
        )
        vocab = int(self.llama.n_vocab())
        generator = torch.Generator().manual_seed(seed)
        self._prompt = torch.randint(0, vocab, (prompt_length,), generator=generator).tolist()
        self._decoded = torch.randint(0, vocab, (new_tokens,), generator=generator).tolist()
        self._prefill = torch.randint(0, vocab, (prefill_length,), generator=generator).tolist()
        self._decode(min(new_tokens, 4))  # warm-up: llama.cpp sizes its buffers on the first evaluations
        self._prefill_seconds()

    def _decode(self, count: int) -> float:
        self.llama.reset()
        self.llama.eval(self._prompt)
        start = time.perf_counter()
        for token in self._decoded[:count]:
            self.llama.eval([token])
        return time.perf_counter() - start

    def _prefill_seconds(self) -> float:
        self.llama.reset()
        start = time.perf_counter()
        self.llama.eval(self._prefill)
        return time.perf_counter() - start

    def run(self) -> tuple[float, float]:
        """One timed run: ``(decode tokens/s, prefill tokens/s)``."""
        decode = self.new_tokens / self._decode(self.new_tokens)
        prefill = self.prefill_length / self._prefill_seconds()
        return decode, prefill

    def result(self, name: str, decode: float, prefill: float) -> SpeedResult:
        """A :class:`~wanda_lightning.core.speed.SpeedResult` of this file with the given speeds.

        ``parameters`` and ``weight_bytes`` are llama.cpp's counts of the model's tensors (quantized bytes);
        ``file_bytes`` is the file's size; ``dtype`` is the file's ``general.file_type`` (``None`` if absent).
        """
        model = getattr(self.llama, "_model", None)
        file_type = getattr(self.llama, "metadata", {}).get("general.file_type")
        return SpeedResult(
            name=name,
            parameters=int(model.n_params()) if model is not None else 0,
            weight_bytes=int(model.size()) if model is not None else self.path.stat().st_size,
            decode_tokens_per_second=decode,
            prefill_tokens_per_second=prefill,
            peak_memory_bytes=None,
            device=f"cpu ({self.threads} threads)",
            batch_size=1,
            new_tokens=self.new_tokens,
            prefill_shape=(1, self.prefill_length),
            runtime="llama.cpp",
            dtype=_FILE_TYPES.get(int(file_type)) if file_type is not None and str(file_type).isdigit() else None,
            file_bytes=self.path.stat().st_size,
        )

    def close(self) -> None:
        """Frees the model."""
        self.llama.close()

    def __enter__(self) -> GGUFTimer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


@contextmanager
def temporary_gguf(model: nn.Module, dtype: str = "q8_0", tokenizer: Any = "placeholder") -> Iterator[Path]:
    """Writes ``model`` to a GGUF in a temporary folder, yields its path and deletes the folder afterwards.

    Args:
        model: A model :func:`wanda_lightning.gguf.save_gguf` writes.
        dtype: GGUF type of its weights.
        tokenizer: As for ``save_gguf``; the default ``"placeholder"`` writes a dummy vocabulary of the model's size,
            enough for timing (and for perplexity on token ids).

    Example::

        with temporary_gguf(model, "q8_0") as path:
            print(measure_gguf_speed(path).decode_tokens_per_second)
    """
    from ..gguf import save_gguf

    with tempfile.TemporaryDirectory(prefix="wanda-gguf-") as folder:
        path = Path(folder) / "model.gguf"
        save_gguf(model, path, dtype=cast(Any, dtype), tokenizer=tokenizer, modelfile=False)
        yield path


def time_in_turns(
    models: Mapping[str, str | os.PathLike[str] | nn.Module],
    *,
    repeats: int = 5,
    dtype: str = "q8_0",
    new_tokens: int = 128,
    prompt_length: int = 64,
    prefill_length: int = 256,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, SpeedResult]:
    """Times several models in llama.cpp in turns and keeps each one's best run (see the module docstring).

    Args:
        models: Name to GGUF path, or to a model, which is written to a temporary GGUF of type ``dtype`` with a
            placeholder vocabulary first.
        repeats: Turns; every model runs once per turn.
        dtype: GGUF type of the models given as modules (paths are timed as they are).
        new_tokens: Single-token evaluations timed per decode run.
        prompt_length: Prompt tokens evaluated (untimed) before them.
        prefill_length: Tokens in the timed prefill evaluation.
        threads: llama.cpp threads; ``None``: one per core.
        seed: Seed of the random token ids (the same tokens for every model whose vocabulary has the same size).

    Returns:
        Name to result, in the order given; ``runtime`` is ``"llama.cpp"``.

    Raises:
        ModuleNotFoundError: If llama-cpp-python is not installed.
        ValueError: If ``models`` is empty or a count is not a positive integer.

    Example::

        speeds = time_in_turns({"dense": "dense.gguf", "small": "small.gguf"}, repeats=5)
        ratio = speeds["small"].decode_tokens_per_second / speeds["dense"].decode_tokens_per_second
    """
    if not models:
        raise ValueError("`models` must name at least one GGUF path or model to time, got none")
    _positive("repeats", repeats)
    for name, value in (
        ("new_tokens", new_tokens),
        ("prompt_length", prompt_length),
        ("prefill_length", prefill_length),
    ):
        _positive(name, value)
    import_llama_cpp()  # fails before any model is written
    options = dict(new_tokens=new_tokens, prompt_length=prompt_length, prefill_length=prefill_length, seed=seed)
    best: dict[str, tuple[float, float]] = {name: (0.0, 0.0) for name in models}
    with ExitStack() as stack:
        timers: dict[str, GGUFTimer] = {}
        for name, model in models.items():
            path = stack.enter_context(temporary_gguf(model, dtype)) if isinstance(model, nn.Module) else model
            timers[name] = stack.enter_context(GGUFTimer(path, threads=threads, **options))
        names = list(timers)
        for turn in range(repeats):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                decode, prefill = timers[name].run()
                best[name] = (max(best[name][0], decode), max(best[name][1], prefill))
        return {name: timers[name].result(name, *best[name]) for name in names}


def measure_gguf_speed(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    repeats: int = 3,
    new_tokens: int = 128,
    prompt_length: int = 64,
    prefill_length: int = 256,
    threads: int | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Decode and prefill tokens per second of one GGUF file in llama.cpp, best of ``repeats`` runs.

    Args:
        path: The GGUF file.
        name: Its name in the result; ``None``: the file name.
        repeats: Timed runs (after one warm-up).
        new_tokens: Single-token evaluations timed per decode run.
        prompt_length: Prompt tokens evaluated (untimed) before them.
        prefill_length: Tokens in the timed prefill evaluation.
        threads: llama.cpp threads; ``None``: one per core.
        seed: Seed of the random token ids.

    Example::

        result = measure_gguf_speed("small.q8_0.gguf")
        print(result.decode_tokens_per_second, result.file_bytes)
    """
    label = Path(path).name if name is None else name
    return time_in_turns(
        {label: path},
        repeats=repeats,
        new_tokens=new_tokens,
        prompt_length=prompt_length,
        prefill_length=prefill_length,
        threads=threads,
        seed=seed,
    )[label]


def measure_speed(
    model: nn.Module,
    *,
    runtime: str = "torch",
    dtype: str | None = None,
    name: str = "model",
    batch_size: int = 1,
    new_tokens: int = 128,
    prompt_length: int | None = None,
    prefill_batch: int | None = None,
    prefill_length: int = 256,
    repeats: int = 3,
    device: str | torch.device | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Decode and prefill tokens per second of a causal LM in PyTorch eager or in llama.cpp.

    ``runtime="torch"`` is :func:`wanda_lightning.core.speed.measure_speed` (``generate`` with the KV cache, where the
    model is or on ``device``, in the model's own dtype). ``runtime="llama.cpp"`` writes the model to a temporary GGUF
    of type ``dtype`` (default ``"q8_0"``; a placeholder vocabulary: token ids are all timing needs) and times it there
    at batch 1, on the CPU, one thread per core (see the module docstring). The model is left as it was.

    Args:
        model: A transformers causal LM (for llama.cpp: a family :func:`wanda_lightning.gguf.save_gguf` writes).
        runtime: ``"torch"`` or ``"llama.cpp"``.
        dtype: GGUF type for llama.cpp (``"f32"``, ``"f16"``, ``"bf16"``, ``"q8_0"``, ``"q4_0"``); must be ``None``
            for torch, which runs the model in its own dtype.
        name: Its name in the result.
        batch_size: Sequences decoded together (llama.cpp: 1 only).
        new_tokens: Tokens generated per sequence.
        prompt_length: Prompt tokens before decoding; ``None``: 16 in torch, 64 in llama.cpp.
        prefill_batch: Sequences in the prefill pass; ``None``: 4 in torch, 1 in llama.cpp (1 only).
        prefill_length: Tokens per sequence in the prefill pass.
        repeats: Timed runs (the best is kept), after one warm-up.
        device: Where torch runs it; llama.cpp runs on the CPU (``None`` or ``"cpu"`` only).
        threads: llama.cpp threads (``None``: one per core); torch uses its own setting (``None`` only).
        seed: Seed of the random prompts.

    Returns:
        A :class:`~wanda_lightning.core.speed.SpeedResult` whose ``runtime`` says where it ran; from llama.cpp,
        ``dtype`` is the GGUF type and ``file_bytes`` the GGUF's size.

    Raises:
        ValueError: An unknown ``runtime``, or an argument the chosen runtime does not take (checked before anything
            runs or is written); from ``save_gguf``, a family or ``dtype`` it cannot write.
        ModuleNotFoundError: For llama.cpp, if llama-cpp-python is not installed.

    Example::

        eager = measure_speed(model, name="shrunk")
        there = measure_speed(model, runtime="llama.cpp", dtype="q8_0", name="shrunk")
        print(there.decode_tokens_per_second / eager.decode_tokens_per_second)
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"`runtime` must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        for argument, value in (("dtype", dtype), ("threads", threads)):
            if value is not None:
                raise ValueError(
                    f"`{argument}`={value!r} applies to runtime='llama.cpp'; runtime='torch' runs the model as it is "
                    "(leave it None)"
                )
        return measure_torch_speed(
            model,
            name=name,
            batch_size=batch_size,
            new_tokens=new_tokens,
            prompt_length=16 if prompt_length is None else prompt_length,
            prefill_batch=4 if prefill_batch is None else prefill_batch,
            prefill_length=prefill_length,
            repeats=repeats,
            device=device,
            seed=seed,
        )
    if batch_size != 1 or prefill_batch not in (None, 1):
        raise ValueError(
            f"runtime='llama.cpp' times batch 1 only: `batch_size` and `prefill_batch` must be 1, got {batch_size!r} "
            f"and {prefill_batch!r}"
        )
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"runtime='llama.cpp' runs on the CPU: `device` must be None or 'cpu', got {device!r}")
    for argument, count in (("new_tokens", new_tokens), ("prefill_length", prefill_length), ("repeats", repeats)):
        _positive(argument, count)
    if prompt_length is not None:
        _positive("prompt_length", prompt_length)
    if threads is not None:
        _positive("threads", threads)
    return time_in_turns(
        {name: model},
        repeats=repeats,
        dtype="q8_0" if dtype is None else dtype,
        new_tokens=new_tokens,
        prompt_length=64 if prompt_length is None else prompt_length,
        prefill_length=prefill_length,
        threads=threads,
        seed=seed,
    )[name]
