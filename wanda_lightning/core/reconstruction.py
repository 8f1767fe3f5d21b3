"""Local block reconstruction: after a block lost units or weights, train what it kept to reproduce the dense block's
outputs on the calibration activations, as pure torch.

Refitting one matrix in closed form (the ``least-squares`` update) cannot reach through the MLP's non-linearity; a
window that contains it can. Training each pruned block to reproduce the dense block's outputs on calibration
activations matches post-pruning fine-tuning with an order of magnitude less data (arXiv 2510.14444), and NVIDIA
Model-Optimizer's blockwise local distillation raised pre-distillation quality the most at aggressive ratios.

:func:`reconstruct_block` is the math: Adam on the chosen parameters of one block, the mean relative squared error
against the targets over the tokens that count (relative per token, so that the few tokens of huge norm, attention
sinks, do not decide it), a cosine learning-rate decay, pruned weights held at zero, everything in float32 whatever the
block's dtype, and the weights before kept when training made the error worse.
:class:`~wanda_lightning.core.pipeline.CalibrationPipeline` runs it block by block (the dense targets come from the
dense model's own stream, the inputs from the already-reconstructed blocks before).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batches import map_tensors
from .validation import check_number, check_positive

__all__ = ["BlockFit", "Reconstruction", "reconstruct_block", "reconstruction_error"]


@dataclass(frozen=True)
class Reconstruction:
    """How each changed block is trained to reproduce the dense block's outputs (checked when made).

    One step is one calibration batch (batches are cycled), so the cost is about ``3 * steps`` forward passes of one
    block per block, against the ``num_batches`` of a dense forward pass over the calibration data; the report gives
    both times.

    Args:
        steps: Optimiser steps per block.
        learning_rate: Adam's peak learning rate, decayed along a cosine to zero over the steps.

    Example::

        >>> Reconstruction().steps
        64
        >>> Reconstruction(steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `steps` must be a positive integer, got 0
    """

    steps: int = 64
    learning_rate: float = 2e-3

    def __post_init__(self) -> None:
        check_positive(self.steps, "steps", allow_none=False)
        check_number(self.learning_rate, "learning_rate", 0.0, float("inf"), closed=False)

    def describe(self) -> str:
        """Short name for reports.

        Example::

            >>> Reconstruction().describe()
            'block reconstruction (64 steps, lr 0.002)'
        """
        return f"block reconstruction ({self.steps} steps, lr {self.learning_rate:g})"


@dataclass(frozen=True)
class BlockFit:
    """What :func:`reconstruct_block` did to one block.

    Attributes:
        error_before: Mean relative squared error of the block's output tokens before training (see
            :func:`reconstruction_error`).
        error_after: The same after training (equal to ``error_before`` when training was undone).
        kept: Whether the trained weights were kept (``False``: training made the error worse and was undone).
    """

    error_before: float
    error_after: float
    kept: bool


def reconstruction_error(output: Tensor, target: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(sum of per-token relative errors, number of tokens)`` in float32 over the tokens ``token_mask`` keeps; their
    ratio is the mean relative squared error ``||output_t - target_t||^2 / ||target_t||^2`` over tokens.

    Each token weighs alike: hidden states carry a few tokens of far larger norm (attention sinks, massive
    activations), which would otherwise decide the whole error.

    Args:
        output: ``(batch, tokens, hidden)`` the block's outputs.
        target: The dense block's outputs, same shape.
        token_mask: ``(batch, tokens)``, true where a token counts; ``None``: all.

    Example::

        >>> x = torch.ones(1, 2, 3)
        >>> [float(v) for v in reconstruction_error(2 * x, x)]
        [2.0, 2.0]
    """
    target = target.float()
    per_token = (output.float() - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)
    if token_mask is None:
        return per_token.sum(), per_token.new_tensor(float(per_token.numel()))
    weights = token_mask.to(per_token.device, torch.float32)
    return (per_token * weights).sum(), weights.sum()


def _float32(value: object) -> object:
    """``value`` with every floating-point tensor in it cast to float32."""
    return map_tensors(value, lambda tensor: tensor.float() if tensor.is_floating_point() else tensor)


def reconstruct_block(
    block: nn.Module,
    run: Callable[[nn.Module, int, Callable[[object], object]], Tensor],
    targets: Sequence[Tensor],
    token_masks: Sequence[Tensor | None],
    parameters: Sequence[nn.Parameter],
    held_zero: Sequence[Tensor | None],
    options: Reconstruction,
    sync_gradients: Callable[[list[Tensor]], None] | None = None,
) -> BlockFit:
    """Trains ``parameters`` of ``block`` so that its outputs reproduce ``targets``, in place.

    Training runs on a float32 copy when the block is in another dtype (the result is cast back); parameters not in
    ``parameters`` stay frozen; where ``held_zero`` gives a mask, those weights are zero after every step (pruned
    weights stay pruned). The error over all batches is measured before and after; when training made it worse, the
    weights before are put back.

    Args:
        block: The block (already changed by the action).
        run: ``run(module, i, cast)`` runs ``module`` (``block`` or its float32 copy) on calibration batch ``i``, with
            ``cast`` applied to the inputs, and returns its output hidden states ``(batch, tokens, hidden)``.
        targets: The dense block's outputs, one per batch.
        token_masks: Per batch, the tokens that count, or ``None``.
        parameters: Parameters of ``block`` to train.
        held_zero: Per parameter, a boolean mask of the weights that must stay zero, or ``None``.
        options: Steps and learning rate.
        sync_gradients: Sums gradients (and the measured errors) across processes in place, so that every process
            trains alike; ``None`` on one process.

    Returns:
        The error before and after, and whether the training was kept.

    Example::

        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> block = nn.Linear(4, 4)
        >>> inputs = [torch.randn(2, 3, 4)]
        >>> targets = [2 * x for x in inputs]
        >>> fit = reconstruct_block(
        ...     block, lambda m, i, cast: m(cast(inputs[i])), targets, [None], [block.weight], [None],
        ...     Reconstruction(steps=200, learning_rate=0.05),
        ... )
        >>> fit.error_after < fit.error_before, fit.kept
        (True, True)
    """
    wanted = {id(p) for p in parameters}
    names = [name for name, p in block.named_parameters() if id(p) in wanted]
    dtypes = {p.dtype for p in block.parameters()}
    work = block if dtypes == {torch.float32} else copy.deepcopy(block).float()
    cast: Callable[[object], object] = (lambda value: value) if work is block else _float32
    trained = [work.get_parameter(name) for name in names]
    held = {id(p): mask for p, mask in zip(parameters, held_zero, strict=True) if mask is not None}
    masks = {
        name: held[id(p)].to(work.get_parameter(name).device) for name, p in block.named_parameters() if id(p) in held
    }
    saved = [p.detach().clone() for p in trained]
    flags = [(p, p.requires_grad) for p in work.parameters()]

    def error() -> float:
        totals = torch.zeros(2, dtype=torch.float32)
        with torch.no_grad():
            for i, target in enumerate(targets):
                total, count = reconstruction_error(run(work, i, cast), target, token_masks[i])
                totals += torch.stack([total.cpu(), count.cpu()])
        if sync_gradients is not None:
            sync_gradients([totals])
        return float(totals[0] / totals[1].clamp_min(1.0))

    device_type = trained[0].device.type if trained else "cpu"
    try:
        # Float32 throughout, also inside a caller's autocast (a Lightning precision plugin's forward context).
        with torch.autocast(device_type, enabled=False):
            for p in work.parameters():
                p.requires_grad_(False)
            for p in trained:
                p.requires_grad_(True)
            before = error()
            optimizer = torch.optim.Adam(trained, lr=options.learning_rate)
            with torch.enable_grad():
                for step in range(options.steps):
                    for group in optimizer.param_groups:
                        group["lr"] = options.learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / options.steps))
                    i = step % len(targets)
                    total, count = reconstruction_error(run(work, i, cast), targets[i], token_masks[i])
                    (total / count.clamp_min(1.0)).backward()
                    if sync_gradients is not None:
                        sync_gradients([p.grad for p in trained if p.grad is not None])
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for name in masks:
                            work.get_parameter(name).masked_fill_(masks[name], 0.0)
            after = error()
        kept = after < before
        with torch.no_grad():
            if not kept:
                for p, value in zip(trained, saved, strict=True):
                    p.copy_(value)
            if work is not block:
                for name, p in zip(names, trained, strict=True):
                    block.get_parameter(name).copy_(p.to(block.get_parameter(name).dtype))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return BlockFit(before, after if kept else before, kept)
