"""torchmetrics ``Metric`` classes for pruned language models: weight sparsity and token-level perplexity.

Both keep only sums in their states (``dist_reduce_fx="sum"``), so that under DDP their values are those of the union
of every process's updates. Their functional forms and the ``*_update`` / ``*_compute`` helpers they share live in
the framework-free :mod:`wanda_lightning.core.measures`; ``perplexity`` and ``sparsity`` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ..core import measures

perplexity = measures.perplexity
sparsity = measures.sparsity

__all__ = ["Perplexity", "Sparsity", "measure_sparsity", "perplexity", "sparsity"]


class Sparsity(Metric):
    """Fraction of exact zeros over every tensor (or module's linear weights) it was updated with.

    As input to ``update`` the metric takes a tensor or an ``nn.Module``; a module counts the weights of all its
    ``nn.Linear`` (and transformers ``Conv1D``) layers and the projection weights of its ``nn.MultiheadAttention``
    modules, biases excluded. ``compute`` returns the float64 fraction of
    zeros among all counted elements. The states (``zeros`` and ``total``, int64) are summed across processes.

    Args:
        kwargs: Keyword arguments of :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Example::

        >>> metric = Sparsity()
        >>> metric.update(torch.tensor([0.0, 0.0, 1.0, 2.0]))
        >>> metric.update(torch.zeros(4))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    zeros: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("zeros", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, value: Tensor | nn.Module) -> None:
        """Adds the zeros and elements of ``value`` (a tensor, or a module's linear weights)."""
        zeros, total = measures.sparsity_update(value)
        self.zeros += zeros.to(self.zeros.device)
        self.total += total.to(self.total.device)

    def compute(self) -> Tensor:
        """The fraction of zeros among everything counted (float64 scalar)."""
        return measures.sparsity_compute(self.zeros, self.total)


class Perplexity(Metric):
    """Token-level perplexity of a causal LM, accumulated over batches: ``exp(sum of NLL / number of tokens)``.

    As input to ``update`` the metric takes ``logits`` ``(B, T, V)`` (any floating dtype), ``target`` ``(B, T)`` token
    ids, and optionally ``attention_mask`` ``(B, T)``. The shift by one of causal LMs is done inside: the logits at
    position ``t`` are scored against ``target[:, t + 1]``, so pass the same ids the model saw (or its ``labels``).
    Tokens equal to ``ignore_index`` or masked out by ``attention_mask`` do not count. Log-probabilities come from a
    float32 (float64 for float64 logits) ``log_softmax``, so nothing underflows; the NLL sum is kept in float64.

    ``compute`` returns a float64 scalar. States: ``total_nll`` (float64) and ``count`` (int64), summed across
    processes, so under DDP the value is the perplexity over all processes' tokens.

    Args:
        ignore_index: Target value that does not count (default -100, transformers' convention); ``None`` for none.
        kwargs: Keyword arguments of :class:`torchmetrics.Metric`.

    Raises:
        TypeError: If ``ignore_index`` is neither an int nor ``None``.

    Example::

        >>> metric = Perplexity()
        >>> metric.update(torch.zeros(2, 5, 8), torch.randint(0, 8, (2, 5)))  # uniform over 8 tokens
        >>> metric.compute()
        tensor(8.0000, dtype=torch.float64)

    In a LightningModule::

        def validation_step(self, batch, batch_idx):
            logits = self.model(input_ids=batch["input_ids"]).logits
            self.val_ppl.update(logits, batch["input_ids"], batch.get("attention_mask"))
            self.log("val_ppl", self.val_ppl)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total_nll: Tensor
    count: Tensor

    def __init__(self, ignore_index: int | None = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.add_state("total_nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, attention_mask: Tensor | None = None) -> None:
        """Adds the next-token NLL of one batch (see the class docstring for shapes and the shift)."""
        total, count = measures.perplexity_update(logits.detach(), target, attention_mask, self.ignore_index)
        self.total_nll += total.to(self.total_nll.device)
        self.count += count.to(self.count.device)

    def compute(self) -> Tensor:
        """``exp(total NLL / tokens)`` as a float64 scalar (``nan`` before any token)."""
        return measures.perplexity_compute(self.total_nll, self.count)


def measure_sparsity(weights: Mapping[str, Tensor]) -> tuple[float, dict[str, float]]:
    """Overall and per-layer sparsity of ``weights`` (by parameter name; layer names drop ``.weight``) through
    :class:`Sparsity`, whose states are summed across processes: under DDP every process holds the same weights, so the
    fractions are those of one process; under FSDP2 each holds its own rows (pass the local shards), so the sums are
    those of the whole weights.

    Example::

        >>> overall, per_layer = measure_sparsity({"fc.weight": torch.tensor([[0.0, 1.0], [0.0, 0.0]])})
        >>> overall, per_layer
        (0.75, {'fc': 0.75})
    """
    overall = Sparsity()
    per_layer: dict[str, float] = {}
    for name, weight in weights.items():
        metric = Sparsity()
        metric.update(weight.detach())
        overall.update(weight.detach())
        per_layer[name.removesuffix(".weight")] = float(metric.compute())
    return float(overall.compute()), per_layer
