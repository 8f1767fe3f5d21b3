"""The recovery learning rate through a real ``Trainer``: both callbacks put every optimizer on it from the step they
acted at (warm-up, then cosine to 10 % at the fit's end), leave the module's own schedulers alone without it, and a
resumed fit goes on exactly where it was."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.trainer import loader, make_module, make_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from wanda_lightning import AfterStep, CalibrationOptions, Distillation, WandaPruningCallback, WandaShrinkCallback
from wanda_lightning.lightning import CausalLMModule
from wanda_lightning.lightning.recovery_lr import recovery_factor

pytest.importorskip("transformers")


def _slow_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    angle = math.pi * min(1.0, (step - warmup) / (total - warmup))
    return 0.1 + 0.45 * (1 + math.cos(angle))


@pytest.mark.parametrize(("warmup", "total"), [(1, 5), (3, 10), (10, 200)])
def test_the_factor_matches_a_slow_reference(warmup, total):
    for step in range(total + 2):
        assert recovery_factor(step, warmup, total) == pytest.approx(_slow_factor(step, warmup, total), abs=1e-12)
    assert recovery_factor(50, 2, float("inf")) == 1.0  # no known end: constant after the warm-up


class LearningRates(Callback):
    """The learning rate every optimizer step used, by global step."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.rates[trainer.global_step] = optimizer.param_groups[0]["lr"]


class Scheduled(CausalLMModule):
    """A module with its own scheduler (halves the learning rate every step)."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.learning_rate)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _shrinking(**kwargs) -> WandaShrinkCallback:
    return WandaShrinkCallback(
        mlp=0.5, prune_on=AfterStep(2), evaluate=False, calibration_options=CalibrationOptions(num_samples=8),
        **kwargs,
    )  # fmt: skip


def test_the_shrink_callback_puts_the_rebuilt_optimizers_on_the_recovery_rate(tmp_path):
    rates = LearningRates()
    module = make_module(cls=Scheduled)
    callback = _shrinking(distill=Distillation(learning_rate=0.05, warmup_steps=2))
    make_trainer(tmp_path, max_steps=8, callbacks=[callback, rates]).fit(module, loader(32, seed=1), loader(8, 2))
    # The module's own scheduler before the action; the recovery schedule over the 6 steps after it.
    assert rates.rates[0] == pytest.approx(1e-2) and rates.rates[1] == pytest.approx(5e-3)
    for step in range(2, 8):
        assert rates.rates[step] == pytest.approx(0.05 * _slow_factor(step - 2, 2, 6), rel=1e-9), step
    assert callback.teacher is not None


def test_without_a_recovery_rate_the_modules_scheduler_keeps_working(tmp_path):
    rates = LearningRates()
    module = make_module(cls=Scheduled)
    make_trainer(tmp_path, max_steps=5, callbacks=[_shrinking(), rates]).fit(module, loader(32, seed=1), loader(8, 2))
    assert [rates.rates[s] for s in range(5)] == pytest.approx([1e-2 * 0.5**s for s in range(5)])


def test_plain_fine_tuning_at_the_recovery_rate_keeps_no_teacher_and_holds_masks(tmp_path):
    rates = LearningRates()
    module = make_module()
    pruning = WandaPruningCallback(
        0.5, prune_on="fit_start", evaluate=False, distill=Distillation(weight=0.0, learning_rate=0.02, warmup_steps=1),
        calibration_options=CalibrationOptions(num_samples=8),
    )  # fmt: skip
    make_trainer(tmp_path, max_steps=4, callbacks=[pruning, rates]).fit(module, loader(16, seed=1), loader(8, 2))
    assert [rates.rates[s] for s in range(4)] == pytest.approx([0.02 * _slow_factor(s, 1, 4) for s in range(4)])
    assert pruning.teacher is None
    for layer in module.model.model.layers:
        weight = layer.mlp.down_proj.weight
        assert int((weight == 0).sum()) == weight.numel() // 2


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _run(root: Path, stop: int | None = None, ckpt_path: str | None = None) -> tuple[CausalLMModule, LearningRates]:
    rates, module = LearningRates(), make_module()
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=4)
    callbacks = [_shrinking(distill=Distillation(learning_rate=0.05, warmup_steps=3)), checkpoints, rates]
    if stop is not None:
        callbacks.append(StopAt(stop))
    trainer = make_trainer(root, max_steps=9, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, loader(16, seed=1), loader(8, seed=2), ckpt_path=ckpt_path)  # saves at an epoch end
    return module, rates


def test_a_resumed_recovery_goes_on_at_the_same_rates_and_weights(tmp_path):
    uninterrupted, expected = _run(tmp_path / "a")
    _run(tmp_path / "b", stop=4)  # acts at step 2, saves at step 4 mid-warm-up
    resumed, rates = _run(tmp_path / "c", ckpt_path=str(tmp_path / "b" / "checkpoints" / "last.ckpt"))
    assert sorted(rates.rates) == list(range(4, 9))
    for step, rate in rates.rates.items():
        assert rate == pytest.approx(expected.rates[step], rel=1e-12), step
    reference = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"learning_rate": 0}, r"`learning_rate` must be in \(0, inf\), got 0"),
        ({"learning_rate": -1e-3}, "`learning_rate`"),
        ({"warmup_steps": 0}, "`warmup_steps` must be a positive integer, got 0"),
    ],
)
def test_bad_recovery_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(**kwargs)
