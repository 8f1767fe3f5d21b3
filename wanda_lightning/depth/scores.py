"""How much a block (or a run of consecutive blocks) changes the hidden states it is given, measured over calibration
tokens, in float32: the scores depth pruning ranks blocks by. Pure torch.

- ``"influence"`` (ShortGPT's block influence, Men et al. 2024): ``1 - cos(x_in, x_out)`` averaged over the counted
  tokens, per block; the blocks that change their input least are removed, wherever they are.
- ``"angular"`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): ``arccos(cos) / pi``
  between the input of block ``l`` and the output of block ``l + n - 1``, averaged over the counted tokens (the paper
  uses the last token; every token is used here, as for the influence); the run of ``n`` consecutive blocks with the
  smallest distance is removed.

Example::

    >>> import torch
    >>> x = torch.randn(2, 5, 8)
    >>> scorer = DepthScorer(num_blocks=3, span=1, score="influence")
    >>> scorer.observe(0, [x], [x], [None])        # block 0 leaves its input as it is
    >>> scorer.observe(1, [x], [-x], [None])       # block 1 flips it
    >>> scorer.observe(2, [-x], [x + 1], [None])
    >>> [round(score, 4) + 0.0 for score in scorer.scores()[:2].tolist()]  # + 0.0: no -0.0 from rounding
    [0.0, 2.0]
    >>> choose_blocks(scorer.scores(), 1, "influence")
    [0]
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LAYER_SCORES", "DepthScorer", "LayerScore", "choose_blocks", "token_cosines", "token_distances"]

LayerScore = Literal["influence", "angular"]
LAYER_SCORES: tuple[str, ...] = get_args(LayerScore)


def token_cosines(first: Tensor, second: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Cosine similarity of two ``(..., hidden)`` hidden states token by token, in float32, over the tokens that count.

    Args:
        first: Hidden states, ``(batch, seq, hidden)`` (or any leading shape).
        second: Same shape.
        token_mask: ``(batch, seq)`` boolean mask of the tokens that count, or ``None`` (all).

    Returns:
        A 1-D tensor: one cosine per counted token.

    Example::

        >>> token_cosines(torch.ones(1, 2, 3), -torch.ones(1, 2, 3)).round().tolist()
        [-1.0, -1.0]
    """
    if first.shape != second.shape:
        raise ValueError(f"hidden states of different shapes: {tuple(first.shape)} and {tuple(second.shape)}")
    cosines = F.cosine_similarity(first.float(), second.float(), dim=-1, eps=1e-8)
    if token_mask is not None:
        cosines = cosines[token_mask.to(cosines.device).bool()]
    return cosines.flatten()


def token_distances(cosines: Tensor, score: str) -> Tensor:
    """The per-token distance ``score`` takes from cosines: ``1 - cos`` (``"influence"``) or ``arccos(cos) / pi``
    (``"angular"``, in ``[0, 1]``).

    Example::

        >>> token_distances(torch.tensor([1.0, 0.0, -1.0]), "angular").tolist()
        [0.0, 0.5, 1.0]
    """
    if score == "influence":
        return 1.0 - cosines
    if score == "angular":
        return torch.arccos(cosines.clamp(-1.0, 1.0)) / math.pi
    raise ValueError(f"`layer_score` must be one of {list(LAYER_SCORES)}, got {score!r}")


class DepthScorer:
    """Accumulates, block after block, the mean distance between the input of a run of ``span`` consecutive blocks
    and its output, for every run start; fed by :meth:`~wanda_lightning.core.pipeline.CalibrationPipeline.trace`.

    Args:
        num_blocks: Blocks in the stack.
        span: Consecutive blocks per run (1: each block alone).
        score: ``"influence"`` or ``"angular"`` (:func:`token_distances`).

    Attributes:
        sums: Summed distances per run start, float64 (all-reduce it with ``counts`` across processes).
        counts: Counted tokens per run start.
    """

    def __init__(self, num_blocks: int, span: int, score: str) -> None:
        if not 1 <= span <= num_blocks:
            raise ValueError(f"a run of {span} blocks does not fit in {num_blocks}")
        token_distances(torch.ones(1), score)  # validates the name
        self.span = span
        self.score = score
        self.sums = torch.zeros(num_blocks - span + 1, dtype=torch.float64)
        self.counts = torch.zeros(num_blocks - span + 1, dtype=torch.float64)
        self._inputs: deque[list[Tensor]] = deque(maxlen=span)

    def observe(self, index: int, inputs: list[Tensor], outputs: list[Tensor], masks: list[Tensor | None]) -> None:
        """Takes block ``index``'s inputs and outputs (one entry per batch); blocks must come in order."""
        self._inputs.append(inputs)
        start = index + 1 - self.span
        if start < 0:
            return
        for first, last, mask in zip(self._inputs[0], outputs, masks, strict=True):
            distances = token_distances(token_cosines(first, last, mask), self.score)
            self.sums[start] += distances.double().sum().cpu()
            self.counts[start] += distances.numel()

    def scores(self) -> Tensor:
        """Mean distance per run start (``NaN`` where no token counted)."""
        return self.sums / self.counts


def choose_blocks(scores: Tensor, count: int, score: str) -> list[int]:
    """The ``count`` blocks to remove, in increasing order.

    ``"influence"``: ``scores`` has one entry per block; the ``count`` lowest go (ties: the later block).
    ``"angular"``: ``scores`` has one entry per start of a run of ``count`` blocks; the run with the lowest goes
    (ties: the later run).

    Raises:
        ValueError: When a score is not finite (no calibration token counted) or the sizes do not match.

    Example::

        >>> choose_blocks(torch.tensor([0.3, 0.1, 0.2, 0.5]), 2, "influence")
        [1, 2]
        >>> choose_blocks(torch.tensor([0.3, 0.1, 0.2]), 2, "angular")
        [1, 2]
    """
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"block scores are not finite ({scores.tolist()}): no calibration token counted")
    # Reversed so that, among equal scores, the later block or run is the one removed (later blocks matter less).
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), -i))
    if score == "influence":
        if not 0 < count < len(scores):
            raise ValueError(f"cannot remove {count} of {len(scores)} blocks")
        return sorted(order[:count])
    if score == "angular":
        start = order[0]
        return list(range(start, start + count))
    raise ValueError(f"`layer_score` must be one of {list(LAYER_SCORES)}, got {score!r}")
