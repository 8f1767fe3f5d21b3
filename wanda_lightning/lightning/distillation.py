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
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import as_device, check_number, check_positive, find_pretrained
from ..width import fit_to_state_dict
from .patches import patch_method

__all__ = ["TEACHER_KEY", "Distillation", "DistillationPhase", "Distiller", "distillation_loss", "student_of"]

#: Where full checkpoints keep the teacher's weights, so that distillation resumes.
TEACHER_KEY = "wanda_teacher_state_dict"

_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
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
        copy_teacher: Distil from a copy of ``teacher`` (default); ``False`` adopts ``teacher`` itself (a copy made
            already), which is frozen and put in eval mode.

    Example::

        distiller = Distiller(dense_model, shrunk_model, weight=0.5)
        loss = distiller.loss(student_logits, batch, task_loss)
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        weight: float = 1.0,
        temperature: float = 1.0,
        device: str | torch.device | None = None,
        *,
        copy_teacher: bool = True,
    ) -> None:
        self.teacher = (copy.deepcopy(teacher) if copy_teacher else teacher).eval().requires_grad_(False)
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
        (logged as ``distill_loss``). A step that never calls the student raises. The wrapper is a
        :func:`~wanda_lightning.lightning.patches.patch_method` patch: the undo takes away exactly this one.
        """

        def training_step(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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

        return patch_method(pl_module, "training_step", training_step)


@dataclass(frozen=True)
class Distillation:
    """How a callback recovers the model after it acted: the loss, where the teacher lives, and the learning rate.

    The teacher is the model at the moment the callback acts (for post-fine-tune compression with
    ``prune_on="fit_start"``, the user's fine-tuned model). The defaults are forward KL on the logits alone at
    temperature 1, which recovered pruned models best against CE + KL, MSE and reverse KL, and against temperatures
    0.1, 0.5 and 3 (Minitron, "LLM Pruning and Distillation in Practice", Table 15 and Appendix A.3); NVIDIA
    Model-Optimizer's distillation defaults are the same (no LM loss, temperature 1). ``weight=0`` recovers with the
    task loss alone (no teacher is kept). Checked when made.

    ``learning_rate`` puts every optimizer on the recovery learning rate from the action on (see
    :mod:`~wanda_lightning.lightning.recovery_lr`): recovery needs far more than fine-tuning, about a fifth of the
    pretraining peak for ~50 % pruning (Model-Optimizer's pruning guide; 5e-4 for SmolLM2-135M, whose peak is 3e-3).
    That advice is for structured pruning; masks, which change the model far less, recovered better at a lower rate
    (50 % masks on SmolLM2-135M: 1e-4 fell faster than 5e-4 and ended lower, ``benchmarks/bench_recovery.py``).
    It warms up linearly over ``warmup_steps`` and decays along a cosine to 10 % at the fit's last step, replacing the
    module's schedulers for the rest of the fit; ``None`` (default) leaves the module's optimizers and schedulers as
    they are.

    Args:
        weight: Share of the distillation term in the loss, in ``[0, 1]`` (1: distillation alone; 0: the task loss
            alone).
        temperature: Softening temperature (> 0).
        teacher_device: Where the frozen teacher lives (say ``"cpu"``); ``None``: where the model is.
        learning_rate: The recovery learning rate (> 0), or ``None``.
        warmup_steps: Its linear warm-up, in optimizer steps (>= 1).

    Example::

        >>> Distillation().weight, Distillation().temperature
        (1.0, 1.0)
        >>> Distillation(learning_rate=5e-4).warmup_steps
        10
        >>> Distillation(temperature=0)
        Traceback (most recent call last):
        ...
        ValueError: `temperature` must be in (0, inf), got 0
    """

    weight: float = 1.0
    temperature: float = 1.0
    teacher_device: str | None = None
    learning_rate: float | None = None
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", check_number(self.weight, "weight", 0.0, 1.0, closed=True))
        temperature = check_number(self.temperature, "temperature", 0.0, float("inf"), closed=False)
        object.__setattr__(self, "temperature", temperature)
        as_device(self.teacher_device, "teacher_device")
        if self.learning_rate is not None:
            rate = check_number(self.learning_rate, "learning_rate", 0.0, float("inf"), closed=False)
            object.__setattr__(self, "learning_rate", rate)
        check_positive(self.warmup_steps, "warmup_steps", allow_none=False)

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss has a distillation term (a teacher is kept)."""
        return self.weight > 0

    @classmethod
    def resolve(cls, distill: bool | Distillation | None) -> Distillation | None:
        """``True``: the defaults; ``False``/``None``: no distillation; a :class:`Distillation` as is.

        Raises:
            TypeError: For anything else (naming ``distill``).
        """
        if distill is True:
            return cls()
        if distill is False or distill is None:
            return None
        if isinstance(distill, Distillation):
            return distill
        raise TypeError(f"`distill` must be True, False or a Distillation(...), got {distill!r}")


def student_of(pl_module: nn.Module) -> nn.Module:
    """The transformers model inside the module: what distillation trains and the teacher copies.

    Raises:
        ValueError: When the module holds none.
    """
    found = find_pretrained(pl_module)
    if found is None:
        raise ValueError(
            f"{type(pl_module).__name__} holds no transformers model: distillation needs one (its logits); pass "
            "distill=False"
        )
    return found[0]


class DistillationPhase:
    """A callback's teacher, from the moment it acts to the end of the fit: taken before the action, distilled from
    while training goes on, kept in full checkpoints (under :data:`TEACHER_KEY`) and restored on resume, even when the
    student's shapes changed since.

    Args:
        options: How to distil; ``None``: never.
    """

    def __init__(self, options: Distillation | None) -> None:
        self.options = options
        self.distiller: Distiller | None = None
        self._saved_teacher: dict[str, Any] | None = None
        self._undo: Callable[[], None] | None = None
        #: What a resumed teacher is rebuilt from instead of a copy of the student (when the student lost blocks).
        self.template: nn.Module | None = None

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher while distilling, else ``None``."""
        return self.distiller.teacher if self.distiller is not None else None

    def snapshot(self, pl_module: nn.Module) -> nn.Module | None:
        """A copy of the student as it is now, to distil from after the action; ``None`` when not distilling, or
        already distilling (the teacher of a schedule is the model before its first step)."""
        if self.options is None or not self.options.uses_teacher or self.distiller is not None:
            return None
        return copy.deepcopy(student_of(pl_module))

    def start(self, teacher: nn.Module, pl_module: pl.LightningModule) -> None:
        """Distils from ``teacher`` in every following ``training_step``."""
        assert self.options is not None
        self.distiller = Distiller(
            teacher,
            student_of(pl_module),
            weight=self.options.weight,
            temperature=self.options.temperature,
            device=self.options.teacher_device,
            copy_teacher=False,
        )
        self._undo = self.distiller.wrap_training_step(pl_module)

    def resume(self, pl_module: pl.LightningModule) -> None:
        """When training starts again after the action: goes on distilling from the teacher this phase holds (a later
        ``fit`` of the same callback), or from the one a restored checkpoint kept (resized to its saved shapes)."""
        if self.options is None or not self.options.uses_teacher or self._undo is not None:
            return
        if self.distiller is not None:
            self.start(self.distiller.teacher, pl_module)
            return
        if self._saved_teacher is None:
            return
        teacher = self.template if self.template is not None else copy.deepcopy(student_of(pl_module))
        self.template = None
        fit_to_state_dict(teacher, self._saved_teacher)
        teacher.load_state_dict(self._saved_teacher)
        self._saved_teacher = None
        self.start(teacher, pl_module)

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Puts the teacher's weights in a full checkpoint."""
        if self.distiller is not None:
            checkpoint[TEACHER_KEY] = {k: v.detach().cpu() for k, v in self.distiller.teacher.state_dict().items()}

    def load(self, checkpoint: Mapping[str, Any]) -> None:
        """Keeps a resumed checkpoint's teacher until training starts."""
        self._saved_teacher = checkpoint.get(TEACHER_KEY)

    def stop(self) -> None:
        """Undoes the ``training_step`` wrapper (the teacher is kept for :attr:`teacher`)."""
        if self._undo is not None:
            self._undo()
            self._undo = None
