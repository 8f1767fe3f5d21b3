"""Per-layer calibration statistics, accumulated in float32 whatever the model's dtype."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["InputNormStatistics", "LayerStatistics", "flatten_tokens"]


def flatten_tokens(inputs: Tensor, token_mask: Tensor | None, in_features: int) -> tuple[Tensor, Tensor | None]:
    """Reshapes a layer input to ``(tokens, in_features)`` and its token mask to ``(tokens,)``.

    A mask whose size does not match the number of tokens (say, a mixture-of-experts layer that receives only the
    tokens routed to it) cannot be aligned and is dropped: every token the layer receives counts.

    Example::

        >>> x, m = flatten_tokens(torch.ones(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]), 4)
        >>> x.shape, m.tolist()
        (torch.Size([6, 4]), [True, True, False, True, False, False])
    """
    tokens = inputs.reshape(-1, in_features)  # (B * T, in)
    if token_mask is None or token_mask.numel() != tokens.shape[0]:
        return tokens, None
    return tokens, token_mask.reshape(-1).to(device=tokens.device, dtype=torch.bool)


class LayerStatistics(ABC):
    """What a pruning method accumulates about one layer's inputs during calibration.

    Subclasses hold only float32/int64 *sums* in :meth:`state_tensors`, so that summing them across processes (an
    all-reduce under DDP) gives the statistics of the union of all processes' calibration data.
    """

    @abstractmethod
    def update(self, inputs: Tensor, token_mask: Tensor | None, num_sequences: int) -> None:
        """Adds one batch of inputs ``(..., in_features)``; ``token_mask`` is ``(...)``, True where a token counts."""

    @abstractmethod
    def state_tensors(self) -> list[Tensor]:
        """The tensors to sum across processes, in a fixed order."""

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Calibration tokens seen."""


class InputNormStatistics(LayerStatistics):
    """Squared L2 norm of every input feature, summed over tokens, and the sequence and token counts.

    ``mean_sq_norm[j]`` is the mean over calibration sequences of ``sum_t x_tj**2``: the reference code's
    ``scaler_row``. Wanda's score uses its square root.

    Args:
        in_features: Input features of the layer.
        device: Where the float32 sums live (the layer's device).

    Example::

        >>> stats = InputNormStatistics(2, torch.device("cpu"))
        >>> stats.update(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), None, num_sequences=1)
        >>> stats.mean_sq_norm.tolist(), stats.num_tokens
        ([10.0, 20.0], 2)
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.in_features = in_features
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)  # (in,)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # (sequences, tokens)

    def update(self, inputs: Tensor, token_mask: Tensor | None, num_sequences: int) -> None:
        tokens, mask = flatten_tokens(inputs, token_mask, self.in_features)
        squares = tokens.float().square()  # (N, in) in float32
        if mask is None:
            self.sum_sq += squares.sum(dim=0)
            num_tokens = tokens.shape[0]
        else:
            self.sum_sq += mask.to(squares.dtype) @ squares
            num_tokens = int(mask.sum())
        self.counts[0] += num_sequences
        self.counts[1] += num_tokens

    def state_tensors(self) -> list[Tensor]:
        return [self.sum_sq, self.counts]

    @property
    def num_tokens(self) -> int:
        return int(self.counts[1])

    @property
    def num_sequences(self) -> int:
        """Calibration sequences seen."""
        return int(self.counts[0])

    @property
    def mean_sq_norm(self) -> Tensor:
        """``(in_features,)`` float32: mean over sequences of the per-sequence squared norm of each feature."""
        return self.sum_sq / max(self.num_sequences, 1)
