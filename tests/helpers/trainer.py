"""Helpers that tests in several folders share: a tiny random Llama in a ``CausalLMModule``, token loaders, a
``Trainer`` that writes CSV logs, a callback that snapshots weights, and the core ``prune()`` as the reference the
callbacks are checked against."""

from __future__ import annotations

import copy
import csv
import importlib.util
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from wanda_lightning import prune
from wanda_lightning.lightning.module import CausalLMModule

CONFIG = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
SEQ_LEN = 16
# Rich comes with transformers (through typer); without it the Rich bar tests use TQDM.
BAR = RichProgressBar if importlib.util.find_spec("rich") is not None else TQDMProgressBar
NUM_LAYERS = 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head is ignored by default


class TokenDataset(Dataset):
    """Random token windows as ``{"input_ids": (T,)}`` items; ``key`` renames the field."""

    def __init__(self, count: int, seed: int, key: str = "input_ids") -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, CONFIG["vocab_size"], (count, SEQ_LEN), generator=generator)
        self.key = key

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {self.key: self.ids[index]}


def loader(count: int, seed: int, batch_size: int = 4, **kwargs: Any) -> DataLoader:
    return DataLoader(TokenDataset(count, seed), batch_size=batch_size, **kwargs)


def make_module(seed: int = 0, cls: type[CausalLMModule] = CausalLMModule, **kwargs: Any) -> CausalLMModule:
    torch.manual_seed(seed)
    return cls(config=CONFIG, learning_rate=kwargs.pop("learning_rate", 1e-2), **kwargs)


def make_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": CSVLogger(root, name="logs", version=0),
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


class Snapshot(Callback):
    """Keeps a copy of the module's state after every training batch (put it before the pruning callback to see
    the dense weights the callback pruned, after it to see the pruned ones)."""

    def __init__(self) -> None:
        self.states: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.latest: dict[str, torch.Tensor] = {}
        self.at_train_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_train_start = clone_state(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.latest = clone_state(pl_module.state_dict())
        self.states[(trainer.current_epoch, batch_idx)] = self.latest


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def module_from(state: dict[str, torch.Tensor]) -> CausalLMModule:
    module = make_module()
    module.load_state_dict(state)
    return module


def reference_masks(module: torch.nn.Module, batches: list[Any], **kwargs: Any) -> dict[str, torch.Tensor]:
    """Keep masks by parameter name from the core ``prune()`` on a copy of ``module``."""
    masks: dict[str, torch.Tensor] = {}
    prune(
        copy.deepcopy(module),
        batches,
        on_layer_pruned=lambda name, keep: masks.__setitem__(f"{name}.weight", keep.clone()),
        **kwargs,
    )
    return masks


def reference_validation(module: CausalLMModule, data: DataLoader) -> dict[str, float]:
    """``val_loss`` (batch-size-weighted mean of the model's loss) and token perplexity, computed here in float64."""
    loss_sum = size = nll = tokens = 0.0
    module.eval()
    with torch.no_grad():
        for batch in data:
            ids = batch["input_ids"]
            output = module.model(input_ids=ids, labels=ids)
            loss_sum += float(output.loss) * ids.shape[0]
            size += ids.shape[0]
            log_probs = torch.log_softmax(output.logits[:, :-1].double(), dim=-1)
            nll -= float(log_probs.gather(-1, ids[:, 1:, None]).sum())
            tokens += ids[:, 1:].numel()
    return {"val_loss": loss_sum / size, "val_ppl": math.exp(nll / tokens)}


def read_csv(root: Path) -> list[dict[str, str]]:
    with open(root / "logs" / "version_0" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def logged(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name) not in (None, "")]


def assert_masks_equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected)
    for name in expected:
        assert torch.equal(found[name].cpu(), expected[name].cpu()), name


def assert_exactly_sparse(module: torch.nn.Module, masks: dict[str, torch.Tensor], sparsity: float = 0.5) -> None:
    parameters = dict(module.named_parameters())
    assert len(masks) == NUM_LAYERS
    for name, keep in masks.items():
        weight = parameters[name].detach()
        assert torch.equal(weight == 0, ~keep), name  # zero exactly where pruned (kept weights are never 0 here)
        assert ((~keep).sum(dim=1) == int(weight.shape[1] * sparsity)).all(), name
