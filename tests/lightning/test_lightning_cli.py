"""``WandaPruningCallback`` configured from YAML through ``LightningCLI`` (``trainer.callbacks`` entries)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from wanda_lightning.callback import WandaPruningCallback
from wanda_lightning.lightning.module import CausalLMModule

pytest.importorskip("jsonargparse")
pytest.importorskip("transformers")
from lightning.pytorch.cli import LightningCLI

MODEL = """
model:
  config:
    model_type: llama
    vocab_size: 128
    hidden_size: 64
    intermediate_size: 128
    num_hidden_layers: 2
    num_attention_heads: 4
    num_key_value_heads: 2
  learning_rate: 0.01
"""


class TokenData(pl.LightningDataModule):
    """Random token windows, batched as ``{"input_ids": (B, T)}``.

    Args:
        train_size: Training windows.
        val_size: Validation windows.
        batch_size: Windows per batch.
    """

    def __init__(self, train_size: int = 8, val_size: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.train_size, self.val_size, self.batch_size = train_size, val_size, batch_size

    def _loader(self, count: int, seed: int) -> DataLoader:
        ids = torch.randint(0, 128, (count, 16), generator=torch.Generator().manual_seed(seed))
        return DataLoader([{"input_ids": row} for row in ids], batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_size, 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_size, 2)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when it sees both ``args`` and pytest's own command line."""
    monkeypatch.setattr("sys.argv", ["wanda"])


def _config(tmp_path, callback: str, class_path: str = "wanda_lightning.callback.WandaPruningCallback") -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {tmp_path}
      name: logs
      version: 0
  callbacks:
    - class_path: {class_path}
      init_args:
{callback}
{MODEL}
"""
    )
    return str(path)


def test_callback_is_configured_from_yaml_and_prunes(tmp_path):
    callback = """        sparsity: 0.5
        structure: "2:4"
        prune_on:
          class_path: wanda_lightning.AfterEpoch
          init_args:
            epoch: 0
        targets: ["*.mlp.*"]
        calibration_options:
          num_samples: 8
        evaluate: 1
        calibration: val"""
    cli = LightningCLI(
        CausalLMModule,
        TokenData,
        args=["fit", "--config", _config(tmp_path, callback)],
        save_config_kwargs={"overwrite": True},
    )
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, WandaPruningCallback)]
    assert (pruning.prune_on.epoch, pruning.structure, pruning.targets) == (0, "2:4", ("*.mlp.*",))
    # Only the MLP layers were pruned, 2 of every 4, at the end of epoch 0; training went on sparse.
    assert sorted(pruning.masks) == sorted(
        f"model.model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")
    )
    parameters = dict(cli.model.named_parameters())
    for name, keep in pruning.masks.items():
        assert (keep.view(keep.shape[0], -1, 4).sum(dim=-1) == 2).all()
        assert torch.equal(parameters[name].detach() == 0, ~keep)
    assert cli.trainer.current_epoch == 2
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["wanda/sparsity"] for row in rows if row["wanda/sparsity"]] == ["0.5"]
    assert any(row.get("val_loss/delta") for row in rows)


def test_help_shows_the_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(
            CausalLMModule,
            TokenData,
            args=["fit", "--trainer.callbacks.help", "wanda_lightning.callback.WandaPruningCallback"],
        )
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--trainer.callbacks.prune_on PRUNE_ON" in text
    for mode in ("fit_end", "fit_start", "validate", "checkpoint", "AfterEpoch", "AfterStep", "Schedule"):
        assert mode in text
    assert "When to prune" in text
    assert "--trainer.callbacks.calibration_options CALIBRATION_OPTIONS" in text and "How calibration runs" in text


def test_bad_yaml_value_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(CausalLMModule, TokenData, args=["fit", "--config", _config(tmp_path, "        prune_on: later")])
    assert exit_info.value.code != 0
    assert "prune_on" in capsys.readouterr().err


def test_canonical_class_path_builds_the_callback(tmp_path):
    callback = """        sparsity: 0.6
        refine: dsnot-exact
        allocation: owl"""
    config = _config(tmp_path, callback, class_path="wanda_lightning.WandaPruningCallback")
    cli = LightningCLI(CausalLMModule, TokenData, args=["--config", config], run=False)
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, WandaPruningCallback)]
    assert (pruning.sparsity, pruning.refine, pruning.allocation) == (0.6, "dsnot-exact", "owl")


def test_admm_method_and_update_refinement_are_accepted(tmp_path):
    callback = """        method: admm
        refine: admm-update"""
    config = _config(tmp_path, callback, class_path="wanda_lightning.WandaPruningCallback")
    cli = LightningCLI(CausalLMModule, TokenData, args=["--config", config], run=False)
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, WandaPruningCallback)]
    assert (pruning.method, pruning.refine) == ("admm", "admm-update")


def test_refinement_names_are_checked_by_the_cli(tmp_path, capsys):
    config = _config(tmp_path, "        refine: dsnot-sometimes", class_path="wanda_lightning.WandaPruningCallback")
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(CausalLMModule, TokenData, args=["--config", config], run=False)
    assert exit_info.value.code != 0
    assert "refine" in capsys.readouterr().err


def test_a_schedule_is_configured_from_yaml(tmp_path):
    callback = """        sparsity: 0.7
        prune_on:
          class_path: wanda_lightning.Schedule
          init_args:
            start_step: 10
            end_step: 50
            every_n_steps: 20"""
    config = _config(tmp_path, callback, class_path="wanda_lightning.WandaPruningCallback")
    cli = LightningCLI(CausalLMModule, TokenData, args=["--config", config], run=False)
    (pruning,) = [c for c in cli.trainer.callbacks if isinstance(c, WandaPruningCallback)]
    trigger = pruning._trigger  # the callback's own copy of the Schedule
    assert (trigger.name, trigger.start_step, trigger.end_step, trigger.every_n_steps) == ("schedule", 10, 50, 20)  # type: ignore[attr-defined]
    assert trigger.steps == [30, 50]  # type: ignore[attr-defined]
    assert trigger.sparsity_at(50) == pytest.approx(0.7)  # type: ignore[attr-defined]


def test_the_shrink_callback_is_configured_from_yaml_with_nested_options(tmp_path):
    from wanda_lightning import Distillation, WandaShrinkCallback

    callback = """        mlp: 0.5
        method: flap
        prune_on:
          class_path: wanda_lightning.AfterStep
          init_args:
            step: 1
        calibration_options:
          num_samples: 4
          batch_size: 2
          offload_device: cpu
        distill:
          weight: 0.5
          temperature: 1.0
        evaluate: 1"""
    config = _config(tmp_path, callback, class_path="wanda_lightning.WandaShrinkCallback")
    cli = LightningCLI(CausalLMModule, TokenData, args=["--config", config], run=False)
    (shrinking,) = [c for c in cli.trainer.callbacks if isinstance(c, WandaShrinkCallback)]
    options = shrinking.calibration_options
    assert (options.num_samples, options.batch_size, str(options.offload_device)) == (4, 2, "cpu")
    assert shrinking.distill == Distillation(weight=0.5, temperature=1.0)
    assert (shrinking.mlp, shrinking.prune_on.step, shrinking.evaluate) == (0.5, 1, 1)
