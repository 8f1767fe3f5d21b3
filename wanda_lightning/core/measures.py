"""Weight sparsity and token-level perplexity as plain torch functions, free of any training framework.

Each measure comes in three parts, as torchmetrics' functional modules do: ``*_update`` turns one input into sums,
``*_compute`` turns (accumulated) sums into the value, and the plain function does both for one input. The
torchmetrics classes in :mod:`wanda_lightning.lightning.metrics` keep the sums as their states; the model-level
:func:`wanda_lightning.data.evaluation.perplexity` accumulates them over token windows.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .layers import is_linear_layer

__all__ = ["perplexity", "perplexity_compute", "perplexity_update", "sparsity", "sparsity_compute", "sparsity_update"]

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


def sparsity_update(value: Tensor | nn.Module) -> tuple[Tensor, Tensor]:
    """Counts the exact zeros and the elements of a tensor, or of the ``nn.Linear``/``Conv1D`` weights (and the
    ``nn.MultiheadAttention`` projection weights) of a module.

    Args:
        value: A tensor, or a module whose linear weights are counted together.

    Returns:
        ``(zeros, total)`` as int64 scalars on the (first) tensor's device.

    Raises:
        TypeError: If ``value`` is neither a tensor nor a module.
        ValueError: If a module holds no linear layer.

    Example::

        >>> sparsity_update(torch.tensor([0.0, 1.0]))
        (tensor(1), tensor(2))
    """
    weights = _weights_of(value)
    device = weights[0].device
    zeros = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for weight in weights:
        zeros += (weight.detach() == 0).sum().to(device)
        total += weight.numel()
    return zeros, torch.tensor(total, dtype=torch.int64, device=device)


def sparsity_compute(zeros: Tensor, total: Tensor) -> Tensor:
    """Fraction of zeros as a float64 scalar; ``nan`` when nothing was counted.

    Args:
        zeros: Number of zeros, as :func:`sparsity_update` returns it (or a sum of those).
        total: Number of elements, likewise.

    Returns:
        ``zeros / total`` in float64.

    Example::

        >>> sparsity_compute(torch.tensor(1), torch.tensor(4))
        tensor(0.2500, dtype=torch.float64)
    """
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
    return sparsity_compute(*sparsity_update(value))


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


def perplexity_update(
    logits: Tensor, target: Tensor, attention_mask: Tensor | None = None, ignore_index: int | None = -100
) -> tuple[Tensor, Tensor]:
    """Sum of next-token negative log-likelihoods (float64) and number of scored tokens (int64).

    The logits at position ``t`` are scored against ``target[:, t + 1]``: the shift of causal language models is done
    here, so ``target`` is the same ``(B, T)`` tensor of ids that went into the model (or its ``labels``). A predicted
    token counts unless it equals ``ignore_index`` or its ``attention_mask`` is 0.

    Log-probabilities come from ``log_softmax`` in float32 (float64 for float64 logits), never from ``softmax`` then
    ``log``, so a very unlikely token gives a large finite NLL instead of ``inf``.

    Args:
        logits: ``(B, T, V)`` logits of a causal LM for ``target``.
        target: ``(B, T)`` token ids fed to the model (or its labels).
        attention_mask: Optional ``(B, T)`` mask; predicted tokens whose mask is 0 do not count.
        ignore_index: Target value that does not count; ``None`` for none.

    Returns:
        ``(total, count)``: the float64 NLL sum and the int64 number of scored tokens, on the logits' device.

    Raises:
        ValueError: If the shapes do not match.
        TypeError: If ``logits`` are not floating point or ``target`` does not hold integer ids.

    Example::

        >>> perplexity_update(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))[1]
        tensor(2)
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


def perplexity_compute(total: Tensor, count: Tensor) -> Tensor:
    """``exp(total / count)`` in float64; ``nan`` when no token was scored.

    Args:
        total: Sum of next-token NLLs, as :func:`perplexity_update` returns it (or a sum of those).
        count: Number of scored tokens, likewise.

    Returns:
        The perplexity as a float64 scalar.

    Example::

        >>> perplexity_compute(torch.tensor(0.0), torch.tensor(3))
        tensor(1., dtype=torch.float64)
    """
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
    return perplexity_compute(*perplexity_update(logits, target, attention_mask, ignore_index))
