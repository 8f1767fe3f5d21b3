"""2:4 semi-structured runtime: pattern detection and errors everywhere, the conversion itself on CUDA only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wanda_lightning import prune
from wanda_lightning.export.runtime import SemiStructuredSummary, is_2_4_sparse, to_semi_structured

CUDA_2_4 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def reference_is_2_4(weight: torch.Tensor) -> bool:
    """Slow, obvious reference: every group of 4 consecutive weights in a row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    for row in weight.tolist():
        for start in range(0, len(row), 4):
            if sum(value != 0 for value in row[start : start + 4]) > 2:
                return False
    return True


def mlp(in_features: int = 128, hidden: int = 256, out: int = 64, dtype: torch.dtype = torch.float16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out)).to(dtype)


def pruned_2_4(model: nn.Module, in_features: int = 128) -> nn.Module:
    prune(model, [torch.randn(8, in_features, dtype=next(model.parameters()).dtype)], structure="2:4", ignore=[])
    return model


@pytest.mark.parametrize("seed", range(4))
def test_is_2_4_sparse_matches_reference(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 16, generator=generator)
    weight[torch.rand(6, 16, generator=generator) < 0.6] = 0.0
    assert is_2_4_sparse(weight) == reference_is_2_4(weight)
    two_four = torch.tensor([[1.0, 0.0, 2.0, 0.0]]).repeat(6, 4)
    assert is_2_4_sparse(two_four) and reference_is_2_4(two_four)
    assert not is_2_4_sparse(torch.zeros(4, 6))  # columns not a multiple of 4


def test_model_that_is_not_2_4_is_refused_on_any_machine() -> None:
    model = mlp()
    prune(model, [torch.randn(8, 128, dtype=torch.float16)], sparsity=0.5, ignore=[])  # unstructured 50 %
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_semi_structured(model)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_semi_structured(model, dry_run=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cpu_gets_a_clear_error_and_the_model_is_unchanged() -> None:
    model = pruned_2_4(mlp())
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU with compute capability >= 8\.0"):
        to_semi_structured(model)
    assert all(type(p) is nn.Parameter and torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_dry_run_lists_what_fits_and_why_the_rest_stays_dense() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "fits": nn.Linear(128, 256),  # (256, 128): multiple of (32, 64) and (16, 16)
            "narrow": nn.Linear(64, 40),  # 40 rows: not a multiple of 16 or 32
            "dense": nn.Linear(128, 128),
        }
    ).half()
    for name in ("fits", "narrow"):
        pruned_2_4(nn.Sequential(model[name]), model[name].in_features)
    summary = to_semi_structured(model, backend="cutlass", dry_run=True)
    assert isinstance(summary, SemiStructuredSummary) and summary.backend == "cutlass"
    assert summary.converted == ["fits"]
    reasons = dict(summary.dense)
    assert "multiple of (32, 64)" in reasons["narrow"]
    assert reasons["dense"] == "not 2:4 sparse along the input dim"
    assert type(model["fits"].weight) is nn.Parameter  # a dry run changes nothing
    assert "1 layer(s) converted, 2 left dense" in str(summary)


def test_float32_2_4_model_has_nothing_to_convert() -> None:
    model = pruned_2_4(mlp(dtype=torch.float32))
    with pytest.raises(ValueError, match=r"none can be converted.*float16 or bfloat16"):
        to_semi_structured(model, dry_run=True)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`backend` must be"):
        to_semi_structured(mlp(), backend="triton")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`model` must be"):
        to_semi_structured("model")  # type: ignore[arg-type]


@pytest.mark.skipif(not CUDA_2_4, reason="needs a CUDA GPU with compute capability >= 8.0")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversion_on_gpu_keeps_the_outputs(dtype: torch.dtype) -> None:
    model = pruned_2_4(mlp(128, 256, 128, dtype=dtype)).cuda()
    inputs = torch.randn(64, 128, dtype=dtype, device="cuda")
    with torch.no_grad():
        expected = model(inputs)
    summary = to_semi_structured(model)
    assert summary.converted == ["0", "2"]
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        actual = model(inputs)
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
