"""Shared helpers for the benchmark scripts: memory readings, table printing, and training on token windows."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from wanda_lightning.cli.demo import WindowDataset
from wanda_lightning.core.speed import measure_speed


def reset_peak_rss() -> None:
    """Resets the kernel's resident-set high-water mark for this process (Linux; no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def read_rss_mib(field: str = "VmHWM") -> float:
    """Current (``VmRSS``) or peak-since-reset (``VmHWM``) resident set size in MiB; NaN where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    line = "  ".join(
        str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=False))
    )
    print(line)
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(
            "  ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=False))
            )
        )


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {path}")


def fit_windows(module: pl.LightningModule, windows: torch.Tensor, steps: int, callbacks: list[pl.Callback]) -> float:
    """``steps`` optimizer steps on ``windows`` in order, 4 per batch, on the CPU, seeded, without logging or
    validation; returns the seconds ``fit`` took."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, DataLoader(WindowDataset(windows), batch_size=4, shuffle=False))
    return time.perf_counter() - start


def speeds_in_turns(models: dict[str, torch.nn.Module], repeats: int) -> dict[str, dict[str, float]]:
    """Best decode and prefill tokens per second of each model, the models timed in turns ``repeats`` times, so that
    a slow spell of the machine falls on all of them rather than on one."""
    best: dict[str, dict[str, float]] = {name: {} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            result = measure_speed(model, name=name, repeats=1)
            for key in ("decode_tokens_per_second", "prefill_tokens_per_second"):
                best[name][key] = max(best[name].get(key, 0.0), getattr(result, key))
    return best
