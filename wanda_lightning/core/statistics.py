"""Per-layer calibration statistics, accumulated in float32 whatever the model's dtype."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeVar

import torch
from torch import Tensor

__all__ = [
    "GramStatistics",
    "InputNormStatistics",
    "LayerStatistics",
    "MomentStatistics",
    "expect_statistics",
    "flatten_tokens",
]


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

    An update happens in two moves so that layers fed the same input tensor (``q``/``k``/``v``, ``gate``/``up``) share
    the expensive part: :meth:`summarize` reduces one batch of inputs to a few tensors (cached by the caller per input
    tensor and statistics class), :meth:`accumulate` adds such a summary.

    Subclasses hold only float32/int64 *sums* in :meth:`state_tensors`, so that summing them across processes (an
    all-reduce under DDP) gives the statistics of the union of all processes' calibration data.
    """

    @abstractmethod
    def summarize(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
        """Reduces ``(N, in_features)`` token inputs (``mask``: ``(N,)`` bool or ``None``) to addends."""

    @abstractmethod
    def accumulate(self, summary: tuple[Tensor, ...], num_sequences: int) -> None:
        """Adds what :meth:`summarize` returned for a batch of ``num_sequences`` sequences."""

    def update(self, inputs: Tensor, token_mask: Tensor | None, num_sequences: int) -> None:
        """Adds one batch of inputs ``(..., in_features)``; ``token_mask`` is ``(...)``, True where a token counts."""
        tokens, mask = flatten_tokens(inputs, token_mask, self.in_features)
        self.accumulate(self.summarize(tokens, mask), num_sequences)

    @property
    @abstractmethod
    def in_features(self) -> int:
        """Input features of the layer."""

    @abstractmethod
    def state_tensors(self) -> list[Tensor]:
        """The tensors to sum across processes, in a fixed order."""

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Calibration tokens seen."""

    def permute_inputs(self, index: Tensor) -> None:
        """Reorders the input features as the layer's weight columns were: new feature ``j`` is old ``index[j]``.

        Needed for N:M channel permutation (:mod:`~wanda_lightning.methods.channels`); statistics that cannot follow
        raise.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot reorder its input features")


def _masked_tokens(tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, int]:
    """Float32 tokens with masked-out rows zeroed, and the number of tokens that count."""
    values = tokens.float()
    if mask is None:
        return values, tokens.shape[0]
    return values * mask.to(values.dtype).unsqueeze(1), int(mask.sum())


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
        self._in_features = in_features
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)  # (in,)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # (sequences, tokens)

    @property
    def in_features(self) -> int:
        return self._in_features

    def summarize(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
        squares = tokens.float().square()  # (N, in) in float32
        if mask is None:
            return squares.sum(dim=0), torch.tensor(tokens.shape[0])
        return mask.to(squares.dtype) @ squares, mask.sum()

    def accumulate(self, summary: tuple[Tensor, ...], num_sequences: int) -> None:
        sum_sq, num_tokens = summary
        self.sum_sq += sum_sq
        self.counts[0] += num_sequences
        self.counts[1] += num_tokens.to(self.counts.device)

    def state_tensors(self) -> list[Tensor]:
        return [self.sum_sq, self.counts]

    def permute_inputs(self, index: Tensor) -> None:
        self.sum_sq = self.sum_sq[index.to(self.sum_sq.device)]

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


class MomentStatistics(InputNormStatistics):
    """Everything :class:`InputNormStatistics` holds plus the per-feature sums: mean and variance at Wanda's cost.

    DSnoT's expected-error guard needs only these (``O(in)`` memory, one more reduction per input).

    Example::

        >>> stats = MomentStatistics(2, torch.device("cpu"))
        >>> stats.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None, num_sequences=1)
        >>> stats.mean.tolist(), stats.variance.tolist()
        ([2.0, 3.0], [1.0, 1.0])
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.sum = torch.zeros(in_features, dtype=torch.float32, device=device)  # (in,)

    def summarize(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
        values, num_tokens = _masked_tokens(tokens, mask)  # (N, in)
        return values.square().sum(dim=0), torch.tensor(num_tokens), values.sum(dim=0)

    def accumulate(self, summary: tuple[Tensor, ...], num_sequences: int) -> None:
        sum_sq, num_tokens, total = summary[:3]
        super().accumulate((sum_sq, num_tokens), num_sequences)
        self.sum += total

    def state_tensors(self) -> list[Tensor]:
        return [self.sum_sq, self.counts, self.sum]

    def permute_inputs(self, index: Tensor) -> None:
        super().permute_inputs(index)
        self.sum = self.sum[index.to(self.sum.device)]

    @property
    def mean(self) -> Tensor:
        """``(in_features,)`` mean of each input feature over tokens."""
        return self.sum / max(self.num_tokens, 1)

    @property
    def variance(self) -> Tensor:
        """``(in_features,)`` population variance of each input feature over tokens."""
        return (self.sum_sq / max(self.num_tokens, 1) - self.mean.square()).clamp_min(0.0)


class GramStatistics(MomentStatistics):
    """Everything :class:`MomentStatistics` holds plus the input Gram matrix.

    ``gram = sum_t x_t x_t^T`` (float32, ``(in, in)``) is SparseGPT's Hessian up to a constant factor and gives the
    exact reconstruction error ``||dW X||^2 = sum_r dW_r gram dW_r^T``; ``sum`` and the Gram diagonal give the
    per-feature mean and variance that DSnoT uses.

    Example::

        >>> stats = GramStatistics(2, torch.device("cpu"))
        >>> stats.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None, num_sequences=1)
        >>> stats.gram.tolist(), stats.mean.tolist()
        ([[10.0, 14.0], [14.0, 20.0]], [2.0, 3.0])
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        super().__init__(in_features, device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # (in, in)

    def summarize(self, tokens: Tensor, mask: Tensor | None) -> tuple[Tensor, ...]:
        values, num_tokens = _masked_tokens(tokens, mask)  # (N, in)
        gram = values.t() @ values  # (in, in)
        return torch.diagonal(gram).clone(), torch.tensor(num_tokens), values.sum(dim=0), gram

    def accumulate(self, summary: tuple[Tensor, ...], num_sequences: int) -> None:
        super().accumulate(summary[:3], num_sequences)
        self.gram += summary[3]

    def state_tensors(self) -> list[Tensor]:
        return [self.sum_sq, self.counts, self.sum, self.gram]

    def permute_inputs(self, index: Tensor) -> None:
        super().permute_inputs(index)
        index = index.to(self.gram.device)
        self.gram = self.gram[index][:, index]


Statistics = TypeVar("Statistics", bound=LayerStatistics)


def expect_statistics(
    statistics: LayerStatistics | None, kind: type[Statistics], user: str, what: str | None = None
) -> Statistics:
    """``statistics`` as a ``kind``, checked: what a method's ``score`` does first with the statistics it asked for.

    Args:
        statistics: What calibration gathered for the layer (``None`` when nothing was gathered).
        kind: The statistics class ``user`` needs (a subclass also passes).
        user: Who needs them, named in the error (``"Wanda"``).
        what: How the error names ``kind`` (default: its class name).

    Raises:
        TypeError: If ``statistics`` is not a ``kind``.

    Example::

        >>> expect_statistics(None, InputNormStatistics, "Wanda")
        Traceback (most recent call last):
        ...
        TypeError: Wanda needs InputNormStatistics from calibration
    """
    if not isinstance(statistics, kind):
        raise TypeError(f"{user} needs {what or kind.__name__} from calibration")
    return statistics
