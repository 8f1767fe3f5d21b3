"""Configuration errors are ``MisconfigurationException`` and come before anything changes; a failure while acting (the
user's own forward on a later calibration batch) propagates as itself, with its traceback."""

from __future__ import annotations

import pytest
import torch
from helpers.trainer import CONFIG, loader, make_module, make_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from wanda_lightning import CalibrationOptions, WandaPruningCallback, WandaShrinkCallback
from wanda_lightning.lightning.module import CausalLMModule

OPTIONS = CalibrationOptions(num_samples=8, batch_size=4)


class FailsOnSecondBatch(CausalLMModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.forwards = 0

    def forward(self, **batch):
        self.forwards += 1
        if not torch.is_grad_enabled() and self.forwards == 2:
            raise RuntimeError("CUDA-style failure in the user's own forward")
        return super().forward(**batch)


@pytest.mark.parametrize(
    "callback",
    [
        lambda: WandaPruningCallback(prune_on="validate", evaluate=False, calibration_options=OPTIONS),
        lambda: WandaShrinkCallback(mlp=0.5, prune_on="validate", evaluate=False, calibration_options=OPTIONS),
    ],
    ids=["pruning", "shrinking"],
)
def test_a_runtime_failure_in_the_users_forward_propagates_as_itself(tmp_path, callback):
    torch.manual_seed(0)
    module = FailsOnSecondBatch(config=CONFIG, learning_rate=1e-2)
    made = callback()
    with pytest.raises(RuntimeError, match="user's own forward") as caught:
        make_trainer(tmp_path, callbacks=[made]).validate(module, loader(8, seed=2, batch_size=4))
    assert not isinstance(caught.value, MisconfigurationException)
    assert any("forward" in entry.name for entry in caught.traceback)  # the user's frame is in the traceback


def test_a_batch_format_the_module_does_not_take_is_a_configuration_error(tmp_path):
    pruning = WandaPruningCallback(prune_on="validate", evaluate=False, calibration=[(torch.zeros(2, 3),)])
    with pytest.raises(MisconfigurationException, match="could not run on a calibration batch") as caught:
        make_trainer(tmp_path, callbacks=[pruning]).validate(make_module(), loader(8, seed=2))
    assert caught.value.__cause__ is not None  # the original error is chained
