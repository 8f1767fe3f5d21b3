"""2:4 sparsity at runtime: swap 2:4-pruned ``nn.Linear`` weights for PyTorch's semi-structured sparse tensors.

The second move after export (make the compressed state, then convert the model for runtime): on NVIDIA GPUs with
compute capability 8.0 or higher (Ampere, Hopper, Blackwell), ``torch.sparse.to_sparse_semi_structured`` stores a
2:4-sparse fp16/bf16 weight as its kept half plus metadata, and ``F.linear`` dispatches to cuSPARSELt or CUTLASS sparse
kernels. PyTorch documents 1.1-1.7x speed-ups on large matrix products; small batches can be slower.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["SemiStructuredSummary", "is_2_4_sparse", "to_semi_structured"]

Backend = Literal["auto", "cusparselt", "cutlass"]
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)


@dataclass
class SemiStructuredSummary:
    """What :func:`to_semi_structured` did (or would do, with ``dry_run=True``).

    Attributes:
        backend: ``"cusparselt"`` or ``"cutlass"``.
        converted: Names of the Linear layers whose weight is now semi-structured sparse.
        dense: ``(name, reason)`` for the Linear layers left dense.

    Example::

        >>> print(SemiStructuredSummary("cutlass", ["mlp.up"], [("lm_head", "not 2:4 sparse")]))
        2:4 semi-structured (cutlass): 1 layer(s) converted, 1 left dense
          dense lm_head: not 2:4 sparse
    """

    backend: str
    converted: list[str] = field(default_factory=list)
    dense: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"2:4 semi-structured ({self.backend}): {len(self.converted)} layer(s) converted, "
            f"{len(self.dense)} left dense"
        ]
        lines += [f"  dense {name}: {reason}" for name, reason in self.dense]
        return "\n".join(lines)


def is_2_4_sparse(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive entries along the last dim of a 2-D tensor has at least 2 zeros.

    Example::

        >>> is_2_4_sparse(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]]))
        True
        >>> is_2_4_sparse(torch.tensor([[1.0, 1.0, 0.0, 2.0]]))
        False
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nonzero = (weight != 0).view(weight.shape[0], -1, 4).sum(dim=-1)  # (rows, cols // 4)
    return bool((nonzero <= 2).all())


def _backend_class(backend: Backend) -> tuple[str, Any]:
    if backend not in ("auto", "cusparselt", "cutlass"):
        raise ValueError(f"`backend` must be 'auto', 'cusparselt' or 'cutlass', got {backend!r}")
    if backend == "auto":
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    cls = (
        torch.sparse.SparseSemiStructuredTensorCUSPARSELT
        if backend == "cusparselt"
        else torch.sparse.SparseSemiStructuredTensorCUTLASS
    )
    return backend, cls


def _shape_problem(weight: Tensor, constraints: Any) -> str | None:
    rows, cols = weight.shape
    min_rows, min_cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return (
            f"shape {tuple(weight.shape)} is not a positive multiple of ({min_rows}, {min_cols}), which this backend "
            f"needs for {weight.dtype}"
        )
    return None


def _check_cuda(weights: list[tuple[str, Tensor]]) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs a CUDA GPU with compute capability >= 8.0 (Ampere or newer): "
            f"torch.cuda.is_available() is False (torch {torch.__version__}). The 2:4 pattern itself is fine; use "
            "dry_run=True to see which layers would be converted"
        )
    off_gpu = [(name, weight.device) for name, weight in weights if not weight.is_cuda]
    if off_gpu:
        raise ValueError(
            f"2:4 layers must be on a CUDA device before conversion, found {len(off_gpu)} elsewhere "
            f"(first: {off_gpu[0][0]!r} on {off_gpu[0][1]}); call model.cuda() first"
        )
    for device in {weight.device for _, weight in weights}:
        capability = torch.cuda.get_device_capability(device)
        if capability < _MIN_CAPABILITY:
            raise RuntimeError(
                f"{torch.cuda.get_device_name(device)} ({device}) has compute capability "
                f"{capability[0]}.{capability[1]}; 2:4 semi-structured sparsity needs 8.0 or higher"
            )


def to_semi_structured(model: nn.Module, *, backend: Backend = "auto", dry_run: bool = False) -> SemiStructuredSummary:
    """Swaps the weight of every 2:4-pruned ``nn.Linear`` for a ``torch.sparse`` semi-structured tensor, in place.

    A Linear layer is converted when its weight is 2:4 sparse along the input dim, fp16 or bf16, and its shape a
    positive multiple of the backend's minimum (cuSPARSELt: 16 x 16; CUTLASS: 32 x 64, as in
    ``torch/sparse/semi_structured.py``); other Linear layers stay dense and are listed with the reason.
    Transformers' ``Conv1D`` (GPT-2) is left dense: its weight is stored ``(in, out)``. Converted weights are frozen
    (``requires_grad=False``): this is for inference.

    The model is checked for 2:4 layers before the device, so a model that is not 2:4 sparse gets that error on any
    machine.

    Args:
        model: A pruned model (``prune(model, ..., structure="2:4")``), on a CUDA device, in fp16 or bf16.
        backend: ``"auto"`` (cuSPARSELt when PyTorch has it, else CUTLASS), ``"cusparselt"`` or ``"cutlass"``.
        dry_run: Only report which layers would be converted; needs no GPU and changes nothing.

    Returns:
        A :class:`SemiStructuredSummary`.

    Raises:
        ValueError: If no Linear layer is 2:4 sparse, none of the 2:4 layers fits (dtype or shape), or they are not on
            a CUDA device.
        RuntimeError: If CUDA is not available or the GPU's compute capability is below 8.0.

    Example::

        model = model.half().cuda()
        prune(model, batches, structure="2:4")
        print(to_semi_structured(model))  # 2:4 semi-structured (cusparselt): 210 layer(s) converted, 1 left dense
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(dry_run, bool):
        raise TypeError(f"`dry_run` must be a bool, got {dry_run!r}")
    name, cls = _backend_class(backend)
    summary = SemiStructuredSummary(backend=name)
    candidates: list[tuple[str, nn.Linear]] = []
    pattern_found = False
    for module_name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            summary.dense.append((module_name, "Conv1D weights are (in, out); only nn.Linear is converted"))
            continue
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            summary.dense.append((module_name, "already semi-structured"))
            continue
        if weight.is_meta:
            summary.dense.append((module_name, "weight is on the meta device"))
            continue
        if not is_2_4_sparse(weight.detach()):
            summary.dense.append((module_name, "not 2:4 sparse along the input dim"))
            continue
        pattern_found = True
        if weight.dtype not in _SUPPORTED_DTYPES:
            summary.dense.append((module_name, f"dtype {weight.dtype} (convert the model to float16 or bfloat16)"))
            continue
        problem = _shape_problem(weight, cls._DTYPE_SHAPE_CONSTRAINTS[weight.dtype])
        if problem is not None:
            summary.dense.append((module_name, problem))
            continue
        if module.bias is not None and module.bias.dtype != weight.dtype:
            summary.dense.append((module_name, f"bias dtype {module.bias.dtype} differs from weight {weight.dtype}"))
            continue
        candidates.append((module_name, module))
    if not pattern_found:
        raise ValueError(
            "`model` is not 2:4 sparse: no nn.Linear weight has at least 2 zeros in every group of 4 input weights; "
            "prune it with structure='2:4' first"
        )
    if not candidates:
        reasons = "; ".join(f"{n}: {r}" for n, r in summary.dense[:3])
        raise ValueError(f"`model` has 2:4 layers but none can be converted ({reasons})")
    if dry_run:
        summary.converted = [module_name for module_name, _ in candidates]
        return summary
    _check_cuda([(module_name, module.weight) for module_name, module in candidates])
    for module_name, module in candidates:
        sparse = cls.from_dense(module.weight.detach().contiguous())
        module.weight = nn.Parameter(sparse, requires_grad=False)
        summary.converted.append(module_name)
    return summary
