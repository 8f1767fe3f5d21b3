"""Recovery by distillation: the dense model's logits as a soft target while a shrunk model trains.

The loss mixes the task loss with the KL divergence between the teacher's and the student's next-token distributions
at a temperature ``T`` (scaled by ``T**2``, as Hinton et al. do, so that its gradients do not shrink with ``T``):
``(1 - weight) * task + weight * T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the tokens
that count (``attention_mask``).

:class:`Distiller` adds it to a LightningModule's ``training_step`` without the step being rewritten: it watches the
student's forward inside the step (its inputs and logits), runs the frozen teacher on the same inputs and replaces
the step's loss. Or call :meth:`Distiller.loss` in the step yourself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Distiller", "distillation_loss"]

_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0, mask: Tensor | None = None
) -> Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))`` per token, averaged over the tokens ``mask`` keeps.

    Computed in float32 whatever the logits' dtype.

    Args:
        student_logits: ``(..., vocab)`` logits of the model being trained.
        teacher_logits: ``(..., vocab)`` logits of the frozen teacher on the same inputs.
        temperature: Softening temperature ``T`` (> 0).
        mask: ``(...)`` True (or 1) where a token counts; ``None`` counts all.

    Example::

        >>> logits = torch.randn(2, 3, 5)
        >>> float(distillation_loss(logits, logits))
        0.0
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1) * temperature**2  # (...)
    if mask is None:
        return per_token.mean()
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the student returned {type(output).__name__}; expected logits or an object with `.logits`")


class Distiller:
    """A frozen teacher and the loss that pulls a student towards it.

    Args:
        teacher: The dense model (copied, frozen, put in eval mode).
        student: The model being trained (its forward is watched inside ``training_step``).
        weight: Share of the distillation term in the loss, in ``[0, 1]`` (1: distillation alone).
        temperature: Softening temperature (> 0).
        device: Where the teacher lives (say ``"cpu"`` to keep accelerator memory for the student); ``None``: where
            the student is.

    Example::

        distiller = Distiller(dense_model, shrunk_model, weight=0.5)
        loss = distiller.loss(student_logits, batch, task_loss)
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        weight: float = 1.0,
        temperature: float = 2.0,
        device: str | torch.device | None = None,
    ) -> None:
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        if device is not None:
            self.teacher.to(device)
        self.student = student
        self.weight = weight
        self.temperature = temperature
        self.device = torch.device(device) if device is not None else None

    def teacher_logits(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor:
        """The teacher's logits for the inputs the student was called with (labels left out)."""
        inputs = {k: v for k, v in kwargs.items() if k in _INPUT_KEYS}
        if self.device is not None:
            args = tuple(a.to(self.device) if isinstance(a, Tensor) else a for a in args)
            inputs = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
        with torch.no_grad():
            return _logits(self.teacher(*args, **inputs))

    def loss(
        self, student_logits: Tensor, inputs: Mapping[str, Any], task_loss: Tensor | None = None, args: tuple = ()
    ) -> tuple[Tensor, Tensor]:
        """``(total, distillation)``: the mixed loss and the distillation term alone.

        Args:
            student_logits: The student's logits for ``inputs``.
            inputs: The keyword inputs the student was called with (``input_ids``, ``attention_mask``, ...).
            task_loss: The task loss (``None``: distillation alone).
            args: Positional inputs the student was called with.
        """
        teacher = self.teacher_logits(args, inputs).to(student_logits.device)
        mask = inputs.get("attention_mask")
        kd = distillation_loss(student_logits, teacher, self.temperature, mask if isinstance(mask, Tensor) else None)
        if task_loss is None or self.weight >= 1.0:
            return kd, kd
        return (1.0 - self.weight) * task_loss + self.weight * kd, kd

    @contextmanager
    def watching(self) -> Iterator[list[tuple[tuple[Any, ...], dict[str, Any], Tensor]]]:
        """Records the student's forward calls (positional inputs, keyword inputs, logits) in the ``with`` block."""
        calls: list[tuple[tuple[Any, ...], dict[str, Any], Tensor]] = []

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            calls.append((args, kwargs, _logits(output)))

        handle = self.student.register_forward_hook(hook, with_kwargs=True)
        try:
            yield calls
        finally:
            handle.remove()

    def wrap_training_step(self, pl_module: pl.LightningModule) -> Callable[[], None]:
        """Replaces ``pl_module.training_step`` by one that distills; returns the function that undoes it.

        The wrapped step runs the original, takes the student's first forward in it, and returns the mixed loss
        (logged as ``distill_loss``). A step that never calls the student raises.
        """
        original = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            with self.watching() as calls:
                output = original(*args, **kwargs)
            if not calls:
                raise RuntimeError(
                    "distillation watches the student's forward inside training_step, and this step never called it; "
                    "call Distiller.loss(...) in the step yourself, or turn distillation off"
                )
            task = output if isinstance(output, Tensor) else output.get("loss") if isinstance(output, Mapping) else None
            student_args, student_kwargs, logits = calls[0]
            total, kd = self.loss(logits, student_kwargs, task, student_args)
            pl_module.log("distill_loss", kd.detach(), prog_bar=True)
            if isinstance(output, Mapping):
                return {**output, "loss": total}
            return total

        pl_module.training_step = training_step  # type: ignore[method-assign]
        return lambda: vars(pl_module).pop("training_step", None)
