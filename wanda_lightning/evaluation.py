"""Held-out perplexity of a causal LM: token-level, accumulated in float64 from fp32 log-probabilities."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 8) -> float:
    """Perplexity of ``model`` over non-overlapping token windows.

    Every window is scored on its own (no context carried over); the loss is the mean next-token negative
    log-likelihood over all predicted tokens, computed from float32 logits whatever the model's dtype.

    Args:
        model: A causal LM returning ``.logits`` (or a logits tensor) for ``model(input_ids=...)``.
        windows: ``(num_windows, seqlen)`` token ids.
        batch_size: Windows per forward pass.

    Returns:
        ``exp(mean NLL)``.

    Example::

        ppl = perplexity(model, splits.heldout)
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            output = model(input_ids=ids)
            logits = output.logits if hasattr(output, "logits") else output
            logits = logits[:, :-1].float()  # (B, T - 1, V)
            targets = ids[:, 1:]
            nll = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += float(nll.double())
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
