"""When the callbacks act: ``prune_on="train_step"`` and ``"fit_start"`` through a real ``Trainer``, and the trigger
objects' answers."""

from __future__ import annotations

import pytest
import torch
from helpers.trainer import (
    Snapshot,
    assert_exactly_sparse,
    loader,
    make_module,
    make_trainer,
    module_from,
    reference_masks,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from wanda_lightning import CalibrationOptions, WandaPruningCallback
from wanda_lightning.lightning.triggers import PRUNE_ON, AfterStep, AtFitStart, Schedule, make_trigger


def test_train_step_prunes_after_that_many_steps_and_trains_on_sparse(tmp_path):
    module, before, val = make_module(), Snapshot(), loader(8, seed=2)
    pruning = WandaPruningCallback(
        prune_on=AfterStep(2), evaluate=1, calibration_options=CalibrationOptions(num_samples=8)
    )
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[before, pruning])
    trainer.fit(module, loader(16, seed=1), val)
    assert pruning.report is not None and "step 2" in pruning.summary()
    expected = reference_masks(module_from(before.states[(0, 1)]), list(val), num_samples=8)
    assert pruning.masks.keys() == expected.keys()
    assert all(torch.equal(pruning.masks[k], v) for k, v in expected.items())
    assert_exactly_sparse(module, pruning.masks)  # two more steps kept the masks
    after, at_pruning = before.states[(0, 3)], before.states[(0, 1)]
    assert any(not torch.equal(after[k], v) for k, v in at_pruning.items())  # and training did go on


def test_fit_start_prunes_before_the_first_step(tmp_path):
    module, val = make_module(), loader(8, seed=2)
    dense = module_from({k: v.clone() for k, v in module.state_dict().items()})
    pruning = WandaPruningCallback(
        prune_on="fit_start", evaluate=1, calibration_options=CalibrationOptions(num_samples=8)
    )
    make_trainer(tmp_path, max_steps=2, callbacks=[pruning]).fit(module, loader(16, seed=1), val)
    expected = reference_masks(dense, list(val), num_samples=8)
    assert pruning.masks.keys() == expected.keys()
    assert all(torch.equal(pruning.masks[k], v) for k, v in expected.items())
    assert_exactly_sparse(module, pruning.masks)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_on": "train_step"}, r"`prune_on`='train_step' needs its moment: pass prune_on=AfterStep\(k\)"),
        ({"prune_on": "schedule"}, r"`prune_on`='schedule' needs its moment: pass prune_on=Schedule\("),
        ({"prune_on": "fit_start", "method": "ria-permuted", "structure": "2:4"}, r"`prune_on`='fit_start'"),
    ],
)
def test_bad_trigger_arguments_are_refused(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        WandaPruningCallback(**kwargs)


def test_every_mode_has_a_trigger():
    for mode in PRUNE_ON:
        assert make_trigger(mode).name == mode
    assert isinstance(make_trigger("fit_start"), AtFitStart)
    step = AfterStep(3)
    assert make_trigger(step).name == "train_step" and make_trigger(step) is not step
    schedule = Schedule(end_step=10)
    copied = make_trigger(schedule)
    assert copied.name == "schedule" and copied is not schedule  # the callback's own copy: its progress is its own


def test_a_trigger_object_acts_where_it_says(tmp_path):
    val = loader(8, seed=2)
    pruning = WandaPruningCallback(prune_on=AfterStep(2), evaluate=False)
    make_trainer(tmp_path, max_steps=3, callbacks=[pruning]).fit(make_module(), loader(16, seed=1), val)
    assert pruning.pruned and "step 2" in pruning.summary()
    with pytest.raises(ValueError, match=r"`step` must be an integer >= 1, got 0"):
        AfterStep(0)
