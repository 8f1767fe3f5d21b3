"""``CalibratedCallback`` is a declared extension point: a third callback built on it here (magnitude masks of the MLP
layers only, scaled by how often each input feature fired on the calibration batches) gets calibration, evaluation,
``trainer.callback_metrics``, the summary, checkpoint state and resume from the base, with no code copied."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch
from helpers.trainer import Snapshot, loader, make_module, make_trainer, reference_validation
from lightning.pytorch.callbacks import ModelCheckpoint

from wanda_lightning import CalibratedCallback, CalibrationOptions
from wanda_lightning.lightning.triggers import AfterStep


@dataclass
class MLPReport:
    """What the custom action did."""

    layers: list[str]
    zeroed: int
    calibration_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> MLPReport:
        return cls(**state)


class MagnitudeMLP(CalibratedCallback):
    """Zeroes, in every row of each MLP ``nn.Linear``, the half of the weights with the smallest ``|W|``."""

    stage = "masked"
    report_class = MLPReport

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.done = False
        self.plans = 0
        self.applies = 0

    @property
    def acted(self) -> bool:
        return self.done

    def plan(self, trainer, pl_module) -> list[str]:
        self.plans += 1
        names = [n for n, m in pl_module.named_modules() if ".mlp." in n and isinstance(m, torch.nn.Linear)]
        if not names:
            raise ValueError("`MagnitudeMLP` needs MLP layers, found none")
        return names

    def apply(self, trainer, pl_module, batches, due, plan) -> MLPReport:
        self.applies += 1
        zeroed = 0
        for name in plan:
            weight = pl_module.get_submodule(name).weight
            order = weight.detach().abs().argsort(dim=1, stable=True)
            drop = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, order[:, : weight.shape[1] // 2], True)
            weight.data.masked_fill_(drop, 0)
            zeroed += int(drop.sum())
        self.done = True
        rows = sum(int(batch["input_ids"].shape[0]) for batch in batches)
        return MLPReport(list(plan), zeroed, rows)

    def action_metrics(self) -> dict[str, float]:
        return {"masked/zeroed": float(self.report.zeroed)}

    def extra_state(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_extra_state(self, state, version) -> None:
        self.done = bool(state.get("done", False))


def reference_magnitude_mlp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same masks computed independently: per row, the weights ranked by ``|W|``, the lower half set to 0."""
    result = {}
    for name, weight in state.items():
        if ".mlp." in name and name.endswith(".weight"):
            pruned = weight.clone()
            for row in range(weight.shape[0]):
                ranked = sorted(range(weight.shape[1]), key=lambda j, r=row: (abs(float(weight[r, j])), j))
                for column in ranked[: weight.shape[1] // 2]:
                    pruned[row, column] = 0.0
            result[name] = pruned
    return result


def test_a_third_callback_on_the_base_calibrates_evaluates_publishes_and_resumes(tmp_path):
    module, val = make_module(), loader(8, seed=2)
    snapshot = Snapshot()
    masking = MagnitudeMLP(prune_on=AfterStep(2), evaluate=1, calibration_options=CalibrationOptions(num_samples=8))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=2)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[snapshot, masking, checkpoints], enable_checkpointing=True)
    trainer.fit(module, loader(16, seed=1), val)

    # The action ran once, on the plan made once for it (after the check before training), on the module's own
    # calibration batches.
    assert (masking.plans, masking.applies, masking.acted) == (2, 1, True)
    assert masking.report.calibration_rows == 8
    assert masking.report.layers == [
        f"model.model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ["gate", "up", "down"]
    ]
    expected = reference_magnitude_mlp({k[len("model.") :]: v for k, v in snapshot.latest.items() if ".mlp." in k})
    for name, weight in expected.items():
        assert torch.equal(module.model.get_parameter(name).detach(), weight), name

    # Evaluation before and after through the module's own validation_step, published where ModelCheckpoint looks.
    dense_module = make_module()
    dense_module.load_state_dict(snapshot.latest)
    first_batch = loader(4, seed=2)  # evaluate=1: the first validation batch (the same 4 rows)
    dense, masked = reference_validation(dense_module, first_batch), reference_validation(module, first_batch)
    measured = masking.metrics["val_loss"]
    assert measured["dense"] == pytest.approx(dense["val_loss"], rel=1e-5)
    assert measured["masked"] == pytest.approx(masked["val_loss"], rel=1e-5)
    assert measured["delta"] == pytest.approx(measured["masked"] - measured["dense"])
    metrics = trainer.callback_metrics
    assert float(metrics["masked/zeroed"]) == masking.report.zeroed == sum(w.numel() // 2 for w in expected.values())
    assert float(metrics["val_loss/masked"]) == pytest.approx(masking.metrics["val_loss"]["masked"])
    assert "MagnitudeMLP: masked at step 2" in masking.summary()

    # Checkpoint state and resume: the result is restored, nothing acts again, the metrics are published again.
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(path, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("MagnitudeMLP")]
    assert state["done"] is True and state["report"]["zeroed"] == masking.report.zeroed
    resumed = MagnitudeMLP(prune_on=AfterStep(2), evaluate=1, calibration_options=CalibrationOptions(num_samples=8))
    again = make_trainer(tmp_path / "again", max_steps=3, callbacks=[resumed])
    again.fit(make_module(), loader(16, seed=1), val, ckpt_path=str(path))
    assert (resumed.plans, resumed.applies, resumed.acted) == (0, 0, True)
    assert resumed.report == masking.report
    assert float(again.callback_metrics["masked/zeroed"]) == masking.report.zeroed


def test_the_base_declares_what_a_subclass_must_provide():
    with pytest.raises(TypeError, match="abstract"):
        CalibratedCallback()  # type: ignore[abstract]

    class Incomplete(CalibratedCallback):
        @property
        def acted(self) -> bool:
            return False

    with pytest.raises(TypeError, match="apply"):
        Incomplete()  # type: ignore[abstract]
    with pytest.raises(TypeError, match="positional"):
        MagnitudeMLP("val")  # type: ignore[misc]
