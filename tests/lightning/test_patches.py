"""One mechanism patches the user's module (:mod:`wanda_lightning.lightning.patches`): each patch is undone exactly,
patches of the same method stack and come off in any order, and the four wrappers the callbacks install use it."""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from wanda_lightning.lightning.checkpointing import unwrap_saves, wrap_weights_only_saves
from wanda_lightning.lightning.distillation import Distiller
from wanda_lightning.lightning.evaluation import LogCapture, quiet_steps
from wanda_lightning.lightning.patches import patch_method, patched, remove_patches
from wanda_lightning.lightning.shrunk_checkpoints import unwrap_loads, wrap_loads


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.saved: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self(batch).sum()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.saved.append("module")


def _tag(tag: str) -> Any:
    """A wrapper that appends ``tag`` to what the method beneath returns."""
    return lambda original, *args: [*original(*args), tag]


class Tagged:
    def tags(self) -> list[str]:
        return ["class"]


def test_a_patch_is_undone_exactly():
    owner = Tagged()
    before = dict(vars(owner))
    undo = patch_method(owner, "tags", _tag("a"))
    assert owner.tags() == ["class", "a"] and Tagged().tags() == ["class"]  # the instance only
    undo()
    assert vars(owner) == before and owner.tags() == ["class"] and Tagged.tags is Tagged.__dict__["tags"]
    undo()  # twice: nothing
    assert vars(owner) == before


def test_an_instance_attribute_the_user_set_comes_back_as_the_same_object():
    owner = Tagged()
    own = lambda: ["own"]  # noqa: E731
    owner.tags = own  # type: ignore[method-assign]
    undo = patch_method(owner, "tags", _tag("a"))
    assert owner.tags() == ["own", "a"]
    undo()
    assert vars(owner)["tags"] is own


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_stacked_patches_come_off_in_any_order_without_losing_the_others(order):
    owner = Tagged()
    undos = [patch_method(owner, "tags", _tag(tag)) for tag in "abc"]
    assert owner.tags() == ["class", "a", "b", "c"]  # the newest runs first, on what the ones beneath return
    left = ["a", "b", "c"]
    for index in order:
        undos[index]()
        left.remove("abc"[index])
        assert owner.tags() == ["class", *left]
    assert vars(owner) == {}


def test_a_method_replaced_by_someone_else_meanwhile_stays_replaced():
    owner = Tagged()
    undo = patch_method(owner, "tags", _tag("a"))
    ours = owner.tags
    owner.tags = lambda: [*ours(), "foreign"]  # type: ignore[method-assign]
    undo()
    assert owner.tags() == ["class", "foreign"]  # ours passes through; theirs is not thrown away


def test_remove_patches_takes_away_one_label_only():
    owner = Tagged()
    patch_method(owner, "tags", _tag("a"), label="mine")
    undo_theirs = patch_method(owner, "tags", _tag("b"))
    patch_method(owner, "tags", _tag("c"), label="mine")
    assert remove_patches(owner, "tags", "mine") == 2 and owner.tags() == ["class", "b"]
    undo_theirs()
    assert vars(owner) == {} and remove_patches(owner, "tags", "mine") == 0


def test_the_patched_method_keeps_its_signature_and_lightning_sees_it_as_before():
    module = Module()
    with patched(module, "training_step", lambda original, *args: original(*args) * 2):
        assert inspect.signature(module.training_step) == inspect.signature(Module().training_step)
        assert is_overridden("training_step", module)
        assert module.training_step(torch.ones(1, 2), 0) == 2 * Module.training_step(module, torch.ones(1, 2), 0)
    bare = pl.LightningModule()
    with patched(bare, "training_step", lambda original, *args: None):
        assert not is_overridden("training_step", bare)  # still the base class's step underneath
    assert "training_step" not in vars(module) and "training_step" not in vars(bare)


# --- the callbacks' wrappers ------------------------------------------------------------------------------------------


def test_two_weights_only_save_wrappers_come_off_in_either_order():
    module = Module()
    before = dict(vars(module))
    calls: list[str] = []
    first = wrap_weights_only_saves(module, lambda checkpoint: calls.append("first"))
    second = wrap_weights_only_saves(module, lambda checkpoint: calls.append("second"))
    module.on_save_checkpoint({"state_dict": {}})  # weights-only: no "callbacks"
    assert module.saved == ["module"] and calls == ["first", "second"]
    first()
    module.on_save_checkpoint({"state_dict": {}, "callbacks": {}})  # a full checkpoint: the callbacks' hooks ran
    module.on_save_checkpoint({"state_dict": {}})
    assert calls == ["first", "second", "second"]
    second()
    assert vars(module) == before


def test_unwrap_saves_and_unwrap_loads_leave_other_patches():
    module = Module()
    resized: list[str] = []
    wrap_weights_only_saves(module, lambda checkpoint: None)
    with patched(
        module, "on_save_checkpoint", lambda original, checkpoint: [original(checkpoint), resized.append("x")]
    ):
        wrap_loads(module, lambda checkpoint: resized.append("loads"))
        unwrap_saves(module)
        module.on_save_checkpoint({"state_dict": {}})
        assert module.saved == ["module"] and resized == ["x"]
        module.on_load_checkpoint({"state_dict": module.state_dict()})
        assert resized == ["x", "loads"]
        unwrap_loads(module)
        assert "on_load_checkpoint" not in vars(module)
    assert "on_save_checkpoint" not in vars(module)


def test_the_distillation_step_and_a_log_capture_stack_on_the_module():
    module = Module()
    teacher, student = torch.nn.Linear(2, 2), module.layer
    undo = Distiller(teacher, student).wrap_training_step(module)
    capture = LogCapture()
    with capture.attached(module):
        with quiet_steps(module):  # nested: the inner capture takes the step's logs, then goes
            module.training_step(torch.ones(3, 2), 0)
        assert capture.values == {}
        module.training_step(torch.ones(3, 2), 0)  # the distillation step logs distill_loss into the outer one
        assert list(capture.values) == ["distill_loss"]
    undo()
    assert "log" not in vars(module) and "training_step" not in vars(module)
    assert module.training_step(torch.ones(3, 2), 0) == Module.training_step(module, torch.ones(3, 2), 0)
