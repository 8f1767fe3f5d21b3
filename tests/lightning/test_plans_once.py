"""Each act finds its target layers once and makes its shrink plan once (the unit groups and the depth plan inside it
once too); the check before training, when the act comes later, is the only other time."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from helpers.trainer import loader, make_module, make_trainer

import wanda_lightning.pruning.api as prune_api
import wanda_lightning.width.api as width_api
from wanda_lightning import CalibrationOptions, WandaPruningCallback, WandaShrinkCallback


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, calls: Counter[str]) -> None:
    original = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize(("prune_on", "expected"), [("fit_start", 1), ("fit_end", 2)])
def test_the_pruning_callback_finds_its_targets_once_per_act(tmp_path, monkeypatch, prune_on, expected):
    calls: Counter[str] = Counter()
    counting(monkeypatch, prune_api, "find_targets", calls)
    pruning = WandaPruningCallback(
        prune_on=prune_on, evaluate=False, verbose=False, calibration_options=CalibrationOptions(num_samples=8)
    )
    make_trainer(tmp_path, max_steps=1, callbacks=[pruning]).fit(make_module(), loader(8, seed=1), loader(8, seed=2))
    assert pruning.pruned
    assert calls["find_targets"] == expected  # fit_end: the check before training, then the act


@pytest.mark.parametrize(("prune_on", "expected"), [("fit_start", 1), ("fit_end", 2)])
def test_the_shrink_callback_plans_once_per_act(tmp_path, monkeypatch, prune_on, expected):
    calls: Counter[str] = Counter()
    for name in ("plan_shrink", "find_unit_groups", "plan_depth"):
        counting(monkeypatch, width_api, name, calls)
    import wanda_lightning.lightning.shrinking_callback as callback_module

    counting(monkeypatch, callback_module, "plan_shrink", calls)
    shrinking = WandaShrinkCallback(
        mlp=0.5,
        layers=0.5,
        prune_on=prune_on,
        distill=False,
        evaluate=False,
        verbose=False,
        calibration_options=CalibrationOptions(num_samples=8),
    )
    make_trainer(tmp_path, max_steps=1, callbacks=[shrinking]).fit(make_module(), loader(8, seed=1), loader(8, seed=2))
    assert shrinking.shrunk and shrinking.report.removed_blocks
    # The callback's plan is the only one: shrink_with, the progress bar and depth pruning use it.
    assert calls == Counter(plan_shrink=expected, find_unit_groups=expected, plan_depth=expected)
