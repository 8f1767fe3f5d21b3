"""The callback on a LightningModule without ``forward`` (calibration through its steps, their logging thrown away) and
its numbers in ``trainer.callback_metrics`` for ``ModelCheckpoint`` / ``EarlyStopping``."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers.trainer import logged, make_trainer, read_csv
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from wanda_lightning import AfterEpoch, CalibrationOptions, WandaPruningCallback, prune
from wanda_lightning.core.targets import find_targets, parameter_masks


class NoForward(pl.LightningModule):
    """A sequence classifier on nn.TransformerEncoder that does everything in its steps (no ``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)
        self.val_acc = MulticlassAccuracy(num_classes=4, average="micro")
        self.calls: Counter[str] = Counter()

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.calls["training_step"] += 1
        loss = F.cross_entropy(self.logits(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.calls["validation_step"] += 1
        logits = self.logits(batch[0])
        self.val_acc.update(logits, batch[1])
        self.log("val_acc", self.val_acc)
        self.log("val_loss", F.cross_entropy(logits, batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def sequences(count: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(count, 6, 16, generator=generator), torch.randint(0, 4, (count,), generator=generator)
    )
    return DataLoader(data, batch_size=4)


def expected_masks(module: NoForward, loader: DataLoader, **kwargs: Any) -> dict[str, Tensor]:
    """The core prune() of a copy, calibrated through ``logits`` (what the steps run), as masks by parameter name."""
    by_layer: dict[str, Tensor] = {}
    reference = copy.deepcopy(module)
    batches = list(loader)
    prune(
        reference,
        batches,
        forward_fn=lambda m, b: m.logits(b[0]),
        on_layer_pruned=lambda n, k: by_layer.__setitem__(n, k),
        **kwargs,
    )
    return parameter_masks(find_targets(reference)[0], by_layer)


def accuracy(module: NoForward, loader: DataLoader) -> float:
    with torch.no_grad():
        hits = sum(int((module.logits(x).argmax(-1) == y).sum()) for x, y in loader)
    return hits / len(loader.dataset)  # type: ignore[arg-type]


def test_validation_step_calibrates_a_module_without_forward_and_leaves_its_metrics_alone(tmp_path: Path):
    module, val, calibration = NoForward(), sequences(8, seed=1), sequences(8, seed=2)
    expected = expected_masks(module, calibration, num_samples=8)
    pruning = WandaPruningCallback(
        prune_on="validate",
        calibration=calibration,
        verbose=False,
        calibration_options=CalibrationOptions(num_samples=8),
    )
    trainer = make_trainer(tmp_path, callbacks=[pruning])
    (results,) = trainer.validate(module, val)

    assert sorted(pruning.masks) == sorted(expected) and "encoder.layers.0.self_attn.in_proj_weight" in expected
    for name, keep in expected.items():
        assert torch.equal(pruning.masks[name], keep), name
    # validation_step ran for calibration (the capture pass up to the first block, and the pass for the head after the
    # blocks, 2 batches each) besides the three measurements of 2 batches (dense, pruned, the trainer's own).
    assert module.calls == Counter(validation_step=10)
    # The accuracy the trainer reports is that of the pruned model on the validation set alone: nothing from the
    # calibration batches (other data, dense model) stayed in the metric's state.
    assert results["val_acc"] == pytest.approx(accuracy(module, val))
    assert pruning.metrics["val_acc"]["pruned"] == pytest.approx(accuracy(module, val))
    assert sorted(trainer.logged_metrics) == ["val_acc", "val_loss"]


def test_training_step_calibrates_on_training_batches_with_its_logs_thrown_away(tmp_path: Path):
    module, train = NoForward(), sequences(8, seed=3)
    before = copy.deepcopy(module)
    pruning = WandaPruningCallback(
        calibration="train", evaluate=False, verbose=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    trainer = make_trainer(tmp_path, max_steps=2, limit_train_batches=2, callbacks=[pruning])
    trainer.fit(module, train)

    # Pruned after the last step: the weights it pruned are those after two SGD steps.
    for x, y in list(train)[:2]:
        loss = F.cross_entropy(before.logits(x), y)
        before.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter in before.parameters():
                if parameter.grad is not None:
                    parameter -= 0.05 * parameter.grad
    expected = expected_masks(before, train, num_samples=8)
    for name, keep in expected.items():
        assert torch.equal(pruning.masks[name], keep), name
    assert module.calls == Counter(training_step=2 + 2 + 2)  # two steps, then the capture and the head's passes
    assert len(logged(read_csv(tmp_path), "train_loss")) == 2  # the calibration's logs went nowhere


def test_a_module_without_forward_can_still_use_forward_fn(tmp_path: Path):
    module, val = NoForward(), sequences(8, seed=1)
    expected = expected_masks(module, val, num_samples=8)
    pruning = WandaPruningCallback(
        prune_on="validate",
        evaluate=False,
        verbose=False,
        calibration_options=CalibrationOptions(forward_fn=lambda m, b: m.logits(b[0])),
    )
    make_trainer(tmp_path, callbacks=[pruning]).validate(module, val)
    assert module.calls == Counter(validation_step=2)  # the trainer's own validation only
    for name, keep in expected.items():
        assert torch.equal(pruning.masks[name], keep), name


class Recording(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_deltas_are_in_callback_metrics_for_checkpointing_and_early_stopping(tmp_path: Path):
    module, val = NoForward(), sequences(8, seed=1)
    pruning = WandaPruningCallback(
        prune_on=AfterEpoch(0), verbose=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_acc/delta", mode="max", save_top_k=1)
    stop = EarlyStopping(monitor="val_loss/pruned", patience=3)
    recording = Recording()
    trainer = make_trainer(
        tmp_path, max_epochs=2, callbacks=[pruning, best, stop, recording], enable_checkpointing=True
    )
    trainer.fit(module, sequences(8, seed=3), val)

    expected = {"wanda/sparsity": pruning.global_sparsity}
    for metric, values in pruning.metrics.items():
        expected.update({f"{metric}/{key}": value for key, value in values.items()})
    assert sorted(expected) == [
        "val_acc/delta", "val_acc/dense", "val_acc/pruned", "val_loss/delta", "val_loss/dense", "val_loss/pruned",
        "wanda/sparsity",
    ]  # fmt: skip
    for seen in recording.seen:  # at every validation of the fit (pruned before the first)
        for key, value in expected.items():
            assert seen[key] == pytest.approx(value, rel=1e-6), key
    assert float(best.best_model_score) == pytest.approx(pruning.metrics["val_acc"]["delta"])
    assert Path(best.best_model_path).is_file() and trainer.current_epoch == 2 and not trainer.should_stop
