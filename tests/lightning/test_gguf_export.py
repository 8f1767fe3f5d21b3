"""The callbacks' ``export=`` writes GGUF files for llama.cpp: when they act and again after the fit's training, from
the model the module holds; refused early when the file would have no vocabulary."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers.trainer import loader, make_module, make_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from wanda_lightning import AfterStep, CalibrationOptions, GGUFExport, WandaPruningCallback, WandaShrinkCallback

OPTIONS = CalibrationOptions(num_samples=8)


def logits_of_gguf(path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model(input_ids=torch.arange(16)[None]).logits


def logits_of(module) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module.model(input_ids=torch.arange(16)[None]).logits


def test_the_pruning_callback_writes_the_pruned_model_as_gguf(tmp_path):
    path = tmp_path / "pruned.gguf"
    module = make_module()
    pruning = WandaPruningCallback(
        prune_on="validate",
        evaluate=False,
        calibration_options=OPTIONS,
        export=GGUFExport(str(path), dtype="f32", tokenizer="placeholder"),
    )
    make_trainer(tmp_path, callbacks=[pruning]).validate(module, loader(8, seed=2))
    assert path.exists() and (tmp_path / "Modelfile").exists()
    assert (logits_of_gguf(path) - logits_of(module)).abs().max() <= 1e-4


def test_the_shrink_callback_writes_gguf_when_it_acts_and_after_recovery(tmp_path, monkeypatch):
    written: list[int] = []
    original = GGUFExport.save

    def save(self, model, tokenizer=None):
        written.append(sum(p.numel() for p in model.parameters()))
        return original(self, model, tokenizer)

    monkeypatch.setattr(GGUFExport, "save", save)
    path = tmp_path / "small.gguf"
    module = make_module()
    dense_parameters = sum(p.numel() for p in module.model.parameters())
    shrinking = WandaShrinkCallback(
        mlp=0.5,
        prune_on=AfterStep(1),
        evaluate=False,
        multiple_of=1,
        calibration_options=OPTIONS,
        export=[str(tmp_path / "small"), GGUFExport(str(path), dtype="f32", tokenizer="placeholder")],
    )
    make_trainer(tmp_path, max_steps=3, callbacks=[shrinking]).fit(module, loader(16, seed=1), loader(8, seed=2))
    # Written twice: as shrunk (step 1) and after the two steps of recovery; both smaller than the dense model.
    assert len(written) == 2 and all(count < dense_parameters for count in written)
    assert (logits_of_gguf(path) - logits_of(module)).abs().max() <= 1e-4  # the file holds the recovered model
    assert (tmp_path / "small" / "config.json").exists()


def test_a_gguf_export_without_a_vocabulary_is_refused_before_training(tmp_path):
    pruning = WandaPruningCallback(prune_on="fit_end", evaluate=False, export=str(tmp_path / "x.gguf"))
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(
        MisconfigurationException, match="`export` writes a GGUF file, which needs the model's tokenizer"
    ):
        make_trainer(tmp_path, max_steps=2, callbacks=[pruning]).fit(module, loader(16, seed=1), loader(8, seed=2))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # not trained, not pruned
    assert not (tmp_path / "x.gguf").exists()
