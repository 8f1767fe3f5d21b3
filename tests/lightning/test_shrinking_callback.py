"""``WandaShrinkCallback`` through a real ``Trainer``: shrink mid-fit, rebuilt optimizers, distillation, resume,
loading shrunk checkpoints, DDP, and refusals."""

from __future__ import annotations

import copy
import csv
import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.processes import launch_processes
from helpers.trainer import CONFIG, Snapshot, TokenDataset, loader, make_module, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from wanda_lightning import (
    AfterStep,
    CalibrationOptions,
    Distillation,
    Reconstruction,
    Schedule,
    WandaShrinkCallback,
    load_shrunk_checkpoint,
    shrink,
)
from wanda_lightning.lightning import CausalLMModule, distillation_loss

transformers = pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("width_worker.py")


def _widths(module: CausalLMModule) -> tuple[int, int, int]:
    layer = module.model.model.layers[0]
    return layer.mlp.down_proj.in_features, layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "logs" / "version_0" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_shrinks_at_a_step_then_recovers_with_rebuilt_optimizers(tmp_path):
    module, before = make_module(), Snapshot()
    val = loader(8, seed=2)
    shrinking = WandaShrinkCallback(
        mlp=0.5, heads=0.5, prune_on=AfterStep(2), calibration_options=CalibrationOptions(num_samples=8)
    )
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[before, shrinking])
    trainer.fit(module, loader(16, seed=1), val)

    assert trainer.global_step == 4 and shrinking.shrunk
    assert _widths(module) == (64, 32, 16)
    assert (module.model.config.intermediate_size, module.model.config.num_attention_heads) == (64, 2)
    # The optimizer trains the new parameters (the old ones are gone), with states of their shapes.
    (optimizer,) = trainer.optimizers
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert owned == {id(p) for p in module.parameters()}
    for param, state in optimizer.state.items():
        assert state["exp_avg"].shape == param.shape
    # The units are those shrink() picks on the weights after step 2 from the same calibration batches.
    dense = make_module()
    dense.load_state_dict(before.states[(0, 1)])
    expected = shrink(dense.model, [{"input_ids": b["input_ids"]} for b in val], mlp=0.5, heads=0.5)
    assert [g.kept_units for g in shrinking.report.groups] == [g.kept_units for g in expected.groups]
    # The teacher is the model as it was before shrinking, frozen.
    teacher = shrinking.teacher
    assert teacher is not None and teacher.model.layers[0].mlp.down_proj.in_features == 128
    assert not any(p.requires_grad for p in teacher.parameters())
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before.states[(0, 1)][f"model.{name}"]), name
    rows = _rows(tmp_path)
    assert any(row.get("distill_loss") for row in rows)
    logged = next(row for row in rows if row.get("wanda/parameters"))
    assert int(float(logged["wanda/parameters"])) == sum(p.numel() for p in module.parameters())
    assert float(logged["val_loss/delta"]) == pytest.approx(shrinking.metrics["val_loss"]["delta"])


def test_distillation_weight_zero_is_plain_fine_tuning_and_one_is_not(tmp_path):
    finals = {}
    for name, options in {
        "plain": dict(distill=False),
        "zero": dict(distill=Distillation(weight=0.0)),
        "one": {},
    }.items():
        module = make_module()
        shrinking = WandaShrinkCallback(
            mlp=0.5,
            prune_on=AfterStep(1),
            evaluate=False,
            calibration_options=CalibrationOptions(num_samples=8),
            **options,
        )
        make_trainer(tmp_path / name, max_steps=3, callbacks=[shrinking]).fit(module, loader(16, seed=1), loader(8, 2))
        finals[name] = {k: v.clone() for k, v in module.state_dict().items()}
    assert all(torch.equal(finals["plain"][k], v) for k, v in finals["zero"].items())
    assert any(not torch.equal(finals["plain"][k], v) for k, v in finals["one"].items())


def _slow_distillation_loss(student, teacher, mask, temperature):
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            p = [math.exp(float(x) / temperature) for x in teacher[b, t]]
            q = [math.exp(float(x) / temperature) for x in student[b, t]]
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
            total += temperature**2 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
            count += 1
    return total / count


def test_distillation_loss_matches_a_slow_reference():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = _slow_distillation_loss(student, teacher, mask, 2.0)
    assert float(distillation_loss(student, teacher, 2.0, mask)) == pytest.approx(expected, rel=1e-5)
    # The default is forward KL at temperature 1, the same as the callbacks' default Distillation().
    expected = _slow_distillation_loss(student, teacher, mask, 1.0)
    assert float(distillation_loss(student, teacher, mask=mask)) == pytest.approx(expected, rel=1e-5)
    assert (Distillation().weight, Distillation().temperature) == (1.0, 1.0)


def _resumable(
    root: Path, max_steps: int, ckpt_path: str | None = None, blocks: int = 2, **shrinking: float
) -> tuple[CausalLMModule, WandaShrinkCallback]:
    """A fit that shrinks at step 2 (``mlp=0.5, heads=0.5`` unless ``shrinking`` says otherwise) and saves every 4."""
    torch.manual_seed(0)
    module = CausalLMModule(config={**CONFIG, "num_hidden_layers": blocks}, learning_rate=1e-2)
    callback = WandaShrinkCallback(
        **(shrinking or {"mlp": 0.5, "heads": 0.5}),
        prune_on=AfterStep(2),
        evaluate=False,
        calibration_options=CalibrationOptions(num_samples=8),
    )
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=4)
    trainer = make_trainer(root, max_steps=max_steps, callbacks=[callback, checkpoints], enable_checkpointing=True)
    trainer.fit(module, loader(16, seed=1), loader(8, seed=2), ckpt_path=ckpt_path)
    return module, callback


def test_a_run_resumed_mid_recovery_matches_the_uninterrupted_one(tmp_path):
    uninterrupted, _ = _resumable(tmp_path / "a", max_steps=6)
    _resumable(tmp_path / "b", max_steps=4)  # shrinks at step 2, saves at step 4 with the teacher
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert "wanda_teacher_state_dict" in torch.load(last, weights_only=False)
    resumed, _ = _resumable(tmp_path / "c", max_steps=6, ckpt_path=str(last))
    assert _widths(resumed) == (64, 32, 16)
    expected = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_shrunk_checkpoint_loads_for_inference(tmp_path):
    module = make_module()
    shrinking = WandaShrinkCallback(
        mlp=0.25,
        heads=0.5,
        prune_on=AfterStep(1),
        evaluate=False,
        calibration_options=CalibrationOptions(num_samples=8),
    )
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[shrinking])
    trainer.fit(module, loader(8, seed=1), loader(8, seed=2))
    path = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CausalLMModule.load_from_checkpoint(path)  # what a plain load does: it builds the original shapes
    loaded = load_shrunk_checkpoint(CausalLMModule, path)
    assert type(loaded) is CausalLMModule and _widths(loaded) == _widths(module)
    assert loaded.model.config.intermediate_size == 96
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].cpu(), tensor), name


def test_validate_shrinks_once_and_saves_a_plain_folder(tmp_path):
    module = make_module()
    shrinking = WandaShrinkCallback(
        mlp=0.5,
        prune_on="validate",
        export=str(tmp_path / "small"),
        calibration_options=CalibrationOptions(num_samples=8),
    )
    trainer = make_trainer(tmp_path, callbacks=[shrinking])
    (results,) = trainer.validate(module, loader(8, seed=2))
    assert results["val_loss"] == pytest.approx(shrinking.metrics["val_loss"]["shrunk"], rel=1e-5)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    ids = TokenDataset(2, seed=5).ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, module.model(input_ids=ids).logits)
    trainer.validate(module, loader(8, seed=2))  # does not shrink again
    assert _widths(module)[0] == 64


def test_ddp_ranks_remove_the_same_units_and_keep_training(tmp_path):
    ranks = launch_processes([sys.executable, str(WORKER), "ddp", str(tmp_path)], tmp_path, timeout=240)
    rank0, rank1 = ranks
    assert rank0["kept"] == rank1["kept"] and rank0["global_step"] == rank1["global_step"] == 3
    for name, tensor in rank0["final"].items():  # the rebuilt DDP wrapper kept the replicas in step
        assert torch.equal(rank1["final"][name], tensor), name
    assert rank0["final"]["model.model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
    dense = make_module()
    dense.load_state_dict(rank0["dense"])
    union = [{"input_ids": batch} for batch in [*rank0["seen"], *rank1["seen"]]]
    assert not torch.equal(rank0["seen"][0], rank1["seen"][0])
    expected = shrink(copy.deepcopy(dense.model), union, mlp=0.5, heads=0.5)
    assert rank0["kept"] == [g.kept_units for g in expected.groups]  # one process over the union of the batches
    alone = shrink(copy.deepcopy(dense.model), union[: len(rank0["seen"])], mlp=0.5, heads=0.5)
    assert rank0["kept"] != [g.kept_units for g in alone.groups]  # not what rank 0 would pick alone


def test_spawning_strategies_are_refused_before_anything_runs():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(MisconfigurationException, match=r"spawning strategy.*strategy='ddp'"):
        WandaShrinkCallback(mlp=0.5).setup(trainer, make_module(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mlp": 1.5}, r"`mlp` must be a fraction in \[0, 1\), got 1.5"),
        ({"mlp": 0.0}, r"`mlp`, `heads` and `layers` are all 0"),
        ({"mlp": 0.5, "method": "random"}, r"`method` must be one of"),
        ({"mlp": 0.5, "prune_on": "checkpoint"}, r"`prune_on`='checkpoint' is not offered for shrinking"),
        ({"mlp": 0.5, "prune_on": Schedule(end_step=10)}, r"`prune_on`='schedule' is not offered for shrinking"),
        ({"mlp": 0.5, "prune_on": "train_step"}, r"`prune_on`='train_step' needs its moment: pass prune_on=AfterStep"),
        ({"mlp": 0.5, "distill": "yes"}, r"`distill` must be True, False or a Distillation\(...\), got 'yes'"),
        (
            {"mlp": 0.5, "evaluate": 0},
            r"`evaluate` must be True, False or a positive number of validation batches, got 0",
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        WandaShrinkCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": 2}, r"`weight` must be in \[0, 1\], got 2"),
        ({"temperature": 0}, r"`temperature` must be in \(0, inf\), got 0"),
        ({"teacher_device": "nowhere"}, r"`teacher_device` must be a torch device.*'nowhere'"),
    ],
)
def test_bad_distillation_settings_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Distillation(**kwargs)


def test_a_layout_that_cannot_shrink_is_refused_before_training(tmp_path):
    module = CausalLMModule(config={"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 2, "n_head": 4})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[WandaShrinkCallback(heads=0.5, prune_on="fit_end")])
    with pytest.raises(MisconfigurationException, match=r"c_proj.*fused"):
        trainer.fit(module, loader(8, seed=1), loader(8, seed=2))
    assert trainer.global_step == 0
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", ["FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_are_refused(tmp_path, name):
    strategy = type(name, (DDPStrategy,), {})()
    trainer = make_trainer(tmp_path, max_steps=1, strategy=strategy, callbacks=[WandaShrinkCallback(mlp=0.5)])
    with pytest.raises(MisconfigurationException, match=f"does not support {name}"):
        trainer.fit(make_module(), loader(8, seed=1), loader(8, seed=2))


def test_calibration_uses_the_configured_batches_only(tmp_path):
    module = make_module()
    shrinking = WandaShrinkCallback(
        mlp=0.5, prune_on="fit_end", evaluate=False, calibration_options=CalibrationOptions(num_samples=4, batch_size=2)
    )
    make_trainer(tmp_path, max_steps=1, callbacks=[shrinking]).fit(module, loader(8, seed=1), loader(8, seed=2))
    assert (shrinking.report.num_samples, shrinking.report.num_batches) == (4, 2)
    assert CONFIG["intermediate_size"] // 2 == module.model.config.intermediate_size


class StepsOnlyLM(pl.LightningModule):
    """A causal LM module written the way many Lightning users write one: no ``forward``, everything in the steps."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("prune_on", ["fit_start", "train_step"])
def test_a_module_without_forward_is_shrunk_recovers_and_its_best_checkpoint_loads(tmp_path, prune_on):
    module = StepsOnlyLM(CONFIG)
    dense = copy.deepcopy(module.model)
    trigger = AfterStep(1) if prune_on == "train_step" else prune_on
    shrinking = WandaShrinkCallback(
        mlp=0.5, heads=0.5, prune_on=trigger, calibration_options=CalibrationOptions(num_samples=8)
    )
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss/shrunk", mode="min", every_n_train_steps=2)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[shrinking, best], enable_checkpointing=True)
    trainer.fit(module, loader(16, seed=1), loader(8, seed=2))

    # Calibrated through validation_step (the module has no forward) on the dense model at fit start: the same units
    # as shrink() through the model itself.
    if prune_on == "fit_start":
        reference = shrink(copy.deepcopy(dense), list(loader(8, seed=2)), mlp=0.5, heads=0.5, num_samples=8)
        kept = [(g.name.removeprefix("model."), g.kept_units) for g in shrinking.report.groups]
        assert kept == [(g.name, g.kept_units) for g in reference.groups]
    metrics = trainer.callback_metrics
    for name in ("val_loss/dense", "val_loss/shrunk", "val_loss/delta", "wanda/parameters", "wanda/macs_ratio"):
        assert name in metrics, name
    assert float(metrics["val_loss/delta"]) == pytest.approx(shrinking.metrics["val_loss"]["delta"])
    assert float(metrics["wanda/parameters"]) == shrinking.report.parameters_after
    # Recovery distilled from the model as it was (the teacher keeps the dense shapes), and logged its loss.
    assert shrinking.teacher is not None
    assert shrinking.teacher.model.layers[0].mlp.down_proj.in_features == 128
    assert "distill_loss" in metrics
    # The checkpoint ModelCheckpoint kept during recovery (it monitored the shrunk loss) loads back, shrunk.
    assert best.best_model_path
    loaded = load_shrunk_checkpoint(StepsOnlyLM, best.best_model_path)
    assert loaded.model.model.layers[0].mlp.down_proj.in_features == 64
    assert loaded.model.config.intermediate_size == 64
    saved = torch.load(best.best_model_path, weights_only=False)["state_dict"]
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_a_second_fit_of_the_same_callback_goes_on_distilling(tmp_path):
    module = make_module()
    shrinking = WandaShrinkCallback(
        mlp=0.5, prune_on="fit_start", evaluate=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    make_trainer(tmp_path / "a", max_steps=1, callbacks=[shrinking]).fit(module, loader(8, seed=1), loader(8, seed=2))
    teacher = shrinking.teacher
    second = make_trainer(tmp_path / "b", max_steps=2, callbacks=[shrinking])
    second.fit(module, loader(8, seed=1), loader(8, seed=2))
    assert shrinking.teacher is not None and shrinking.teacher.model.layers[0].mlp.down_proj.in_features == 128
    assert "distill_loss" in second.callback_metrics  # the training_step was distilling again
    assert teacher is not None


def test_a_state_saved_before_the_callback_base_still_loads():
    model = make_module().model
    report = shrink(model, list(loader(8, seed=2)), mlp=0.5, num_samples=8)
    old = {  # what WandaShrinkCallback.state_dict() returned before it stood on CalibratedCallback
        "version": 1,
        "shrunk": True,
        "report": report.to_dict(),
        "metrics": {"val_loss": {"dense": 4.0, "shrunk": 4.5, "delta": 0.5}},
        "when": "step 2",
    }
    shrinking = WandaShrinkCallback(mlp=0.5)
    shrinking.load_state_dict(old)
    assert shrinking.shrunk and shrinking.report.to_dict() == report.to_dict()
    assert shrinking.metrics == old["metrics"]
    assert shrinking.summary().startswith("WandaShrinkCallback: shrunk at step 2")
    assert shrinking.state_dict()["version"] == 1 and shrinking.state_dict()["shrunk"] is True


def test_reconstruction_in_the_callback_matches_shrink(tmp_path):
    module, val = make_module(), loader(8, seed=2)
    dense = make_module()
    options = Reconstruction(steps=4, learning_rate=3e-4)
    shrinking = WandaShrinkCallback(
        mlp=0.5, method="flap", update=options, prune_on="fit_start", evaluate=False, distill=False,
        calibration_options=CalibrationOptions(num_samples=8),
    )  # fmt: skip
    after = Snapshot()  # after the callback: the shrunk weights before the first step
    make_trainer(tmp_path, max_steps=1, callbacks=[shrinking, after]).fit(module, loader(4, 1), val)
    expected = shrink(dense.model, [{"input_ids": b["input_ids"]} for b in val], mlp=0.5, method="flap", update=options)
    assert shrinking.report.reconstruction_error == pytest.approx(expected.reconstruction_error, rel=1e-5)
    for name, tensor in dense.model.state_dict().items():
        torch.testing.assert_close(after.at_train_start[f"model.{name}"], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert "block reconstruction (4 steps" in shrinking.summary()


def test_depth_pruning_mid_fit_distils_resumes_and_loads(tmp_path):
    deep = dict(blocks=4, mlp=0.5, layers=0.5)
    uninterrupted, shrinking = _resumable(tmp_path / "a", max_steps=6, **deep)
    report = shrinking.report
    assert report.blocks_before == 4 and len(report.removed_blocks) == 2
    assert len(uninterrupted.model.model.layers) == 2 and uninterrupted.model.config.num_hidden_layers == 2
    assert _widths(uninterrupted)[0] == 64
    assert "4 -> 2" in shrinking.summary()

    _resumable(tmp_path / "b", max_steps=4, **deep)  # shrinks at step 2, saves at step 4 with the teacher
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["wanda_removed_blocks"] == {"model.model.layers": report.removed_blocks}
    resumed, _ = _resumable(tmp_path / "c", max_steps=6, ckpt_path=str(last), **deep)
    expected = uninterrupted.state_dict()
    assert resumed.state_dict().keys() == expected.keys()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    loaded = load_shrunk_checkpoint(CausalLMModule, last)
    assert len(loaded.model.model.layers) == 2 and loaded.model.config.num_hidden_layers == 2
    assert loaded.state_dict().keys() == saved["state_dict"].keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][name]), name


def test_a_speed_target_in_the_callback_applies_the_chosen_shape(tmp_path, monkeypatch):
    from wanda_lightning.core.speed import SpeedResult
    from wanda_lightning.width import speedup as speedup_module
    from wanda_lightning.width.speed_target import SpeedTarget

    def timer(throwaway, **kwargs):  # deterministic: decode cost grows with blocks and MLP width
        config = throwaway.config
        cost = config.num_hidden_layers * (1 + config.intermediate_size / 128) + 2
        return SpeedResult("x", 1, 0, 100.0 / cost, 100.0 / cost, None, "cpu", 1, 32, (4, 256))

    monkeypatch.setattr(speedup_module, "measure_speed", timer)
    torch.manual_seed(0)
    module = CausalLMModule(config={**CONFIG, "num_hidden_layers": 4}, learning_rate=1e-2)
    target = SpeedTarget(1.4, layers=(0.0, 0.25, 0.5), mlp=(0.0, 0.5), heads=(0.0,))
    shrinking = WandaShrinkCallback(
        speedup=target, prune_on="fit_start", evaluate=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    make_trainer(tmp_path, max_steps=1, callbacks=[shrinking]).fit(module, loader(8, seed=1), loader(8, seed=2))
    (chosen,) = [c for c in shrinking.report.candidates if c["chosen"]]
    assert chosen["meets"] and chosen["decode_speedup"] >= 1.4
    assert len(module.model.model.layers) == 4 - round(chosen["layers"] * 4)
    assert module.model.config.intermediate_size == 128 - round(chosen["mlp"] * 128)
    assert "speed target" in shrinking.summary()
