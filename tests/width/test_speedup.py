"""``shrink(speedup=...)``: the search checked with a deterministic stand-in for the timer (speed from the planned
shape, so nothing here depends on this machine's load), the quality estimate against a slow loss written here, the
applied shape against a plain ``shrink()`` with the chosen fractions, the report and its plot, and the refusals."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from helpers.models import make_batches, tiny_llama

from wanda_lightning import shrink
from wanda_lightning.core.speed import SpeedResult
from wanda_lightning.width import speedup as speedup_module
from wanda_lightning.width.report import ShrinkReport
from wanda_lightning.width.speed_target import SpeedTarget
from wanda_lightning.width.speedup import NEAR_MISS, calibration_loss

transformers = pytest.importorskip("transformers")


def model() -> torch.nn.Module:
    return tiny_llama(num_hidden_layers=5)


def shape_timer(seen: list[tuple[int, int, int]]):
    """A stand-in for ``measure_speed``: decode cost = blocks x (1 + MLP width / 128) + 2, prefill cost = linear
    weights; records each timed model's (blocks, MLP width, query heads)."""

    def timer(throwaway, **kwargs):
        config = throwaway.config
        seen.append((config.num_hidden_layers, config.intermediate_size, config.num_attention_heads))
        parameters = sum(p.numel() for p in throwaway.parameters())
        decode_cost = config.num_hidden_layers * (1 + config.intermediate_size / 128) + 2
        return SpeedResult("x", parameters, 0, 100.0 / decode_cost, 1e6 / parameters, None, "cpu", 1, 32, (4, 256))

    return timer


def first_run_slowed(seen: list[tuple[int, int, int]], shape: tuple[int, int], factor: float):
    """``shape_timer`` whose first run of (blocks, MLP width) ``shape`` decodes ``factor`` times as fast: one disturbed
    run."""
    steady = shape_timer(seen)
    disturbed = False

    def timer(throwaway, **kwargs):
        nonlocal disturbed
        result = steady(throwaway, **kwargs)
        if (throwaway.config.num_hidden_layers, throwaway.config.intermediate_size) == shape and not disturbed:
            disturbed = True
            result.decode_tokens_per_second *= factor
        return result

    return timer


def slow_loss(lm: torch.nn.Module, batches: list[dict]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
            for b in range(logits.shape[0]):
                for t in range(logits.shape[1] - 1):
                    if batch["attention_mask"][b, t + 1]:
                        log_probs = torch.log_softmax(logits[b, t], dim=-1)
                        total -= float(log_probs[batch["input_ids"][b, t + 1]])
                        count += 1
    return total / count


def test_calibration_loss_matches_a_slow_reference_and_skips_padding():
    lm = model()
    batches = make_batches()
    batches[0]["attention_mask"][2, 9:] = 0
    assert calibration_loss(lm, batches) == pytest.approx(slow_loss(lm, batches), rel=1e-5)


def test_the_most_accurate_candidate_that_meets_the_target_is_applied(monkeypatch):
    seen: list[tuple[int, int, int]] = []
    monkeypatch.setattr(speedup_module, "measure_speed", shape_timer(seen))
    lm, batches = model(), make_batches()
    dense = copy.deepcopy(lm)
    target = SpeedTarget(1.5, layers=(0.0, 0.2, 0.4, 0.6), mlp=(0.0, 0.5), heads=(0.0,), rounds=1)
    report = shrink(lm, batches, speedup=target)

    # The dense config, then per MLP fraction the depths in order until one meets 1.5x; then the two that met it
    # (neither removes less than the other everywhere) again, in one turn each with the dense config.
    assert seen[:5] == [(5, 128, 4), (4, 128, 4), (3, 128, 4), (5, 64, 4), (4, 64, 4)]
    assert seen[5:] == [(5, 128, 4), (3, 128, 4), (5, 128, 4), (4, 64, 4)]
    shapes = [(c["layers"], c["mlp"], c["meets"]) for c in report.candidates]
    assert shapes == [(0.2, 0.0, False), (0.4, 0.0, True), (0.0, 0.5, False), (0.2, 0.5, True)]
    for candidate in report.candidates:
        blocks = 5 - round(candidate["layers"] * 5)
        width = 128 - round(candidate["mlp"] * 128)
        assert candidate["decode_speedup"] == pytest.approx(12.0 / (blocks * (1 + width / 128) + 2))

    # Both that meet it are scored, each by the loss of a plain one-shot shrink with its fractions.
    scored = [c for c in report.candidates if c["quality"] is not None]
    assert [(c["layers"], c["mlp"]) for c in scored] == [(0.4, 0.0), (0.2, 0.5)]
    for candidate in scored:
        trial = copy.deepcopy(dense)
        shrink(trial, batches, layers=candidate["layers"], mlp=candidate["mlp"])
        assert candidate["quality"] == pytest.approx(slow_loss(trial, batches), rel=1e-5)
    (chosen,) = [c for c in report.candidates if c["chosen"]]
    assert chosen["quality"] == min(c["quality"] for c in scored)

    # The model is what shrink() makes with the chosen fractions.
    expected = copy.deepcopy(dense)
    shrink(expected, batches, layers=chosen["layers"], mlp=chosen["mlp"])
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)
    assert report.speed_target == {
        "speedup": 1.5,
        "on": "decode",
        "device": "cpu",
        "runtime": "torch",
        "dtype": None,
        "threads": None,
        "rounds": 1,
        "margin": 1.0,
        "spread": None,  # one turn per shape: no spread measured
    }
    assert report.method.startswith("speed target 1.5x (decode) -> ")
    assert "speed target" in str(report) and "<-" in report.candidates_table()
    assert ShrinkReport.from_dict(report.to_dict()) == report


def test_a_near_miss_is_timed_again_so_one_disturbed_run_does_not_rule_it_out(monkeypatch):
    seen: list[tuple[int, int, int]] = []
    # The first run of 4 blocks with half the MLP (1.5x in truth) is slowed by 3 %: 1.455x, a near miss.
    monkeypatch.setattr(speedup_module, "measure_speed", first_run_slowed(seen, (4, 64), 0.97))
    target = SpeedTarget(1.5, layers=(0.0, 0.2, 0.4), mlp=(0.0, 0.5), heads=(0.0,), rounds=1)
    report = shrink(model(), make_batches(), speedup=target)

    # The scan went past the near miss (to 3 blocks); the lightest shape that met it and the near miss were timed
    # again in turns with the dense config; the far miss (5 blocks, half the MLP: 1.26x) was not.
    assert seen[:6] == [(5, 128, 4), (4, 128, 4), (3, 128, 4), (5, 64, 4), (4, 64, 4), (3, 64, 4)]
    assert seen[6:] == [(5, 128, 4), (3, 128, 4), (5, 128, 4), (4, 64, 4)]
    near = next(c for c in report.candidates if (c["layers"], c["mlp"]) == (0.2, 0.5))
    assert near["meets"] and near["decode_speedup"] == pytest.approx(1.5)
    # It meets the target with less removed than 3 blocks with half the MLP, so it is scored and that one is not.
    scored = [(c["layers"], c["mlp"]) for c in report.candidates if c["quality"] is not None]
    assert scored == [(0.4, 0.0), (0.2, 0.5)]
    assert NEAR_MISS * 1.5 <= 1.455  # the disturbed run is inside the band that is timed again


def test_a_shape_whose_first_run_is_far_off_is_timed_again_because_the_cost_model_predicts_it(monkeypatch):
    seen: list[tuple[int, int, int]] = []
    # The first run of 4 blocks with half the MLP (1.5x in truth) is slowed by 20 %: 1.2x, far outside NEAR_MISS.
    monkeypatch.setattr(speedup_module, "measure_speed", first_run_slowed(seen, (4, 64), 0.8))
    target = SpeedTarget(1.5, layers=(0.0, 0.2, 0.4), mlp=(0.0, 0.5), heads=(0.0,), rounds=1)
    report = shrink(model(), make_batches(), speedup=target)

    assert NEAR_MISS * 1.5 > 1.2  # its own first run would not have it timed again
    # The stand-in's cost is linear in blocks and parameters, so the fit to the other five runs predicts 1.5x for it:
    # it is timed again with the lightest shape that met the target, and 3 blocks with half the MLP is not.
    assert seen[6:] == [(5, 128, 4), (3, 128, 4), (5, 128, 4), (4, 64, 4)]
    near = next(c for c in report.candidates if (c["layers"], c["mlp"]) == (0.2, 0.5))
    assert near["meets"] and near["decode_speedup"] == pytest.approx(1.5)
    scored = [(c["layers"], c["mlp"]) for c in report.candidates if c["quality"] is not None]
    assert scored == [(0.4, 0.0), (0.2, 0.5)]
    # The report says what the fit predicted for every shape and which were timed twice.
    runs = {(c["layers"], c["mlp"]): c["runs"] for c in report.candidates}
    assert runs == {(0.2, 0.0): 1, (0.4, 0.0): 2, (0.0, 0.5): 1, (0.2, 0.5): 2, (0.4, 0.5): 1}
    assert near["fitted_speedup"] == pytest.approx(1.5, rel=0.02)
    for candidate in report.candidates:  # the five undisturbed runs lie on the fit
        blocks, width = 5 - round(candidate["layers"] * 5), 128 - round(candidate["mlp"] * 128)
        assert candidate["fitted_speedup"] == pytest.approx(12.0 / (blocks * (1 + width / 128) + 2), rel=0.02)
    table = report.candidates_table()
    assert "fit" in table.splitlines()[0] and "1.50x" in table
    assert "5 candidates timed (2 again in turns), 2 scored" in str(report)


def test_each_shape_is_measured_against_the_dense_runs_of_its_own_turns(monkeypatch):
    seen: list[tuple[int, int, int]] = []
    steady = shape_timer(seen)
    dense_runs = 0

    def timer(throwaway, **kwargs):
        nonlocal dense_runs
        result = steady(throwaway, **kwargs)
        if throwaway.config.num_hidden_layers == 5 and throwaway.config.intermediate_size == 128:
            dense_runs += 1
            if dense_runs == 2:  # the dense run in the turn of 3 blocks (1.5x in truth) is 10 % fast
                result.decode_tokens_per_second *= 1.1
        return result

    monkeypatch.setattr(speedup_module, "measure_speed", timer)
    target = SpeedTarget(1.5, layers=(0.0, 0.2, 0.4), mlp=(0.0, 0.5), heads=(0.0,), rounds=1)
    report = shrink(model(), make_batches(), speedup=target)

    assert seen[5:] == [(5, 128, 4), (3, 128, 4), (5, 128, 4), (4, 64, 4)]
    speedups = {(c["layers"], c["mlp"]): c["decode_speedup"] for c in report.candidates}
    # The fast dense run counts against the shape of its own turn only; against the best of every dense run of the
    # search, both shapes would read 1.36x and the target would be refused.
    assert speedups[(0.4, 0.0)] == pytest.approx(1.5 / 1.1)
    assert speedups[(0.2, 0.5)] == pytest.approx(1.5)
    (chosen,) = [c for c in report.candidates if c["chosen"]]
    assert (chosen["layers"], chosen["mlp"]) == (0.2, 0.5)


def test_a_heavier_shape_is_timed_again_after_the_lighter_near_miss_fails_in_turns(monkeypatch):
    seen: list[tuple[int, int, int]] = []
    monkeypatch.setattr(speedup_module, "measure_speed", shape_timer(seen))
    target = SpeedTarget(1.3, layers=(0.0, 0.2, 0.4), mlp=(0.0, 0.5), heads=(0.0,), rounds=1)
    report = shrink(model(), make_batches(), speedup=target)

    # Scan: dense, 4 blocks (1.2x), 3 blocks (1.5x), half the MLP (1.26x, a near miss), then with 4 blocks (1.5x).
    assert seen[:5] == [(5, 128, 4), (4, 128, 4), (3, 128, 4), (5, 64, 4), (4, 64, 4)]
    # The lightest worth a second run go first: 3 blocks and the near miss, each after a dense run. The near miss
    # fails again, so 4 blocks with half the MLP, which removes more than it, gets its turn.
    assert seen[5:] == [(5, 128, 4), (3, 128, 4), (5, 128, 4), (5, 64, 4), (5, 128, 4), (4, 64, 4)]
    meets = [(c["layers"], c["mlp"]) for c in report.candidates if c["meets"]]
    assert meets == [(0.4, 0.0), (0.2, 0.5)]


def test_candidates_dominated_by_a_lighter_one_that_meets_are_not_scored(monkeypatch):
    monkeypatch.setattr(speedup_module, "measure_speed", shape_timer([]))
    report = shrink(model(), make_batches(), speedup=SpeedTarget(1.2, layers=(0.0, 0.2), mlp=(0.0, 0.5, 0.75)))
    meets = [(c["layers"], c["mlp"], c["heads"]) for c in report.candidates if c["meets"]]
    scored = [(c["layers"], c["mlp"], c["heads"]) for c in report.candidates if c["quality"] is not None]
    assert (0.0, 0.5, 0.0) in scored and (0.0, 0.75, 0.0) not in scored  # mlp=0.5 meets it with less removed
    assert all(any(s[0] <= m[0] and s[1] <= m[1] and s[2] <= m[2] for s in scored) for m in meets)
    assert all(c["heads"] == 0.0 for c in report.candidates)  # every head kept, by default
    searched = shrink(model(), make_batches(), speedup=SpeedTarget(1.2, layers=(0.0, 0.2), heads=(0.0, 0.5)))
    assert any(c["heads"] == 0.5 for c in searched.candidates)  # one of two key/value groups, when asked


def test_the_plot_is_a_png(monkeypatch, tmp_path):
    monkeypatch.setattr(speedup_module, "measure_speed", shape_timer([]))
    report = shrink(model(), make_batches(), speedup=SpeedTarget(1.3, mlp=(0.0, 0.5), heads=(0.0,)))
    report.plot(tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no speed-target candidates"):
        shrink(model(), make_batches(), mlp=0.5).plot(tmp_path / "none.png")


def test_an_unreachable_target_is_refused_with_the_fastest_measured_and_nothing_changes(monkeypatch):
    monkeypatch.setattr(speedup_module, "measure_speed", shape_timer([]))
    lm = model()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(ValueError, match=r"`speedup`=9 \(decode\): no candidate reaches it on cpu; the fastest, .* "):
        shrink(lm, make_batches(), speedup=SpeedTarget(9.0, layers=(0.0, 0.2), mlp=(0.0, 0.5), heads=(0.0,)))
    assert len(lm.model.layers) == 5
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        (dict(speedup=1.0), ValueError, ["`speedup` must be a number above 1", "1.0"]),
        (dict(speedup=math.inf), ValueError, ["`speedup`", "inf"]),
        (dict(speedup="1.5"), ValueError, ["`speedup`", "'1.5'"]),
        (dict(speedup=1.5, speed_on="latency"), ValueError, ["`speed_on`", "'latency'", "decode", "prefill"]),
        (dict(speedup=1.5, mlp=0.5), ValueError, ["`speedup` chooses", "`mlp`=0.5"]),
        (dict(speedup=1.5, widths="adaptive"), ValueError, ["`speedup`", "'adaptive'"]),
        (dict(speedup=1.5, sync_statistics=lambda tensors: None), ValueError, ["timings differ between processes"]),
    ],
)
def test_bad_speed_targets_are_refused_before_anything_changes(kwargs, error, fragments, monkeypatch):
    monkeypatch.setattr(speedup_module, "measure_speed", shape_timer([]))
    lm = model()
    with pytest.raises(error) as caught:
        shrink(lm, make_batches(), **kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert len(lm.model.layers) == 5 and lm.model.layers[0].mlp.down_proj.in_features == 128


def test_a_module_without_a_transformers_config_is_refused():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="holds none"):
        shrink(mlp, [torch.randn(2, 4)], speedup=1.5)


def test_a_grid_fraction_outside_zero_to_one_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"`heads` fractions must lie in \[0, 1\), got \(0.0, 1.5\)"):
        SpeedTarget(1.5, heads=(0.0, 1.5))


def test_a_chosen_shape_far_worse_than_dense_one_shot_is_applied_with_a_warning(monkeypatch):
    monkeypatch.setattr(speedup_module, "measure_speed", shape_timer([]))
    monkeypatch.setattr(speedup_module, "BROKEN", 1e-9)  # every shape counts as broken
    with pytest.warns(UserWarning, match=r"`speedup`=1.5: the most accurate shape that reaches it, layers=0.4, has"):
        shrink(model(), make_batches(), speedup=SpeedTarget(1.5, layers=(0.0, 0.2, 0.4), mlp=(0.0,)))
    monkeypatch.setattr(speedup_module, "BROKEN", 1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        shrink(model(), make_batches(), speedup=SpeedTarget(1.5, layers=(0.0, 0.2, 0.4), mlp=(0.0,)))
