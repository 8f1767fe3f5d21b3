"""What a model costs to run where you run it: decode and prefill tokens per second and peak memory.

Decode is ``generate`` with the key/value cache, greedy, a fixed number of new tokens (batch ``batch_size``); prefill
is one forward pass over ``prefill_batch x prefill_length`` tokens without a cache. Each is timed after a warm-up, the
best of ``repeats`` runs (the least disturbed by other work on the machine). Peak memory is the CUDA allocator's peak
on a GPU; on the CPU, the growth of the process's resident set while the model runs, sampled every millisecond
(weights already resident are not counted; their size is reported apart).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from torch import nn

__all__ = ["SpeedResult", "measure_speed", "weight_bytes"]


@dataclass
class SpeedResult:
    """One model's speed.

    Attributes:
        name: What the model is called in tables.
        parameters: Its parameters (tied ones once).
        weight_bytes: Bytes of its parameters and buffers.
        decode_tokens_per_second: New tokens per second of ``generate`` (all sequences of the batch together).
        prefill_tokens_per_second: Prompt tokens per second of one forward pass.
        peak_memory_bytes: Peak memory while running (see the module docstring), or ``None`` when unmeasured.
        device: Where it ran.
        batch_size: Sequences decoded together.
        new_tokens: Tokens generated per sequence.
        prefill_shape: ``(batch, length)`` of the prefill pass.
        runtime: What ran it: ``"torch"`` (PyTorch eager, this module) or ``"llama.cpp"``
            (:mod:`wanda_lightning.llamacpp.speed`).
        dtype: The weights' type as run: a torch dtype name (``"float32"``) or a GGUF type (``"q8_0"``); ``None`` where
            unknown.
        file_bytes: Size of the file that ran (a GGUF), or ``None`` for an in-memory model.
    """

    name: str
    parameters: int
    weight_bytes: int
    decode_tokens_per_second: float
    prefill_tokens_per_second: float
    peak_memory_bytes: int | None
    device: str
    batch_size: int
    new_tokens: int
    prefill_shape: tuple[int, int]
    runtime: str = "torch"
    dtype: str | None = None
    file_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {**asdict(self), "prefill_shape": list(self.prefill_shape)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (tied ones once).

    Example::

        >>> weight_bytes(nn.Linear(2, 2))
        24
    """
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _resident_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def _peak_memory(device: torch.device) -> Iterator[list[int | None]]:
    """Yields a one-element list that holds the peak memory (bytes above the start) once the block ends."""
    result: list[int | None] = [None]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result[0] = torch.cuda.max_memory_allocated(device) - start
        return
    if not os.path.exists(f"/proc/{os.getpid()}/statm"):  # pragma: no cover - not Linux
        yield result
        return
    start = _resident_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _resident_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result[0] = max(peak[0], _resident_bytes()) - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(
    model: nn.Module,
    *,
    name: str = "model",
    batch_size: int = 1,
    new_tokens: int = 128,
    prompt_length: int = 16,
    prefill_batch: int = 4,
    prefill_length: int = 256,
    repeats: int = 3,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> SpeedResult:
    """Times decoding and prefill of a causal LM (see the module docstring).

    The model runs where it is unless ``device`` is given (then it is moved there and back). Prompts are random
    token ids (speed does not depend on them); generation is greedy and never stops early.

    Args:
        model: A transformers causal LM (with ``generate`` and ``config.vocab_size``).
        name: Its name in the result.
        batch_size: Sequences decoded together.
        new_tokens: Tokens generated per sequence.
        prompt_length: Prompt tokens per sequence before decoding.
        prefill_batch: Sequences in the prefill pass.
        prefill_length: Tokens per sequence in the prefill pass.
        repeats: Timed runs of each (the best is kept), after one warm-up.
        device: Where to run; ``None``: where the model is.
        seed: Seed of the random prompts.

    Example::

        result = measure_speed(model, name="shrunk", batch_size=1)
        print(result.decode_tokens_per_second)
    """
    runner = cast(Any, model)  # a transformers model: generate() and keyword inputs
    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab <= 0:
        raise ValueError(f"{type(model).__name__} has no `config.vocab_size`: measure_speed needs a causal LM")
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch_size, prompt_length), generator=generator).to(target)
    prefill = torch.randint(0, vocab, (prefill_batch, prefill_length), generator=generator).to(target)
    was_training = model.training
    model.eval()
    if target != home:
        model.to(target)
    options: dict[str, Any] = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(prompt)
    )
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        options["pad_token_id"] = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or 0
    try:
        with _peak_memory(target) as peak:
            runner.generate(prompt, **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            runner(input_ids=prefill[:, : min(prefill_length, 32)])
            decode = prefill_seconds = float("inf")
            for _ in range(max(repeats, 1)):
                _sync(target)
                start = time.perf_counter()
                runner.generate(prompt, **options)
                _sync(target)
                decode = min(decode, time.perf_counter() - start)
                start = time.perf_counter()
                runner(input_ids=prefill, use_cache=False)
                _sync(target)
                prefill_seconds = min(prefill_seconds, time.perf_counter() - start)
    finally:
        if target != home:
            model.to(home)
        model.train(was_training)
    return SpeedResult(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        weight_bytes=weight_bytes(model),
        decode_tokens_per_second=batch_size * new_tokens / decode,
        prefill_tokens_per_second=prefill_batch * prefill_length / prefill_seconds,
        peak_memory_bytes=peak[0],
        device=str(target),
        batch_size=batch_size,
        new_tokens=new_tokens,
        prefill_shape=(prefill_batch, prefill_length),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
