"""Train a small vision transformer built on ``torch.nn.MultiheadAttention`` on scikit-learn's handwritten digits, then
prune it with WandaPruningCallback and read the accuracy delta in the summary. Offline (the digits ship with
scikit-learn: 1,797 images of 8 x 8 pixels, 10 classes).

    python examples/attention_classifier.py [--sparsity 0.5] [--epochs 12] [--schedule]

``--smoke`` runs it at a tiny size (one epoch of 4 batches), as CI does.

The LightningModule has no ``forward``: the callback calibrates through its ``validation_step``. The attention's packed
``in_proj_weight`` (query, key and value thirds, each from its own input) and ``out_proj`` (from the attention output
before the projection) are pruned like the MLP's linear layers. With ``--schedule`` the sparsity rises gradually over
the last epochs instead of all at once after training.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from wanda_lightning import Schedule, WandaPruningCallback
from wanda_lightning.core.options import CalibrationOptions


class DigitsTransformer(pl.LightningModule):
    """8 x 8 images as 16 patches of 2 x 2 pixels plus a class token, through ``nn.TransformerEncoder`` layers."""

    def __init__(self, width: int = 64, heads: int = 4, layers: int = 3, learning_rate: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.patches = nn.Linear(4, width)  # one 2 x 2 patch -> a token
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.positions = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def logits(self, images: Tensor) -> Tensor:
        patches = images.unfold(1, 2, 2).unfold(2, 2, 2).reshape(images.shape[0], 16, 4)  # (B, 16, 4)
        tokens = torch.cat([self.class_token.expand(images.shape[0], -1, -1), self.patches(patches)], dim=1)
        return self.head(self.encoder(tokens + self.positions)[:, 0])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.logits(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        logits = self.logits(batch[0])
        self.val_acc.update(logits, batch[1])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.learning_rate)


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as (images scaled to [0, 1], labels); a fixed 80 / 20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, val = order[:cut], order[cut:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def main(argv: list[str] | None = None) -> WandaPruningCallback:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--schedule", action="store_true", help="prune gradually over the last half of training")
    parser.add_argument("--smoke", action="store_true", help="a tiny run: one epoch of 4 batches")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    pl.seed_everything(0, verbose=False)

    train, val = digits()
    train_loader = DataLoader(train, batch_size=64, shuffle=True)
    val_loader = DataLoader(val, batch_size=128)
    steps = args.epochs * len(train_loader)
    prune_on: Schedule | str = "fit_end"
    if args.schedule:
        prune_on = Schedule(end_step=steps - len(train_loader), start_step=steps // 2, every_n_steps=10)
    # Calibration on 128 validation images (the default source), through validation_step: the module has no forward.
    # The patch embedding (4 inputs per row) and the classifier head stay dense.
    pruning = WandaPruningCallback(
        sparsity=args.sparsity,
        calibration_options=CalibrationOptions(num_samples=128),
        ignore=["patches", "head"],
        prune_on=prune_on,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        limit_train_batches=4 if args.smoke else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[pruning],
    )
    trainer.fit(DigitsTransformer(), train_loader, val_loader)
    accuracy = pruning.metrics["val_acc"]
    print(f"validation accuracy: dense {accuracy['dense']:.2%} -> pruned {accuracy['pruned']:.2%}")
    print(f"sparsity of the pruned weights: {pruning.global_sparsity:.2%} ({len(pruning.masks)} parameters)")
    return pruning


if __name__ == "__main__":
    main()
