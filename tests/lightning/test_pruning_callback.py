"""``WandaPruningCallback`` in real ``Trainer`` runs on a tiny random Llama, checked against the core ``prune()``."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers.trainer import (
    BAR,
    Snapshot,
    TokenDataset,
    assert_exactly_sparse,
    assert_masks_equal,
    clone_state,
    loader,
    logged,
    make_module,
    make_trainer,
    module_from,
    read_csv,
    reference_masks,
    reference_validation,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

import wanda_lightning.lightning.pruning_callback as callback_module
from wanda_lightning import AfterEpoch, CalibrationOptions, Reconstruction, Schedule, prune
from wanda_lightning.lightning.checkpointing import DENSE_WEIGHTS_KEY
from wanda_lightning.lightning.masks import pack_mask as _pack
from wanda_lightning.lightning.masks import unpack_mask as _unpack
from wanda_lightning.lightning.module import CausalLMModule
from wanda_lightning.lightning.pruning_callback import WandaPruningCallback
from wanda_lightning.pruning import prune_with

pytest.importorskip("transformers")

# --- prune_on="fit_end" -----------------------------------------------------------------------------------------------


@pytest.fixture
def info_logs():
    """Records what Lightning logs at INFO (its logger does not propagate to pytest's caplog when set up alone)."""
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_fit_end_prunes_after_the_last_step_and_logs_sparsity_and_deltas(tmp_path, capsys, info_logs):
    module, before = make_module(), Snapshot()
    val = loader(8, seed=2)
    pruning = WandaPruningCallback(sparsity=0.5, calibration_options=CalibrationOptions(num_samples=8))
    trainer = make_trainer(
        tmp_path, max_steps=2, callbacks=[before, pruning, TQDMProgressBar()], enable_progress_bar=True
    )
    trainer.fit(module, loader(12, seed=1), val)  # 3 batches per epoch: max_steps stops mid-epoch

    # Pruned once, right after step 2, on the validation batches: the core prune() of those weights agrees.
    dense = module_from(before.states[(0, 1)])
    expected = reference_masks(dense, list(val), sparsity=0.5, num_samples=8)
    assert_masks_equal(pruning.masks, expected)
    assert_exactly_sparse(module, pruning.masks)
    assert pruning.report is not None and pruning.report.num_samples == 8

    # Logged to the CSV logger: sparsity through the Sparsity metric, and the deltas of val_loss and val_ppl,
    # equal to the values computed here from the dense and the pruned weights.
    rows = read_csv(tmp_path)
    assert logged(rows, "wanda/sparsity") == [0.5]
    assert logged(rows, "wanda/sparsity/model.model.layers.1.mlp.down_proj") == [0.5]
    dense_values = reference_validation(dense, val)
    pruned_values = reference_validation(module_from(module.state_dict()), val)
    for name in ("val_loss", "val_ppl"):
        (found_dense,), (found_pruned,), (found_delta,) = (
            logged(rows, f"{name}/{k}") for k in ("dense", "pruned", "delta")
        )
        assert found_dense == pytest.approx(dense_values[name], rel=1e-5)
        assert found_pruned == pytest.approx(pruned_values[name], rel=1e-5)
        assert found_delta == pytest.approx(found_pruned - found_dense, abs=1e-9)
        assert found_pruned != pytest.approx(found_dense, rel=1e-7)  # pruning changed something measurable
    assert pruning.metrics["val_ppl"]["pruned"] == pytest.approx(pruned_values["val_ppl"], rel=1e-5)

    # The summary table (report + deltas) went to rank-zero info, and the progress bar followed the trainer's TQDM.
    (summary,) = [message for message in info_logs if message.startswith("WandaPruningCallback: pruned")]
    assert summary.startswith("WandaPruningCallback: pruned at end of fit")
    assert "val_ppl" in summary and "delta" in summary and "model.model.layers.0.mlp.up_proj" in summary
    assert "Wanda pruning" in capsys.readouterr().out


class RngProbe(Callback):
    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append(torch.get_rng_state())


def test_fit_end_prunes_before_the_final_validation_with_rng_isolated_and_no_bar(tmp_path, capsys):
    module, first, last = make_module(), RngProbe(), RngProbe()
    shuffled = loader(8, seed=3, shuffle=True)  # drawing its order advances the global RNG
    pruning = WandaPruningCallback(calibration=shuffled)
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[first, pruning, last])
    trainer.fit(module, loader(8, seed=1), loader(8, seed=2))

    assert pruning.pruned and trainer.global_step == 4
    # The trainer's own last validation ran on the pruned model.
    val_loss = float(trainer.callback_metrics["val_loss"])
    assert val_loss == pytest.approx(pruning.metrics["val_loss"]["pruned"], rel=1e-5)
    assert val_loss != pytest.approx(pruning.metrics["val_loss"]["dense"], rel=1e-6)
    # Calibration and evaluation left the random state as they found it.
    assert torch.equal(first.states[-1], last.states[-1])
    # enable_progress_bar=False: nothing printed by the callback.
    assert "Wanda" not in capsys.readouterr().out


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_fit_stopped_early_is_pruned_at_train_end_and_its_last_checkpoint_saved_again(tmp_path):
    module, val = make_module(), loader(8, seed=2)
    pruning = WandaPruningCallback(evaluate=False, calibration_options=CalibrationOptions(num_samples=8))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    callbacks = [pruning, StopAfterFirstEpoch(), checkpoints]
    trainer = make_trainer(tmp_path, max_epochs=5, callbacks=callbacks, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="the fit stopped before its last planned step"):
        trainer.fit(module, loader(8, seed=1), val)

    assert trainer.current_epoch == 1 and pruning.pruned
    assert_exactly_sparse(module, pruning.masks)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in module.state_dict().items():
        assert torch.equal(saved["state_dict"][name], tensor), name


# --- prune_on="train_epoch_end" and training on sparse ----------------------------------------------------------------


class SGDModule(CausalLMModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)


@pytest.mark.parametrize(
    ("cls", "states"), [(CausalLMModule, ("exp_avg", "exp_avg_sq")), (SGDModule, ("momentum_buffer",))]
)
def test_train_epoch_end_keeps_sparsity_exact_while_training_goes_on(tmp_path, cls, states):
    module, before, after = make_module(cls=cls, weight_decay=0.1), Snapshot(), Snapshot()
    val = loader(8, seed=2)
    pruning = WandaPruningCallback(
        prune_on=AfterEpoch(0), evaluate=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    callbacks = [before, pruning, after, BAR()]  # a Rich bar during fit: the callback adds its task
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=callbacks, gradient_clip_val=1.0, enable_progress_bar=True)
    trainer.fit(module, loader(8, seed=1), val)

    # Masks from the weights at the end of epoch 0.
    expected = reference_masks(module_from(before.states[(0, 1)]), list(val), num_samples=8)
    assert_masks_equal(pruning.masks, expected)
    # Two more epochs of training: kept weights moved, pruned weights are still exactly zero.
    pruned_at = after.states[(0, 1)]
    final = module.state_dict()
    assert any(not torch.equal(final[name], pruned_at[name]) for name in pruning.masks)
    assert_exactly_sparse(module, pruning.masks)
    # ... and their optimizer states hold nothing that could bring them back.
    optimizer = trainer.optimizers[0]
    parameters = dict(module.named_parameters())
    for name, keep in pruning.masks.items():
        state = optimizer.state[parameters[name]]
        for key in states:
            assert (state[key][~keep] == 0).all(), (name, key)
            assert (state[key][keep] != 0).any(), (name, key)


# --- checkpoints, resuming, loading -----------------------------------------------------------------------------------


class Crash(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _resumable_run(root: Path, seed: int = 0, crash: bool = False, ckpt_path: Path | None = None):
    module = make_module(seed=seed)
    pruning = WandaPruningCallback(
        prune_on=AfterEpoch(0), evaluate=1, calibration_options=CalibrationOptions(num_samples=8)
    )
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    callbacks: list[Callback] = [pruning, checkpoints, *([Crash()] if crash else [])]
    trainer = make_trainer(root, max_epochs=3, callbacks=callbacks, enable_checkpointing=True)
    trainer.fit(module, loader(8, seed=1), loader(8, seed=2), ckpt_path=ckpt_path)
    return module, pruning, trainer


def test_resume_after_a_crash_restores_masks_without_pruning_again(tmp_path, monkeypatch):
    reference, reference_pruning, reference_trainer = _resumable_run(tmp_path / "uninterrupted")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _resumable_run(tmp_path / "crashed", crash=True)
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    (state,) = (v for k, v in saved["callbacks"].items() if k.startswith("WandaPruningCallback"))
    assert set(state["masks"]) == set(reference_pruning.masks)
    assert all(entry["bits"].dtype == torch.uint8 for entry in state["masks"].values())  # packed, 8 per byte

    calls = []
    monkeypatch.setattr(callback_module, "prune_with", lambda *a, **k: calls.append(1) or prune_with(*a, **k))
    resumed, resumed_pruning, resumed_trainer = _resumable_run(tmp_path / "resumed", seed=123, ckpt_path=last)

    assert calls == []  # not pruned a second time
    assert resumed_pruning.report is not None and resumed_pruning.report.global_sparsity == 0.5
    assert_masks_equal(resumed_pruning.masks, reference_pruning.masks)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert_exactly_sparse(resumed, resumed_pruning.masks)
    parameters, reference_parameters = dict(resumed.named_parameters()), dict(reference.named_parameters())
    for name in reference_pruning.masks:
        found = resumed_trainer.optimizers[0].state[parameters[name]]["exp_avg"]
        expected = reference_trainer.optimizers[0].state[reference_parameters[name]]["exp_avg"]
        assert torch.equal(found, expected), name


def test_checkpoints_load_without_the_callback(tmp_path):
    module = make_module()
    pruning = WandaPruningCallback(evaluate=False, calibration_options=CalibrationOptions(num_samples=8))
    weights_only = ModelCheckpoint(dirpath=tmp_path / "weights", save_weights_only=True, save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[pruning, weights_only], enable_checkpointing=True)
    trainer.fit(module, loader(8, seed=1), loader(8, seed=2))

    loaded = CausalLMModule.load_from_checkpoint(tmp_path / "weights" / "last.ckpt")
    assert sorted(loaded.state_dict()) == sorted(module.state_dict())  # no weight_orig / weight_mask
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert_exactly_sparse(loaded, pruning.masks)

    # And in plain transformers.
    from transformers import AutoModelForCausalLM

    loaded.model.save_pretrained(tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    weight = plain.model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight == 0, ~pruning.masks["model.model.layers.0.mlp.up_proj.weight"])


def test_prune_on_checkpoint_saves_pruned_weights_and_trains_dense(tmp_path):
    module, val = make_module(), loader(8, seed=2)
    pruning = WandaPruningCallback(
        prune_on="checkpoint", evaluate=1, calibration_options=CalibrationOptions(num_samples=8)
    )
    full = ModelCheckpoint(dirpath=tmp_path / "full", filename="full")
    weights = ModelCheckpoint(
        dirpath=tmp_path / "weights", filename="weights", save_weights_only=True, every_n_train_steps=2
    )
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[pruning, full, weights], enable_checkpointing=True)
    trainer.fit(module, loader(8, seed=1), val)

    live = clone_state(module.state_dict())
    target_names = set(reference_masks(module, list(val), num_samples=8))
    # The live model is dense.
    assert not pruning.pruned
    assert all((live[name] != 0).all() for name in target_names)
    # The last full checkpoint (saved after the last step) holds the core prune() of the live weights ...
    saved = torch.load(tmp_path / "full" / "full.ckpt", weights_only=False)
    expected = copy.deepcopy(module)
    prune(expected, list(val), num_samples=8)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(saved["state_dict"][name], tensor), name
    # ... and the dense weights for resuming; the weights-only checkpoint is pruned as well.
    assert set(saved[DENSE_WEIGHTS_KEY]) == target_names
    for name in target_names:
        assert torch.equal(saved[DENSE_WEIGHTS_KEY][name], live[name]), name
    weights_only = torch.load(tmp_path / "weights" / "weights.ckpt", weights_only=False)
    assert DENSE_WEIGHTS_KEY not in weights_only
    for name in target_names:
        assert torch.equal(weights_only["state_dict"][name], saved["state_dict"][name]), name
    # Loaded without the callback: the pruned model. Sparsity was logged for each of the 2 x 2 checkpoints.
    loaded = CausalLMModule.load_from_checkpoint(tmp_path / "full" / "full.ckpt")
    assert float((loaded.model.model.layers[1].self_attn.o_proj.weight == 0).float().mean()) == 0.5
    assert logged(read_csv(tmp_path), "wanda/sparsity") == [0.5] * 4

    # Resuming with the callback continues the dense run.
    probe = Snapshot()
    resume = WandaPruningCallback(
        prune_on="checkpoint", evaluate=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    trainer = make_trainer(tmp_path / "resumed", max_epochs=3, callbacks=[resume, probe])
    trainer.fit(make_module(seed=7), loader(8, seed=1), val, ckpt_path=tmp_path / "full" / "full.ckpt")
    for name, tensor in live.items():
        assert torch.equal(probe.at_train_start[name], tensor), name


# --- prune_on="validate" ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_validate_prunes_once_and_reports(tmp_path, structure, monkeypatch):
    module, val = make_module(), loader(8, seed=2)
    dense = reference_validation(copy.deepcopy(module), val)
    expected = reference_masks(module, list(val), structure=structure, num_samples=8)
    pruning = WandaPruningCallback(
        prune_on="validate", structure=structure, calibration_options=CalibrationOptions(num_samples=8)
    )
    trainer = make_trainer(tmp_path, callbacks=[pruning, BAR()], enable_progress_bar=True)
    (results,) = trainer.validate(module, val)

    assert_masks_equal(pruning.masks, expected)
    assert_exactly_sparse(module, pruning.masks)
    if structure == "2:4":
        keep = pruning.masks["model.model.layers.0.self_attn.q_proj.weight"]
        assert (keep.view(keep.shape[0], -1, 4).sum(dim=-1) == 2).all()
    # The trainer's own validation (after pruning) agrees with the callback's "pruned" measurement.
    assert pruning.metrics["val_loss"]["dense"] == pytest.approx(dense["val_loss"], rel=1e-5)
    assert pruning.metrics["val_ppl"]["dense"] == pytest.approx(dense["val_ppl"], rel=1e-5)
    assert results["val_loss"] == pytest.approx(pruning.metrics["val_loss"]["pruned"], rel=1e-5)
    assert results["val_ppl"] == pytest.approx(pruning.metrics["val_ppl"]["pruned"], rel=1e-5)

    calls = []
    monkeypatch.setattr(callback_module, "prune_with", lambda *a, **k: calls.append(1))
    pruned = clone_state(module.state_dict())
    trainer.validate(module, val)
    assert calls == [] and all(torch.equal(module.state_dict()[k], v) for k, v in pruned.items())


# --- precision and DDP ------------------------------------------------------------------------------------------------


def test_bf16_mixed_calibrates_under_autocast(tmp_path):
    module, before, val = make_module(), Snapshot(), loader(8, seed=2)
    pruning = WandaPruningCallback(evaluate=1, calibration_options=CalibrationOptions(num_samples=8))
    trainer = make_trainer(tmp_path, max_steps=1, precision="bf16-mixed", callbacks=[before, pruning])
    trainer.fit(module, loader(8, seed=1), val)

    dense = module_from(before.latest)
    # As Lightning's bf16-mixed: autocast without its weight-cast cache (a cached cast would outlive the pruning).
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        expected = reference_masks(dense, list(val), num_samples=8)
    in_float32 = reference_masks(dense, list(val), num_samples=8)
    assert any(not torch.equal(expected[k], in_float32[k]) for k in expected)  # the test can tell them apart
    assert_masks_equal(pruning.masks, expected)
    assert_exactly_sparse(module, pruning.masks)
    assert module.model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


class RecordingPruning(WandaPruningCallback):
    """Records its calibration batches and, at the end, dumps what this process saw and decided."""

    def __init__(self, out: str, snapshot: Snapshot, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out, self.snapshot, self.seen = out, snapshot, []

    def calibration_forward(self, pl_module, batch):
        self.seen.append(batch["input_ids"].clone())
        return super().calibration_forward(pl_module, batch)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        dump = {"masks": self.masks, "seen": self.seen, "dense": self.snapshot.latest, "metrics": self.metrics}
        torch.save(dump, Path(self.out) / f"rank{trainer.global_rank}.pt")


def test_ddp_masks_are_identical_and_equal_one_process_over_the_union(tmp_path):
    snapshot = Snapshot()
    pruning = RecordingPruning(
        str(tmp_path), snapshot, calibration_options=CalibrationOptions(num_samples=None), evaluate=1
    )
    trainer = make_trainer(
        tmp_path, strategy="ddp_spawn", devices=2, max_steps=1, callbacks=[snapshot, pruning], logger=False
    )
    # 8 validation windows, batches of 4: the distributed sampler gives each process one batch.
    trainer.fit(make_module(), loader(16, seed=1), loader(8, seed=2))

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert_masks_equal(rank0["masks"], rank1["masks"])
    assert rank0["metrics"] == rank1["metrics"]
    (seen0,), (seen1,) = rank0["seen"], rank1["seen"]
    assert not torch.equal(seen0, seen1)
    union = sorted(map(tuple, torch.cat([seen0, seen1]).tolist()))
    assert union == sorted(map(tuple, TokenDataset(8, seed=2).ids.tolist()))
    for name, tensor in rank0["dense"].items():
        assert torch.equal(rank1["dense"][name], tensor), name  # DDP kept the replicas in sync
    expected = reference_masks(module_from(rank0["dense"]), [{"input_ids": seen0}, {"input_ids": seen1}])
    assert_masks_equal(rank0["masks"], expected)
    # Not what either process would have found alone.
    alone = reference_masks(module_from(rank0["dense"]), [{"input_ids": seen0}])
    assert any(not torch.equal(alone[k], expected[k]) for k in expected)


# --- data-free method, mask packing -----------------------------------------------------------------------------------


def test_magnitude_needs_no_validation_data(tmp_path):
    module = make_module()
    pruning = WandaPruningCallback(method="magnitude", sparsity=0.25, evaluate=False)
    make_trainer(tmp_path, max_steps=1, callbacks=[pruning]).fit(module, loader(8, seed=1))
    assert_exactly_sparse(module, pruning.masks, sparsity=0.25)


@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 7), (2, 3, 4)])
def test_packed_masks_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = _pack(mask)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(_unpack(packed), mask)


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_on": "epoch_end"}, r"`prune_on` must be one of \['fit_end', 'fit_start', 'validate', 'checkpoint'\]"),
        ({"calibration": "test"}, r"`calibration` must be 'val', 'train' or a DataLoader .* got 'test'"),
        ({"calibration": 3}, r"`calibration` must be 'val', 'train' or a DataLoader .* got int"),
        ({"prune_on": "train_epoch_end"}, r"`prune_on`=.train_epoch_end. needs its moment: pass prune_on=AfterEpoch"),
        ({"sparsity": 1.2}, r"`sparsity` must be in \[0, 1\), got 1.2"),
        ({"structure": "5:4"}, r"`structure` '5:4' is impossible"),
        ({"method": "random"}, r"`method` must be one of \["),
        ({"calibration_options": {"num_samples": 8}}, r"`calibration_options` must be a CalibrationOptions"),
        ({"evaluate": -1}, r"`evaluate` must be True, False or a positive number of validation batches, got -1"),
        ({"distill": 1.5}, r"`distill` must be True, False or a Distillation"),
        ({"targets": "*.mlp.*"}, r"`targets` must be a list of name patterns"),
        ({"ignore": ["re:("]}, r"`ignore` pattern 're:\(' is not a valid regular expression"),
        ({"evaluate": "yes"}, r"`evaluate` must be True, False or a positive number of validation batches, got 'yes'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        WandaPruningCallback(**kwargs)


def test_the_moment_goes_to_the_trigger_object():
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        WandaPruningCallback(prune_on="fit_end", epoch=1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, r"`num_samples` must be a positive integer or None, got 0"),
        ({"offload_device": "elsewhere"}, r"`offload_device` must be a torch device"),
        ({"forward_fn": 3}, r"`forward_fn` must be callable"),
    ],
)
def test_bad_calibration_options_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CalibrationOptions(**kwargs)


def test_the_wanda_variant_is_a_method_object_and_wanda_only():
    from wanda_lightning import Wanda

    assert WandaPruningCallback(method=Wanda(variant=True)).method == "wanda"
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'variant'"):
        WandaPruningCallback(method="magnitude", variant=True)  # type: ignore[call-arg]


def _fit_refused(root: Path, match: str, pruning: WandaPruningCallback, val: DataLoader | None, max_steps: int = 2):
    """The fit raises ``match`` and no weight changed through pruning (the training steps before it may run)."""
    module, before = make_module(), Snapshot()
    trainer = make_trainer(root, max_steps=max_steps, callbacks=[before, pruning])
    initial = clone_state(module.state_dict())
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(module, loader(8, seed=1), val)
    expected = before.latest or initial
    assert not pruning.pruned
    assert all(torch.equal(module.state_dict()[k], v) for k, v in expected.items())
    return trainer


def test_missing_validation_dataloader_is_refused_before_training(tmp_path):
    trainer = _fit_refused(
        tmp_path, r"`calibration`='val' needs a validation dataloader.*`val_dataloaders`", WandaPruningCallback(), None
    )
    assert trainer.global_step == 0


def test_empty_calibration_dataloader_is_refused_before_training(tmp_path):
    empty = DataLoader(TokenDataset(0, seed=0), batch_size=4)
    pruning = WandaPruningCallback(calibration=empty)
    trainer = _fit_refused(tmp_path, r"`calibration`=DataLoader yielded no batch", pruning, loader(8, seed=2))
    assert trainer.global_step == 0


def test_targets_matching_nothing_are_refused_before_training(tmp_path):
    trainer = _fit_refused(tmp_path, r"no layer to prune", WandaPruningCallback(targets=["*.conv"]), loader(8, seed=2))
    assert trainer.global_step == 0


def test_batches_the_forward_cannot_take_ask_for_forward_fn(tmp_path):
    tokens = DataLoader(TokenDataset(8, seed=3, key="tokens"), batch_size=4)
    _fit_refused(
        tmp_path / "a",
        r"could not run on a calibration batch.*CalibrationOptions\(forward_fn=",
        WandaPruningCallback(calibration=tokens, evaluate=False),
        None,
        max_steps=1,
    )
    # With forward_fn, the same batches work.
    module = make_module()
    pruning = WandaPruningCallback(
        calibration=tokens,
        evaluate=False,
        calibration_options=CalibrationOptions(forward_fn=lambda m, b: m(b["tokens"])),
    )
    make_trainer(tmp_path / "b", max_steps=1, callbacks=[pruning]).fit(module, loader(8, seed=1))
    assert_exactly_sparse(module, pruning.masks)


def test_train_calibration_outside_fit_is_refused(tmp_path):
    module = make_module()
    initial = clone_state(module.state_dict())
    trainer = make_trainer(tmp_path, callbacks=[WandaPruningCallback(prune_on="validate", calibration="train")])
    with pytest.raises(MisconfigurationException, match=r"`calibration`='train' needs the training dataloader"):
        trainer.validate(module, loader(8, seed=2))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in initial.items())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("XLAStrategy", "does not support the XLAStrategy strategy"),
        ("DeepSpeedStrategy", r"DeepSpeed \(Deep"),
        ("FSDPStrategy", r"needs FSDPStrategy\(use_orig_params=True\)"),
    ],
)
def test_unsupported_strategies_are_named(name, message):
    # Checked by class name (DeepSpeedStrategy subclasses DDPStrategy); the fake FSDPStrategy has use_orig_params=False.
    strategy = type(name, (DDPStrategy,), {"kwargs": {"use_orig_params": False}})()
    trainer = SimpleNamespace(strategy=strategy)
    with pytest.raises(MisconfigurationException, match=message):
        WandaPruningCallback().setup(trainer, make_module(), "fit")  # type: ignore[arg-type]


class _Mesh:
    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tensor_parallel: int) -> None:
        self.sizes = {"data_parallel": 2, "tensor_parallel": tensor_parallel}

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.sizes[name])


def _model_parallel_trainer(tensor_parallel: int) -> SimpleNamespace:
    mesh = _Mesh(tensor_parallel)
    strategy = type("ModelParallelStrategy", (DDPStrategy,), {"device_mesh": property(lambda self: mesh)})()
    return SimpleNamespace(strategy=strategy)


def test_model_parallel_with_tensor_parallelism_is_refused():
    with pytest.raises(MisconfigurationException, match=r"tensor parallelism \(`tensor_parallel_size`=2\)"):
        WandaPruningCallback().setup(_model_parallel_trainer(2), make_module(), "fit")  # type: ignore[arg-type]
    WandaPruningCallback().setup(_model_parallel_trainer(1), make_module(), "fit")  # type: ignore[arg-type]


def test_model_parallel_refuses_prune_on_checkpoint():
    callback = WandaPruningCallback(prune_on="checkpoint")
    with pytest.raises(MisconfigurationException, match=r"`prune_on`='checkpoint' works on temporary copies"):
        callback.setup(_model_parallel_trainer(1), make_module(), "fit")  # type: ignore[arg-type]


def test_model_parallel_refuses_a_schedule():
    callback = WandaPruningCallback(prune_on=Schedule(end_step=10))
    with pytest.raises(MisconfigurationException, match=r"acts again on a partly changed model.*ModelParallelStrategy"):
        callback.setup(_model_parallel_trainer(1), make_module(), "fit")  # type: ignore[arg-type]


# --- issue 5 options and the export ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(method="sparsegpt"),
        dict(method="ria", allocation="owl", refine="dsnot", sparsity=0.6),
        dict(method="wanda", refine="dsnot-exact", structure="2:4"),
        dict(method="ria-permuted", structure="2:4"),
        dict(method="admm", structure="2:4"),
        dict(method="wanda", refine="admm-update", sparsity=0.6),
    ],
)
def test_methods_allocation_and_refinement_match_the_core(tmp_path, options):
    module, val = make_module(), loader(8, seed=2)
    core = {k: v for k, v in options.items()}
    expected = reference_masks(module, list(val), num_samples=8, **core)
    pruning = WandaPruningCallback(
        prune_on="validate", evaluate=False, calibration_options=CalibrationOptions(num_samples=8), **options
    )
    make_trainer(tmp_path, callbacks=[pruning]).validate(module, val)
    assert_masks_equal(pruning.masks, expected)
    assert pruning.report is not None and pruning.report.method.startswith(options["method"].split("-")[0])
    if options.get("refine") == "dsnot-exact":
        assert pruning.report.refinement == "dsnot (exact guard)"
    if options.get("refine") == "admm-update":
        assert pruning.report.refinement == "admm-update"
    assert bool(pruning.report.permuted_layers) == (options["method"] == "ria-permuted")
    if "allocation" in options:
        assert pruning.report.allocation.startswith("owl") and pruning.report.refinement == "dsnot"
        assert sum(pruning.report.block_sparsity.values()) / 2 == pytest.approx(0.6)


def test_export_folder_writes_a_compressed_export_that_loads_back(tmp_path):
    from wanda_lightning import load_pruned

    module, val = make_module(), loader(8, seed=2)
    out = tmp_path / "export"
    pruning = WandaPruningCallback(
        prune_on="validate", evaluate=False, export=str(out), calibration_options=CalibrationOptions(num_samples=8)
    )
    make_trainer(tmp_path, callbacks=[pruning]).validate(module, val)
    assert pruning.export_summary is not None and pruning.export_summary.compressed_ratio < 0.6
    loaded = load_pruned(out)
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    rows = read_csv(tmp_path)
    assert logged(rows, "wanda/export_ratio") == [pytest.approx(pruning.export_summary.compressed_ratio)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(allocation="owls"), "allocation"),
        (dict(refine="dsnt"), "refine"),
        (dict(allocation="owl", structure="2:4"), "OWL"),
        (dict(export=3), "`export` must be a folder path, a path ending in .gguf, a GGUFExport or a list of them"),
        (dict(export=["a/", "b/"]), r"`export` names 2 folders \(\['a/', 'b/'\]\); give at most one"),
        (dict(export="out", prune_on="checkpoint"), "`export` exports the live pruned model"),
        (dict(export="small.gguf", prune_on="checkpoint"), "`export` exports the live pruned model"),
    ],
)
def test_bad_issue5_and_export_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        WandaPruningCallback(**kwargs)


def test_gpt2_conv1d_masks_follow_the_stored_layout_also_when_square(tmp_path):
    """Conv1D stores (in, out): a square weight's mask must be transposed too, or training would zero the wrong
    entries after every optimizer step."""
    torch.manual_seed(0)
    module = CausalLMModule(
        config={"model_type": "gpt2", "vocab_size": 128, "n_embd": 64, "n_layer": 1, "n_head": 4}, learning_rate=1e-2
    )
    callback = WandaPruningCallback(sparsity=0.5, prune_on=AfterEpoch(0), evaluate=False, verbose=False)
    trainer = make_trainer(tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[callback])
    trainer.fit(module, loader(8, seed=1), loader(4, seed=2))
    square = module.model.transformer.h[0].attn.c_proj.weight  # Conv1D (64, 64)
    assert square.shape[0] == square.shape[1]
    assert torch.equal(callback.masks["model.transformer.h.0.attn.c_proj.weight"], square != 0)
    # Each input column of the stored (in, out) weight feeds every output: rows of the (out, in) view are 50 % sparse.
    assert ((square.t() == 0).sum(dim=1) == 32).all()


def test_distillation_recovers_a_masked_model_with_its_masks_held(tmp_path):
    module, val = make_module(), loader(8, seed=2)
    dense = copy.deepcopy(module.model)
    pruning = WandaPruningCallback(
        prune_on="fit_start", distill=True, evaluate=1, calibration_options=CalibrationOptions(num_samples=8)
    )
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[pruning])
    trainer.fit(module, loader(16, seed=1), val)
    assert_exactly_sparse(module, pruning.masks)  # every distillation step kept the pruned weights at zero
    teacher = pruning.teacher
    assert teacher is not None  # the model at the moment of pruning: dense, frozen
    for (name, weight), (_, expected) in zip(teacher.state_dict().items(), dense.state_dict().items(), strict=True):
        assert torch.equal(weight, expected), name
    assert not any(p.requires_grad for p in teacher.parameters())
    assert logged(read_csv(tmp_path), "distill_loss")
    assert "val_loss/pruned" in trainer.callback_metrics


def test_states_of_version_1_and_2_still_load():
    import numpy as np

    keep = torch.rand(6, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    name = "model.model.layers.0.mlp.up_proj.weight"
    drop = ~keep
    msb_first = torch.from_numpy(np.packbits(drop.flatten().numpy()))  # version 1: most significant bit first
    lsb_first = torch.from_numpy(np.packbits(drop.flatten().numpy(), bitorder="little"))  # version 2
    metrics = {"val_loss": {"dense": 4.0, "pruned": 4.5, "delta": 0.5}}
    for version, bits in ((1, msb_first), (2, lsb_first)):
        pruning = WandaPruningCallback(verbose=False)
        pruning.load_state_dict(
            {
                "version": version,
                "masks": {name: {"shape": [6, 10], "bits": bits}},
                "report": None,
                "metrics": metrics,
                "global_sparsity": 0.5,
                "sparsities": {name.removesuffix(".weight"): 0.5},
            }
        )
        assert pruning.pruned and torch.equal(pruning.masks[name], keep), version
        assert pruning.metrics == metrics and pruning.global_sparsity == 0.5


def test_block_reconstruction_after_masks_is_the_cores_and_distillation_keeps_its_masks(tmp_path):
    # The recovery benchmark's `2:4-rc-kd` path: ADMM masks, each block's kept weights trained to the dense block's
    # outputs, then distillation, all inside one fit.
    module, val = make_module(), loader(8, seed=2)
    options = dict(method="admm", structure="2:4", refine=Reconstruction(steps=4, learning_rate=1e-3))
    expected = copy.deepcopy(module.model)
    prune(expected, list(val), num_samples=8, **options)
    pruning = WandaPruningCallback(
        prune_on="validate", evaluate=False, calibration_options=CalibrationOptions(num_samples=8), **options
    )
    make_trainer(tmp_path, callbacks=[pruning]).validate(module, val)
    assert pruning.report is not None and pruning.report.reconstruction is not None
    for (name, weight), (_, reference) in zip(
        module.model.state_dict().items(), expected.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(weight, reference, rtol=1e-5, atol=1e-6, msg=name)
    assert_exactly_sparse(module, pruning.masks)

    recovered, dense = make_module(), copy.deepcopy(make_module().model)
    distilling = WandaPruningCallback(
        prune_on="fit_start",
        distill=True,
        evaluate=False,
        calibration_options=CalibrationOptions(num_samples=8),
        **options,
    )
    make_trainer(tmp_path / "fit", max_steps=3, callbacks=[distilling]).fit(recovered, loader(16, seed=1), val)
    assert_exactly_sparse(recovered, distilling.masks)
    assert any(not torch.equal(a, b) for a, b in zip(recovered.model.parameters(), dense.parameters(), strict=True))
