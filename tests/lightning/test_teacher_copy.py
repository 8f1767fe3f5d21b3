"""The distillation teacher is one copy of the model: the callback's snapshot, adopted by the distiller. A user's own
``Distiller(teacher, student)`` copies ``teacher`` unless told to adopt it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers.trainer import loader, make_module, make_trainer

from wanda_lightning.lightning.distillation import Distillation, DistillationPhase, Distiller, student_of
from wanda_lightning.lightning.pruning_callback import WandaPruningCallback

transformers = pytest.importorskip("transformers")


@pytest.fixture
def model_copies(monkeypatch) -> list[Any]:
    """Every copy of a whole transformers model made with ``copy.deepcopy`` from here on (top-level calls only: the
    recursive ones for its parts pass a memo)."""
    made: list[Any] = []
    deepcopy = copy.deepcopy

    def counting(value: Any, memo: Any = None, *args: Any) -> Any:
        result = deepcopy(value, memo, *args)
        if memo is None and isinstance(value, transformers.PreTrainedModel):
            made.append(result)
        return result

    monkeypatch.setattr(copy, "deepcopy", counting)
    return made


def test_a_callback_that_distils_copies_the_model_once_and_distils_from_that_copy(tmp_path, model_copies):
    module = make_module()
    dense = {name: value.clone() for name, value in module.model.state_dict().items()}
    pruning = WandaPruningCallback(prune_on="fit_start", distill=True, verbose=False)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[pruning])
    trainer.fit(module, loader(8, seed=1), loader(8, seed=2))

    assert len(model_copies) == 1  # the snapshot, and nothing else
    teacher = pruning.teacher
    assert teacher is model_copies[0]
    # The copy is the model as it was before the action, frozen, and shares no memory with the trained student.
    assert all(torch.equal(value, dense[name]) for name, value in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student = {p.data_ptr() for p in module.model.parameters()}
    assert not student & {p.data_ptr() for p in teacher.parameters()}


def test_the_phase_adopts_its_snapshot(model_copies):
    module = make_module()
    phase = DistillationPhase(Distillation())
    snapshot = phase.snapshot(module)
    assert snapshot is not None and model_copies == [snapshot]
    phase.start(snapshot, module)
    try:
        assert phase.teacher is snapshot and len(model_copies) == 1
        assert not snapshot.training and not any(p.requires_grad for p in snapshot.parameters())
        assert phase.snapshot(module) is None  # already distilling: no second copy
    finally:
        phase.stop()
    assert len(model_copies) == 1


def test_a_distiller_copies_its_teacher_unless_told_to_adopt_it(model_copies):
    student = student_of(make_module(seed=1))
    teacher = student_of(make_module(seed=0))
    copied = Distiller(teacher, student)
    assert copied.teacher is not teacher and model_copies == [copied.teacher]
    assert all(p.requires_grad for p in teacher.parameters())  # the given model is left as it was

    adopted = Distiller(teacher, student, copy_teacher=False)
    assert adopted.teacher is teacher and len(model_copies) == 1
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # The same teacher either way: the same loss.
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    total_copied, kd_copied = copied.loss(logits, {"input_ids": ids})
    total_adopted, kd_adopted = adopted.loss(logits, {"input_ids": ids})
    assert torch.equal(kd_copied, kd_adopted) and torch.equal(total_copied, total_adopted)
    assert float(kd_copied) > 0  # different models: the loss can tell them apart
