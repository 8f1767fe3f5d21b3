"""A per-token cost model fitted to every timing of a speed-target search, so that one disturbed run does not decide
which shapes are looked at again (:func:`fit_token_cost`).

On a busy CPU single timings of one shape differ by up to 20 % (SmolLM2-135M, 2 cores: ``mlp=0.8`` read 1.24x in
its first run and 1.52x in turns with the dense model). Each timing is one noisy reading; all of them together pin
down how the time per token grows with the blocks and the parameters a shape keeps, which at batch 1 is close to
linear (every block costs its kernel launches and cache work, every weight is read once per token). The fit is robust
(Huber weights, re-estimated scale), so the disturbed readings count little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["fit_token_cost"]

#: Huber's constant: residuals up to this many robust standard deviations count fully (95 % efficiency on clean data).
_HUBER = 1.345
_ITERATIONS = 20


def fit_token_cost(
    blocks: Sequence[int], parameters: Sequence[int], seconds_per_token: Sequence[float]
) -> Callable[[int, int], float]:
    """Fits ``seconds per token = a + b * blocks + c * parameters`` to timed shapes, robustly.

    Iteratively reweighted least squares with Huber weights on the relative residuals, their scale re-estimated from
    the median absolute residual at each step; float64 throughout.

    Args:
        blocks: Decoder blocks of each timed shape.
        parameters: Parameters of each timed shape.
        seconds_per_token: The measured time per token of each (1 / tokens per second).

    Returns:
        A function of (blocks, parameters) giving the fitted seconds per token.

    Raises:
        ValueError: With fewer than four timings (three coefficients need at least one reading to spare), or lengths
            that differ.

    Example::

        >>> cost = fit_token_cost([30, 24, 30, 24], [100, 90, 60, 50], [0.1, 0.09, 0.08, 0.07])
        >>> round(cost(27, 70), 4)
        0.0825
    """
    if not len(blocks) == len(parameters) == len(seconds_per_token):
        raise ValueError(
            f"`blocks`, `parameters` and `seconds_per_token` must have one entry per timing, got {len(blocks)}, "
            f"{len(parameters)} and {len(seconds_per_token)}"
        )
    if len(blocks) < 4:
        raise ValueError(f"a token cost model needs at least 4 timings, got {len(blocks)}")
    scale_parameters = max(float(max(parameters)), 1.0)  # keeps the columns of one magnitude for the solve
    features = torch.tensor(
        [[1.0, float(b), float(p) / scale_parameters] for b, p in zip(blocks, parameters, strict=True)],
        dtype=torch.float64,
    )
    seconds = torch.tensor([float(s) for s in seconds_per_token], dtype=torch.float64)
    weights = torch.ones_like(seconds)
    coefficients = torch.zeros(3, dtype=torch.float64)
    for _ in range(_ITERATIONS):
        root = weights.sqrt().unsqueeze(1)
        coefficients = torch.linalg.lstsq(features * root, seconds.unsqueeze(1) * root, driver="gelsd").solution[:, 0]
        fitted = features @ coefficients
        relative = (seconds - fitted) / fitted.abs().clamp_min(1e-12)
        spread = 1.4826 * relative.abs().median()  # the median absolute residual as a standard deviation
        if float(spread) == 0.0:
            break
        weights = (_HUBER * spread / relative.abs().clamp_min(1e-12)).clamp(max=1.0)

    def cost(block_count: int, parameter_count: int) -> float:
        row = torch.tensor([1.0, float(block_count), float(parameter_count) / scale_parameters], dtype=torch.float64)
        return float(row @ coefficients)

    return cost
