"""``prune_on="schedule"``: gradual pruning along Zhu & Gupta's cubic ramp through a real ``Trainer``; weights pruned
at one step stay pruned, optimizer states follow, a resumed run is bit-identical to an uninterrupted one, and under
DDP every process holds the same masks and ``callback_metrics``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.trainer import Snapshot, loader, logged, make_module, make_trainer, module_from, read_csv
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import wanda_lightning.lightning.pruning_callback as callback_module
from wanda_lightning import CalibrationOptions, Schedule, Wanda, WandaPruningCallback, prune
from wanda_lightning.pruning import prune_with


def ramp(step: int, start: int, end: int, final: float) -> float:
    """Zhu & Gupta (2017), s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(n dt))^3 with s_i = 0, written out here."""
    return final + (0.0 - final) * (1.0 - (step - start) / (end - start)) ** 3


class AtSteps(Callback):
    """Keeps the module's state and the masks after each optimizer step (put it after the pruning callback)."""

    def __init__(self, pruning: WandaPruningCallback) -> None:
        self.pruning = pruning
        self.masks: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.masks[trainer.global_step] = {k: v.clone() for k, v in self.pruning.masks.items()}


def test_schedule_follows_the_cubic_ramp_and_never_unprunes(tmp_path: Path):
    module, before = make_module(), Snapshot()
    val = loader(8, seed=2)
    pruning = WandaPruningCallback(
        sparsity=0.7,
        prune_on=Schedule(start_step=1, end_step=7, every_n_steps=2),
        evaluate=1,
        calibration_options=CalibrationOptions(num_samples=8),
    )
    after = AtSteps(pruning)
    trainer = make_trainer(tmp_path, max_steps=9, callbacks=[before, pruning, after])
    trainer.fit(module, loader(16, seed=1), val)  # 4 batches per epoch: the schedule spans epochs

    steps = [3, 5, 7]
    previous: dict[str, torch.Tensor] = {}
    for step in steps:
        target = ramp(step, 1, 7, 0.7)
        dense = module_from(before.states[((step - 1) // 4, (step - 1) % 4)])  # the weights the step pruned
        # Reference: the core prune() at the ramp's sparsity. Weights pruned before are 0, so they score lowest anyway.
        expected: dict[str, torch.Tensor] = {}
        prune(
            dense,
            list(val),
            sparsity=target,
            num_samples=8,
            on_layer_pruned=lambda n, k, out=expected: out.__setitem__(f"{n}.weight", k),
        )
        found = after.masks[step]
        assert sorted(found) == sorted(expected)
        for name, keep in expected.items():
            assert torch.equal(found[name], keep), (step, name)
            assert ((~keep).sum(dim=1) == int(keep.shape[1] * target)).all(), (step, name)
            if previous:
                assert not (~previous[name] & keep).any(), (step, name)  # pruned before: still pruned
        previous = found
    assert after.masks[2] == {} and torch.equal(
        after.masks[4]["model.model.layers.0.mlp.up_proj.weight"],
        after.masks[3]["model.model.layers.0.mlp.up_proj.weight"],
    )

    # Trained on between the steps and after the last; pruned entries exactly zero with no optimizer momentum.
    parameters = dict(module.named_parameters())
    optimizer = trainer.optimizers[0]
    for name, keep in pruning.masks.items():
        assert torch.equal(parameters[name] != 0, keep), name
        state = optimizer.state[parameters[name]]
        assert (state["exp_avg"][~keep] == 0).all() and (state["exp_avg_sq"][~keep] == 0).all(), name
    # Logged at each step: sparsity rising to the target, metric deltas against the dense model measured once.
    rows = read_csv(tmp_path)
    sparsities = logged(rows, "wanda/sparsity")
    masks = pruning.masks.values()
    final = sum(int((~keep).sum()) for keep in masks) / sum(keep.numel() for keep in masks)
    assert len(sparsities) == 3 and sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(final)
    assert len(set(logged(rows, "val_loss/dense"))) == 1 and len(logged(rows, "val_loss/pruned")) == 3
    assert pruning.report is not None and pruning.report.target_sparsity == pytest.approx(0.7)


def test_weights_pruned_before_stay_pruned_even_against_equal_scores():
    """A dead input feature scores 0 like a pruned weight does; the weight pruned before must be the one that stays
    pruned (by the scores alone, ties go to the lower column: the dead feature's weight would be pruned instead)."""
    from wanda_lightning import PruneConfig

    layer = torch.nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 9.0))
        layer.weight[0, 7] = 0.0  # pruned at an earlier step
    inputs = torch.ones(4, 8)
    inputs[:, 0] = 0.0  # feature 0 is dead: its weight scores 0 too
    config = PruneConfig.create(sparsity=0.125)
    already = {"0.weight": torch.tensor([[False] * 7 + [True]])}  # drop masks by parameter name
    model = torch.nn.Sequential(layer)
    unaware = torch.nn.Sequential(copy.deepcopy(layer))  # the same weights, told nothing
    result = prune_with(model, [inputs], config, already_pruned=already, keep_masks=True)
    assert result.masks["0.weight"].tolist() == [[True] * 7 + [False]]
    assert float(layer.weight.detach()[0, 0]) == 1.0  # the dead feature's weight is kept

    plain = prune_with(unaware, [inputs], config, keep_masks=True)
    assert plain.masks["0.weight"][0, 0].item() is False  # what a schedule relying on zeros would have done
    with pytest.raises(ValueError, match=r"`method`='sparsegpt' rewrites the kept weights"):
        prune_with(model, [inputs], PruneConfig.create(method="sparsegpt"), already_pruned=already)


class _OwnPruneLayer(Wanda):
    """A user method that overrides ``prune_layer`` (here to the same effect): what it declares decides."""

    def prune_layer(self, weight, statistics, structure, sparsity):
        return super().prune_layer(weight, statistics, structure, sparsity)


class _KeepsWeights(_OwnPruneLayer):
    name = "keeps-weights"
    rewrites_weights = False


class _RewritesWeights(_OwnPruneLayer):
    name = "rewrites-weights"
    rewrites_weights = True


def test_keeping_what_was_pruned_reads_what_the_method_declares():
    from wanda_lightning import PruneConfig
    from wanda_lightning.pruning.action import check_keeps_pruned

    check_keeps_pruned(PruneConfig.create(method=_KeepsWeights()))  # overrides prune_layer, declares False: accepted
    with pytest.raises(ValueError, match=r"`method`='wanda' rewrites the kept weights"):
        check_keeps_pruned(PruneConfig.create(method=_RewritesWeights()))


def test_keeping_what_was_pruned_reads_what_the_refinement_declares():
    from wanda_lightning import PruneConfig
    from wanda_lightning.pruning.action import check_keeps_pruned

    with pytest.raises(ValueError, match=r"`refine`='dsnot' swaps pruned and kept weights"):
        check_keeps_pruned(PruneConfig.create(refine="dsnot"))
    with pytest.raises(ValueError, match=r"`refine`='admm-update' rewrites the kept weights"):
        check_keeps_pruned(PruneConfig.create(refine="admm-update"))


class Crash(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 2:
            raise RuntimeError("simulated crash")


def _run(root: Path, *, crash: bool = False, ckpt_path: Path | None = None, seed: int = 0):
    module = make_module(seed=seed)
    pruning = WandaPruningCallback(
        sparsity=0.6,
        prune_on=Schedule(end_step=5, every_n_steps=2),
        evaluate=1,
        calibration_options=CalibrationOptions(num_samples=8),
    )
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, monitor="val_loss/pruned")
    callbacks: list[Callback] = [pruning, checkpoints, *([Crash()] if crash else [])]
    trainer = make_trainer(root, max_epochs=3, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, loader(8, seed=1), loader(8, seed=2), ckpt_path=ckpt_path)
    return module, pruning, trainer


def test_schedule_resumes_midway_bit_identically(tmp_path: Path, monkeypatch):
    # 2 batches per epoch; the schedule prunes at steps 2, 4 and 5; the crash comes in epoch 2 (steps 5-6).
    reference, reference_pruning, reference_trainer = _run(tmp_path / "uninterrupted")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crashed", crash=True)
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    (state,) = (v for k, v in saved["callbacks"].items() if k.startswith("WandaPruningCallback"))
    assert state["trigger"] == {"last_step": 4} and saved["global_step"] == 4

    calls: list[float] = []
    monkeypatch.setattr(
        callback_module, "prune_with", lambda *a, **k: calls.append(a[2].structure.sparsity) or prune_with(*a, **k)
    )
    resumed, resumed_pruning, resumed_trainer = _run(tmp_path / "resumed", ckpt_path=last, seed=123)

    assert calls == [pytest.approx(0.6)]  # only the last step of the schedule ran again
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert sorted(resumed_pruning.masks) == sorted(reference_pruning.masks)
    for name, keep in reference_pruning.masks.items():
        assert torch.equal(resumed_pruning.masks[name], keep), name
    parameters, reference_parameters = dict(resumed.named_parameters()), dict(reference.named_parameters())
    for name in reference_pruning.masks:
        for key in ("exp_avg", "exp_avg_sq"):
            found = resumed_trainer.optimizers[0].state[parameters[name]][key]
            assert torch.equal(found, reference_trainer.optimizers[0].state[reference_parameters[name]][key]), name
    assert resumed_pruning.metrics == reference_pruning.metrics  # the dense measurement came through the checkpoint
    assert resumed_pruning.state_dict()["trigger"] == {"last_step": 5}
    # The checkpoint callback monitored the pruned loss in both runs alike.
    assert float(resumed_trainer.callback_metrics["val_loss/pruned"]) == reference_pruning.metrics["val_loss"]["pruned"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_on": "schedule"}, r"`prune_on`='schedule' needs its moment: pass prune_on=Schedule\(end_step="),
        ({"prune_on": Schedule(end_step=10), "structure": "2:4"}, r"`structure`='2:4' fixes at 0.5"),
        ({"prune_on": Schedule(end_step=10), "method": "sparsegpt"}, r"`method`='sparsegpt' rewrites the kept"),
        ({"prune_on": Schedule(end_step=10), "refine": "dsnot"}, r"`refine`='dsnot' swaps pruned and kept"),
        ({"prune_on": Schedule(end_step=10), "method": Wanda(variant=True)}, r"selects by cumulative scores"),
        ({"prune_on": "sometimes"}, r"`prune_on` must be one of \[.*'checkpoint'.*or a Trigger.*got 'sometimes'"),
    ],
)
def test_bad_schedules_are_refused(kwargs: dict[str, Any], match: str):
    with pytest.raises(MisconfigurationException, match=match):
        WandaPruningCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_step": 5, "end_step": 5}, r"`end_step`=5 must be greater than `start_step`=5"),
        ({"end_step": 10, "every_n_steps": 0}, r"`every_n_steps` must be an integer >= 1, got 0"),
        ({"start_step": -1, "end_step": 10}, r"`start_step` must be an integer >= 0, got -1"),
    ],
)
def test_bad_schedule_steps_are_refused(kwargs: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_a_schedule_cut_short_warns_with_the_sparsity_reached(tmp_path: Path):
    module = make_module()
    pruning = WandaPruningCallback(sparsity=0.5, prune_on=Schedule(end_step=8, every_n_steps=2), evaluate=False)
    trainer = make_trainer(tmp_path, max_steps=5, callbacks=[pruning])
    with pytest.warns(UserWarning, match=r"before `end_step`=8: the schedule reached sparsity 43.75%, not 50.00%"):
        trainer.fit(module, loader(8, seed=1), loader(8, seed=2))
    assert pruning.state_dict()["trigger"] == {"last_step": 4}


class Dump(WandaPruningCallback):
    """Writes what this process holds at the end of the fit."""

    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
        dump = {"masks": self.masks, "callback_metrics": metrics, "metrics": self.metrics}
        torch.save(dump, Path(self.out) / f"rank{trainer.global_rank}.pt")


def test_ddp_schedule_masks_and_callback_metrics_are_identical_on_every_process(tmp_path: Path):
    pruning = Dump(
        str(tmp_path),
        sparsity=0.5,
        prune_on=Schedule(end_step=2, every_n_steps=1),
        calibration_options=CalibrationOptions(num_samples=None),
        verbose=False,
    )
    trainer = make_trainer(tmp_path, strategy="ddp_spawn", devices=2, max_steps=3, callbacks=[pruning], logger=False)
    trainer.fit(make_module(), loader(16, seed=1), loader(8, seed=2))

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert sorted(rank0["masks"]) == sorted(rank1["masks"]) and len(rank0["masks"]) == 14
    for name, keep in rank0["masks"].items():
        assert torch.equal(rank1["masks"][name], keep), name
        assert int((~keep).sum()) == keep.numel() // 2, name
    assert rank0["callback_metrics"] == rank1["callback_metrics"]
    expected = {"wanda/sparsity": 0.5}
    for metric, values in rank0["metrics"].items():
        expected.update({f"{metric}/{key}": value for key, value in values.items()})
    assert sorted(rank0["callback_metrics"]) == sorted(expected)
    for key, value in expected.items():
        assert rank0["callback_metrics"][key] == pytest.approx(value, rel=1e-6), key
    assert copy.deepcopy(rank0["metrics"]) == rank1["metrics"]
