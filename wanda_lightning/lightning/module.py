"""``CausalLMModule``: a small LightningModule around a Hugging Face causal LM, for fine-tuning and pruning demos."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..core import find_block_stack, find_targets
from .metrics import Perplexity

__all__ = ["CausalLMModule"]


class CausalLMModule(pl.LightningModule):
    """Fine-tunes a causal language model on batches of token ids and reports validation loss and perplexity.

    Batches are mappings with ``input_ids`` ``(B, T)`` and optionally ``attention_mask`` and ``labels`` (default: the
    ids, with padding masked out). ``forward(**batch)`` runs the wrapped model, so the module can be calibrated by
    :class:`~wanda_lightning.WandaPruningCallback` as is.

    Logged: ``train_loss`` each step; ``val_loss`` (the model's mean token loss, averaged over batches) and
    ``val_ppl`` (token-level :class:`~wanda_lightning.lightning.metrics.Perplexity` over the whole validation set)
    per epoch.

    Args:
        model: A transformers causal LM (anything returning ``.loss`` and ``.logits``). Not saved in the
            hyperparameters: pass it again to ``load_from_checkpoint`` (``CausalLMModule.load_from_checkpoint(path,
            model=model)``), or use ``config``.
        config: Instead of ``model``, the keyword arguments of a transformers config (with ``model_type``, say
            ``{"model_type": "llama", "hidden_size": 64, ...}``); the model is built from it with random weights, and
            ``load_from_checkpoint(path)`` needs nothing else.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Raises:
        ValueError: If neither or both of ``model`` and ``config`` are given.

    Example::

        model, tokenizer = load_smollm2()
        module = CausalLMModule(model, learning_rate=1e-5)
        trainer = Trainer(max_steps=8, callbacks=[WandaPruningCallback(sparsity=0.5)])
        trainer.fit(module, train_loader, val_loader)
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        config: dict[str, Any] | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if (model is None) == (config is None):
            raise ValueError("pass exactly one of `model` (a causal LM) and `config` (its transformers config kwargs)")
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            assert config is not None
            from transformers import AutoConfig, AutoModelForCausalLM

            options = dict(config)
            model_type = options.pop("model_type", None)
            if model_type is None:
                raise ValueError(f"`config` needs a 'model_type' such as 'llama', got keys {sorted(config)}")
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options))
        self.model = model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.val_ppl = Perplexity()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, **kwargs: Any
    ) -> Any:
        """Runs the wrapped model: ``self.model(input_ids=..., attention_mask=..., labels=...)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @staticmethod
    def _labels(batch: Mapping[str, Tensor]) -> Tensor:
        labels = batch.get("labels")
        if labels is not None:
            return labels
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        return ids if mask is None else ids.masked_fill(mask == 0, -100)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        output = self(batch["input_ids"], batch.get("attention_mask"), labels=self._labels(batch))
        self.log("train_loss", output.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return output.loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        labels = self._labels(batch)
        output = self(batch["input_ids"], batch.get("attention_mask"), labels=labels)
        self.val_ppl.update(output.logits, labels)
        self.log("val_loss", output.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("val_ppl", self.val_ppl, prog_bar=True)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, shards every decoder block and then the whole model with FSDP2
        (``fully_shard`` over the data-parallel mesh dimension); under any other strategy, does nothing.

        Tensor parallelism is not applied: use ``ModelParallelStrategy(tensor_parallel_size=1)``.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return  # configure_model runs again for each trainer entry point
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        stack = find_block_stack(self.model, find_targets(self.model, ignore=[])[0])
        for block in stack.blocks if stack is not None else []:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
