"""torchmetrics ``Metric`` classes for pruned language models: weight sparsity and token-level perplexity.

Both keep only sums in their states (``dist_reduce_fx="sum"``), so that under DDP their values are those of the union
of every process's updates. Each has a functional form that shares its ``_update`` / ``_compute`` helpers.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ..core.layers import is_linear_layer

__all__ = ["Perplexity", "Sparsity", "perplexity", "sparsity"]

# Sequences scored per log-softmax, so that a (B, T, V) batch with a large vocabulary never makes a float32 copy of
# all its logits at once.
_ROWS_PER_CHUNK = 4


# --- sparsity ---------------------------------------------------------------------------------------------------


def _weights_of(value: Tensor | nn.Module) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, nn.Module):
        weights: list[Tensor] = []
        for module in value.modules():
            if is_linear_layer(module):
                weights.append(cast(Tensor, module.weight))
            elif isinstance(module, nn.MultiheadAttention):  # its projections (out_proj is a linear layer)
                names = (
                    ("in_proj_weight",)
                    if module._qkv_same_embed_dim
                    else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
                )
                weights += [cast(Tensor, getattr(module, name)) for name in names]
        if not weights:
            raise ValueError(
                f"`value` {type(value).__name__} holds no nn.Linear, Conv1D or MultiheadAttention to measure"
            )
        return weights
    raise TypeError(f"`value` must be a tensor or an nn.Module, got {type(value).__name__}")


def _sparsity_update(value: Tensor | nn.Module) -> tuple[Tensor, Tensor]:
    """Counts the exact zeros and the elements of a tensor, or of the ``nn.Linear``/``Conv1D`` weights (and the
    ``nn.MultiheadAttention`` projection weights) of a module.

    Returns:
        ``(zeros, total)`` as int64 scalars on the (first) tensor's device.
    """
    weights = _weights_of(value)
    device = weights[0].device
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for weight in weights:
        zeros += (weight.detach() == 0).sum().to(device)
        total += weight.numel()
    return zeros, torch.tensor(total, dtype=torch.int64, device=device)


def _sparsity_compute(zeros: Tensor, total: Tensor) -> Tensor:
    """Fraction of zeros as a float64 scalar; ``nan`` when nothing was counted."""
    return zeros.double() / total.double()


def sparsity(value: Tensor | nn.Module) -> Tensor:
    """Fraction of exact zeros in a tensor, or in the ``nn.Linear``/``Conv1D`` and ``nn.MultiheadAttention`` projection
    weights of a module (biases excluded).

    Args:
        value: A tensor, or a module whose linear weights are counted together.

    Returns:
        A float64 scalar in ``[0, 1]``.

    Raises:
        TypeError: If ``value`` is neither a tensor nor a module.
        ValueError: If a module holds no linear layer.

    Example::

        >>> sparsity(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        tensor(0.7500, dtype=torch.float64)
        >>> layer = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     layer.weight[:, :2] = 0
        >>> sparsity(nn.Sequential(layer, nn.ReLU()))
        tensor(0.5000, dtype=torch.float64)
    """
    return _sparsity_compute(*_sparsity_update(value))


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
        zeros, total = _sparsity_update(value)
        self.zeros += zeros.to(self.zeros.device)
        self.total += total.to(self.total.device)

    def compute(self) -> Tensor:
        """The fraction of zeros among everything counted (float64 scalar)."""
        return _sparsity_compute(self.zeros, self.total)


# --- perplexity -------------------------------------------------------------------------------------------------


def _check_perplexity_inputs(logits: Tensor, target: Tensor, attention_mask: Tensor | None) -> None:
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be (batch, seq, vocab), got shape {tuple(logits.shape)}")
    if target.dim() != 2 or tuple(target.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"`target` must be (batch, seq) matching `logits` {tuple(logits.shape[:2])}, got {tuple(target.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"`logits` must be a floating point tensor, got {logits.dtype}")
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"`target` must hold integer token ids, got {target.dtype}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(target.shape):
        raise ValueError(
            f"`attention_mask` must be (batch, seq) like `target` {tuple(target.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )


def _perplexity_update(
    logits: Tensor, target: Tensor, attention_mask: Tensor | None = None, ignore_index: int | None = -100
) -> tuple[Tensor, Tensor]:
    """Sum of next-token negative log-likelihoods (float64) and number of scored tokens (int64).

    The logits at position ``t`` are scored against ``target[:, t + 1]``: the shift of causal language models is done
    here, so ``target`` is the same ``(B, T)`` tensor of ids that went into the model (or its ``labels``). A predicted
    token counts unless it equals ``ignore_index`` or its ``attention_mask`` is 0.

    Log-probabilities come from ``log_softmax`` in float32 (float64 for float64 logits), never from ``softmax`` then
    ``log``, so a very unlikely token gives a large finite NLL instead of ``inf``.
    """
    _check_perplexity_inputs(logits, target, attention_mask)
    logits = logits[:, :-1]  # (B, T - 1, V): position t predicts token t + 1
    target = target[:, 1:]  # (B, T - 1)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    if attention_mask is not None:
        valid &= attention_mask[:, 1:].to(torch.bool)
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    safe_target = target.masked_fill(~valid, 0).long()  # ignored positions gather a valid index, then drop out
    for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):
        rows = slice(start, start + _ROWS_PER_CHUNK)
        log_probs = torch.log_softmax(logits[rows].to(compute_dtype), dim=-1)  # (b, T - 1, V)
        nll = -log_probs.gather(-1, safe_target[rows].unsqueeze(-1)).squeeze(-1)  # (b, T - 1)
        total += nll.masked_fill(~valid[rows], 0).double().sum()
    return total, valid.sum().to(torch.int64)


def _perplexity_compute(total: Tensor, count: Tensor) -> Tensor:
    """``exp(total / count)`` in float64; ``nan`` when no token was scored."""
    return torch.exp(total.double() / count.double())


def perplexity(
    logits: Tensor, target: Tensor, attention_mask: Tensor | None = None, ignore_index: int | None = -100
) -> Tensor:
    """Token-level perplexity of a causal language model's logits: ``exp(mean next-token NLL)``.

    Args:
        logits: ``(B, T, V)`` logits, as a causal LM returns them for ``target`` (position ``t`` predicts ``t + 1``;
            the shift by one is done here).
        target: ``(B, T)`` token ids that were fed to the model, or its labels with ``ignore_index`` where no loss is
            wanted.
        attention_mask: Optional ``(B, T)`` mask; predicted tokens whose mask is 0 (padding) do not count.
        ignore_index: Target value that does not count (default -100, as in transformers' labels); ``None`` for none.

    Returns:
        A float64 scalar (``nan`` if no token counts).

    Example::

        >>> logits = torch.zeros(1, 4, 10)  # uniform over 10 tokens
        >>> perplexity(logits, torch.tensor([[1, 2, 3, 4]]))
        tensor(10.0000, dtype=torch.float64)
        >>> perplexity(logits, torch.tensor([[1, 2, -100, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))
        tensor(10.0000, dtype=torch.float64)
    """
    return _perplexity_compute(*_perplexity_update(logits, target, attention_mask, ignore_index))


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
        total, count = _perplexity_update(logits.detach(), target, attention_mask, self.ignore_index)
        self.total_nll += total.to(self.total_nll.device)
        self.count += count.to(self.count.device)

    def compute(self) -> Tensor:
        """``exp(total NLL / tokens)`` as a float64 scalar (``nan`` before any token)."""
        return _perplexity_compute(self.total_nll, self.count)
