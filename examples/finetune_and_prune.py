"""Fine-tune SmolLM2-135M with Lightning for a few steps, prune it with WandaPruningCallback, save it. Offline.

The same job as ``wanda-lightning demo``, written out:

    python examples/finetune_and_prune.py --out wanda-demo

``--smoke`` runs it at a tiny size (one step on 64-token windows), as CI does.

The callback calibrates on 16 training-split windows after the last step, measures the module's ``val_loss`` and
``val_ppl`` before and after pruning, logs sparsity and the deltas to the CSV logger, and prints a summary table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from wanda_lightning import WandaPruningCallback
from wanda_lightning.cli.demo import WindowDataset
from wanda_lightning.core.options import CalibrationOptions
from wanda_lightning.data.corpus import pydoc_text, token_windows
from wanda_lightning.data.smollm2 import load_smollm2
from wanda_lightning.lightning.module import CausalLMModule


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("wanda-demo"))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a tiny run: one step on 64-token windows")
    args = parser.parse_args(argv)
    seqlen, num_calibration, num_validation = (64, 4, 1) if args.smoke else (256, 16, 8)
    if args.smoke:
        args.steps = 1
    pl.seed_everything(0)

    # Data: CPython's help topics, tokenised once; the first 70 % for calibration and fine-tuning, the rest held out.
    model, tokenizer = load_smollm2()
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    cut = int(ids.numel() * 0.7)
    windows = token_windows(ids[:cut], seqlen)  # (N, seqlen)
    calibration, train = windows[:num_calibration], windows[num_calibration:]
    validation = token_windows(ids[cut:], seqlen, num_validation)

    # The model: a LightningModule whose validation_step logs val_loss and val_ppl (wanda_lightning.lightning.metrics).
    model.train()
    module = CausalLMModule(model, learning_rate=5e-5)

    # Pruning: one line in the Trainer. prune_on="fit_end" prunes after the last training step.
    pruning = WandaPruningCallback(
        sparsity=args.sparsity,
        calibration=DataLoader(WindowDataset(calibration), batch_size=4),
        calibration_options=CalibrationOptions(num_samples=num_calibration),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        logger=CSVLogger(args.out, name="logs"),
        log_every_n_steps=1,
        callbacks=[pruning],
    )
    trainer.fit(
        module,
        DataLoader(WindowDataset(train), batch_size=4, shuffle=True),
        DataLoader(WindowDataset(validation), batch_size=4),
    )

    # The weights are zero under their own names: this checkpoint loads anywhere, without the callback.
    trainer.save_checkpoint(args.out / "pruned.ckpt", weights_only=True)
    ppl = pruning.metrics["val_ppl"]
    print(f"held-out perplexity: dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f}")
    print(f"sparsity of the pruned layers: {pruning.global_sparsity:.2%}")
    print(f"pruned checkpoint: {args.out / 'pruned.ckpt'}")
    # CausalLMModule.load_from_checkpoint(args.out / "pruned.ckpt", model=load_smollm2()[0]) gives the pruned model.


if __name__ == "__main__":
    main()
