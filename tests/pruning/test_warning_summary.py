"""Layers' warnings of one kind are summarised in one warning that says real numbers: the range each number takes over
the layers, never a template."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from wanda_lightning import prune
from wanda_lightning.methods.admm import WEAK_FEATURE_FLOOR
from wanda_lightning.methods.base import PruningWarning
from wanda_lightning.pruning.action import warn_once_per_kind


def _summaries(messages: list[str]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_once_per_kind(messages)
    assert all(issubclass(w.category, PruningWarning) for w in caught)
    return [str(w.message) for w in caught]


def _feeding(inputs: int, dead: int) -> list[nn.Module]:
    """Linear(inputs -> 24) + ReLU whose biases kill ``dead`` of the 24 features and keep the others."""
    layer = nn.Linear(inputs, 24)
    with torch.no_grad():
        layer.bias[:dead] = -100.0
        layer.bias[dead:] = 100.0
    return [layer, nn.ReLU()]


def test_admm_on_layers_with_different_dead_inputs_warns_once_with_their_range():
    torch.manual_seed(0)
    dead = {"2": 5, "5": 3, "8": 7}  # consumer layer -> how many of its 24 inputs never see a signal
    model = nn.Sequential(
        *_feeding(8, dead["2"]), nn.Linear(24, 6), *_feeding(6, dead["5"]), nn.Linear(24, 6),
        *_feeding(6, dead["8"]), nn.Linear(24, 6),
    )  # fmt: skip
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(1))]
    with pytest.warns(PruningWarning) as caught:
        report = prune(model, batches, method="admm", targets=list(dead), sparsity=0.5, sequential=False)

    # Each layer's own message, in the report, with its own count (checked against the biases set above).
    own = {m.split("'")[1]: m for m in report.warnings if "calibration signal" in m}
    assert {name: int(re.search(r"ADMM: (\d+) of 24 ", m).group(1)) for name, m in own.items()} == dead

    (summary,) = [str(w.message) for w in caught if "calibration signal" in str(w.message)]
    assert summary == (
        "3 layers (layer '2', ..., layer '8'): ADMM: 3-7 of 24 input features had (almost) no calibration signal "
        f"(norm below {WEAK_FEATURE_FLOOR:g} x the mean); their weights were updated as if their norm were that floor "
        "(each layer's message is in the report's `warnings`)"
    )
    assert not re.search(r"\bN\b", summary)  # no template left


def test_one_layer_warns_with_its_own_message():
    message = "layer 'a': ADMM: 3 of 8 input features had (almost) no calibration signal"
    assert _summaries([message]) == [message]


def test_each_kind_is_summarised_on_its_own_and_numbers_the_same_everywhere_stay_as_they_are():
    messages = [
        "layer 'a': ADMM: 3 of 8 features weak (below 0.001)",
        "layer 'b': solve failed on row 4",
        "layer 'c': ADMM: 17 of 8 features weak (below 0.001)",
        "layer 'd': ADMM: 3 of 8 features weak (below 0.001)",
        "layer 'e': solve failed on row 2.5",
    ]
    assert _summaries(messages) == [
        "3 layers (layer 'a', ..., layer 'd'): ADMM: 3-17 of 8 features weak (below 0.001) (each layer's message "
        "is in the report's `warnings`)",
        "2 layers (layer 'b', layer 'e'): solve failed on row 2.5-4 (each layer's message is in the report's "
        "`warnings`)",
    ]


def test_ranges_of_numbers_in_exponent_notation_read_as_ranges():
    (summary,) = _summaries(["layer 'a': error 1e-05 at step 2", "layer 'b': error 3e-07 at step 2"])
    assert summary.startswith("2 layers (layer 'a', layer 'b'): error 3e-07 to 1e-05 at step 2 (")
