"""The speed target's cost model: exact on linear timings, robust to a disturbed run, refusals."""

from __future__ import annotations

import pytest
import torch

from wanda_lightning.width.cost_model import fit_token_cost

BLOCKS = [30, 27, 24, 21, 30, 27, 24, 30, 27]
PARAMETERS = [134, 124, 113, 103, 95, 88, 81, 71, 67]


def truth(blocks: int, parameters: int) -> float:
    return 0.01 + 0.0008 * blocks + 0.0004 * parameters


def test_linear_timings_are_fitted_exactly():
    cost = fit_token_cost(BLOCKS, PARAMETERS, [truth(b, p) for b, p in zip(BLOCKS, PARAMETERS, strict=True)])
    for blocks, parameters in [(30, 134), (18, 60), (25, 100)]:
        assert cost(blocks, parameters) == pytest.approx(truth(blocks, parameters), rel=1e-9)


@pytest.mark.parametrize("slowdown", [1.05, 1.25, 1.6])
def test_one_disturbed_run_barely_moves_the_fit_where_least_squares_is_pulled(slowdown):
    seconds = [truth(b, p) for b, p in zip(BLOCKS, PARAMETERS, strict=True)]
    seconds[7] *= slowdown  # 30 blocks, 71 parameters: the run a busy machine slowed
    cost = fit_token_cost(BLOCKS, PARAMETERS, seconds)
    assert cost(30, 71) == pytest.approx(truth(30, 71), rel=1e-3)

    features = torch.tensor([[1.0, b, p] for b, p in zip(BLOCKS, PARAMETERS, strict=True)], dtype=torch.float64)
    plain = torch.linalg.lstsq(features, torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)).solution[:, 0]
    plain_error = abs(float(torch.tensor([1.0, 30, 71], dtype=torch.float64) @ plain) / truth(30, 71) - 1)
    assert plain_error > 10 * abs(cost(30, 71) / truth(30, 71) - 1)


def test_too_few_or_mismatched_timings_are_refused():
    with pytest.raises(ValueError, match="at least 4 timings, got 3"):
        fit_token_cost([30, 27, 24], [1, 2, 3], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="got 4, 4 and 3"):
        fit_token_cost([30, 27, 24, 21], [1, 2, 3, 4], [0.1, 0.2, 0.3])
