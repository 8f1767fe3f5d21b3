"""Held-out perplexity of a causal LM: token-level, accumulated in float64 from fp32 log-probabilities."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.measures import perplexity_compute, perplexity_update

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
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.int64)
    try:
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size].to(device)
            output = model(input_ids=ids)
            logits = output.logits if hasattr(output, "logits") else output
            # The same shifted, float32 log-softmax NLL as the torchmetrics metric (one implementation of the math).
            nll, tokens = perplexity_update(logits, ids, ignore_index=None)
            total += nll.cpu()
            count += tokens.cpu()
    finally:
        model.train(was_training)
    return float(perplexity_compute(total, count))
