"""``calibration="val"`` and the evaluation before and after find the validation data the user gave, whatever the
validation schedule: Lightning loads a fit's validation dataloaders only when its first validation is due, so the
callbacks load them themselves (:func:`~wanda_lightning.lightning.calibration.validation_loaders`), as the fit loop
would. Checked in real ``Trainer`` runs against the core ``prune()`` and a validation written in the test."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers.trainer import (
    Snapshot,
    assert_masks_equal,
    loader,
    make_module,
    make_trainer,
    module_from,
    reference_masks,
    reference_validation,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from wanda_lightning.lightning.calibration import validation_loaders
from wanda_lightning.lightning.module import CausalLMModule
from wanda_lightning.lightning.pruning_callback import WandaPruningCallback
from wanda_lightning.lightning.triggers import AfterEpoch, AfterStep

pytest.importorskip("transformers")

VAL_BATCHES = 3  # loader(12, seed=2): 3 batches of 4


def _fit(tmp_path, pruning: Callback, val: Any, module: pl.LightningModule | None = None, **options: Any) -> Snapshot:
    """Fits 2 steps (one epoch of 2 batches unless ``options`` say otherwise) with a Snapshot before ``pruning``."""
    before = Snapshot()
    options = {"max_steps": 2, **options}
    trainer = make_trainer(tmp_path, callbacks=[before, pruning], **options)
    trainer.fit(module if module is not None else make_module(), loader(8, seed=1), val)
    return before


def _check_fit_start(pruning: WandaPruningCallback, batches: list[Any], measured: int) -> None:
    """Acted on the module as built, calibrated on ``batches`` and measured it on the first ``measured`` of them."""
    dense = make_module()
    assert pruning.pruned
    assert_masks_equal(pruning.masks, reference_masks(dense, batches, num_samples=12))
    expected = reference_validation(dense, batches[:measured])  # type: ignore[arg-type]
    assert pruning.metrics["val_loss"]["dense"] == pytest.approx(expected["val_loss"], rel=1e-5)
    assert pruning.metrics["val_ppl"]["dense"] == pytest.approx(expected["val_ppl"], rel=1e-5)


SCHEDULES = {
    "check_val_every_n_epoch=100": ({"check_val_every_n_epoch": 100}, VAL_BATCHES),
    "check_val_every_n_epoch=2": ({"check_val_every_n_epoch": 2}, VAL_BATCHES),
    "val_check_interval=0.5, every 3rd epoch": ({"val_check_interval": 0.5, "check_val_every_n_epoch": 3}, VAL_BATCHES),
    "val_check_interval=2 steps": ({"val_check_interval": 2, "check_val_every_n_epoch": None}, VAL_BATCHES),
    "num_sanity_val_steps=0": ({"num_sanity_val_steps": 0, "check_val_every_n_epoch": 5}, VAL_BATCHES),
    "num_sanity_val_steps=1": ({"num_sanity_val_steps": 1, "check_val_every_n_epoch": 5}, VAL_BATCHES),
    "limit_val_batches=2": ({"limit_val_batches": 2, "check_val_every_n_epoch": 5}, 2),
    "limit_val_batches=0.4": ({"limit_val_batches": 0.4, "check_val_every_n_epoch": 5}, 1),  # int(0.4 * 3)
}


@pytest.mark.parametrize(("options", "measured"), list(SCHEDULES.values()), ids=list(SCHEDULES))
def test_fit_start_calibrates_and_evaluates_on_the_validation_data_whatever_the_schedule(
    tmp_path, single_thread, options, measured
):
    val = loader(12, seed=2)
    pruning = WandaPruningCallback(prune_on="fit_start", verbose=False)
    _fit(tmp_path, pruning, val, **options)
    _check_fit_start(pruning, list(val), measured)


def test_the_reported_case_fit_start_with_distillation_and_rare_validation(tmp_path, single_thread):
    val = loader(12, seed=2)
    pruning = WandaPruningCallback(prune_on="fit_start", distill=True, verbose=False)
    _fit(tmp_path, pruning, val, check_val_every_n_epoch=50)
    _check_fit_start(pruning, list(val), VAL_BATCHES)
    assert pruning.teacher is not None  # distilled from the module as built
    dense = make_module().model.state_dict()
    assert all(torch.equal(value, dense[name]) for name, value in pruning.teacher.state_dict().items())


@pytest.mark.parametrize("prune_on", [AfterStep(1), AfterEpoch(0), "fit_end"], ids=["step", "epoch", "fit_end"])
def test_every_trigger_finds_validation_data_that_was_never_loaded(tmp_path, single_thread, prune_on):
    val = loader(12, seed=2)
    pruning = WandaPruningCallback(prune_on=prune_on, verbose=False)
    before = _fit(tmp_path, pruning, val, check_val_every_n_epoch=50)
    acted_after = (0, 0) if isinstance(prune_on, AfterStep) else (0, 1)  # (epoch, batch) whose weights were pruned
    dense = module_from(before.states[acted_after])
    assert pruning.pruned
    assert_masks_equal(pruning.masks, reference_masks(dense, list(val), num_samples=12))
    assert pruning.metrics["val_loss"]["dense"] == pytest.approx(reference_validation(dense, val)["val_loss"], rel=1e-5)


class CountingModule(CausalLMModule):
    """Gives its validation data through ``val_dataloader()``, counts the calls and draws from the global RNG."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.requests = 0

    def val_dataloader(self) -> Any:
        self.requests += 1
        torch.rand(1)  # a hook that draws random numbers: the callback must not move the run's random state
        return loader(12, seed=2)


class Probe(Callback):
    """Calls ``validation_loaders`` first thing in ``on_train_start`` and records what it did around the call."""

    def __init__(self) -> None:
        self.found: Any = None
        self.rng_kept = self.stage_kept = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert trainer.val_dataloaders is None  # Lightning has not loaded it: its first validation is epochs away
        state, stage = torch.get_rng_state(), trainer.state.stage
        self.found = validation_loaders(trainer)
        self.rng_kept = torch.equal(state, torch.get_rng_state())
        self.stage_kept = stage == trainer.state.stage == RunningStage.TRAINING


def test_the_loader_is_loaded_once_as_lightning_would_and_the_run_goes_on_unchanged(tmp_path, single_thread):
    module = make_module(cls=CountingModule)
    probe, pruning = Probe(), WandaPruningCallback(prune_on="fit_start", verbose=False)
    trainer = make_trainer(tmp_path, max_epochs=2, check_val_every_n_epoch=2, callbacks=[probe, pruning])
    trainer.fit(module, loader(8, seed=1))

    assert probe.found is not None and probe.rng_kept and probe.stage_kept
    assert trainer.num_val_batches == [VAL_BATCHES]
    # The fit loop kept it: its own validation at the end of epoch 2 did not request it again, and ran.
    assert module.requests == 1
    assert trainer.callback_metrics["val_loss"] == pytest.approx(
        reference_validation(module_from(module.state_dict()), loader(12, seed=2))["val_loss"], rel=1e-5
    )
    _check_fit_start(pruning, list(loader(12, seed=2)), VAL_BATCHES)


# --- no validation data -----------------------------------------------------------------------------------------------


def _refused(tmp_path, match: str, val: Any, module: pl.LightningModule | None = None, **options: Any) -> None:
    pruning = WandaPruningCallback(prune_on="fit_start", verbose=False)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[pruning], **options)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(module if module is not None else make_module(), loader(8, seed=1), val)
    assert trainer.global_step == 0 and not pruning.pruned


def test_a_trainer_without_validation_data_is_still_refused(tmp_path):
    _refused(
        tmp_path, r"needs a validation dataloader, and the trainer has none: pass", None, check_val_every_n_epoch=50
    )


def test_limit_val_batches_0_switches_validation_off_so_val_calibration_is_refused(tmp_path):
    """``limit_val_batches=0`` turns validation off: Lightning loads no validation dataloader, and the callbacks take
    that as no validation data (calibrate on 'train' or a DataLoader instead)."""
    _refused(
        tmp_path,
        r"the trainer has none \(validation is switched off: `limit_val_batches`=0\)",
        loader(12, seed=2),
        limit_val_batches=0,
    )


class NoValidationStep(CausalLMModule):
    validation_step = pl.LightningModule.validation_step  # type: ignore[assignment]


def test_a_module_without_validation_step_is_refused_with_the_reason(tmp_path):
    module = make_module(cls=NoValidationStep)
    _refused(tmp_path, r"NoValidationStep defines no `validation_step`", loader(12, seed=2), module=module)


def test_limit_val_batches_0_with_train_calibration_prunes_and_evaluates_nothing(tmp_path, single_thread):
    pruning = WandaPruningCallback(prune_on="fit_start", calibration="train", verbose=False)
    with pytest.warns(UserWarning, match=r"`evaluate` is on but .*`limit_val_batches`=0"):
        _fit(tmp_path, pruning, loader(12, seed=2), limit_val_batches=0)
    assert pruning.pruned and pruning.metrics == {}
    assert_masks_equal(pruning.masks, reference_masks(make_module(), list(loader(8, seed=1)), num_samples=12))
