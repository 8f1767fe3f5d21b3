"""``calibration_options=CalibrationOptions(...)`` and the calibration keywords are one path: the same result, the
same refusals (naming the argument, the model untouched), in ``prune`` and ``shrink`` and their configs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import make_batches, tiny_llama

from wanda_lightning import prune, shrink
from wanda_lightning.core.options import CalibrationOptions
from wanda_lightning.pruning.api import prune_with
from wanda_lightning.pruning.config import PruneConfig
from wanda_lightning.width.api import shrink_with
from wanda_lightning.width.config import ShrinkConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def masks(model):
    return {name: p == 0 for name, p in model.named_parameters() if p.dim() == 2}


def test_prune_options_equal_keywords(llama, calibration_batches):
    by_keyword = copy.deepcopy(llama)
    report = prune(by_keyword, calibration_batches, num_samples=5, batch_size=2)
    options = CalibrationOptions(num_samples=5, batch_size=2)
    options_report = prune(llama, calibration_batches, calibration_options=options)
    assert report.num_samples == options_report.num_samples == 5
    assert report.num_batches == options_report.num_batches == 3
    expected, found = masks(by_keyword), masks(llama)
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)


def test_prune_keywords_replace_options_fields(llama, calibration_batches):
    report = prune(llama, calibration_batches, calibration_options=CalibrationOptions(num_samples=5), num_samples=3)
    assert report.num_samples == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        (dict(num_sample=8), TypeError, ["num_sample", "num_samples"]),
        (dict(calibration_options={"num_samples": 8}), TypeError, ["`calibration_options`", "dict"]),
        (dict(batch_size=0), ValueError, ["`batch_size`", "0"]),
    ],
)
def test_prune_refuses_bad_options_before_touching_the_model(llama, calibration_batches, kwargs, error, fragments):
    before = snapshot(llama)
    with pytest.raises(error) as info:
        prune(llama, calibration_batches, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert_unchanged(llama, before)


def test_options_refuse_a_bad_batch_size():
    with pytest.raises(ValueError, match=r"`batch_size`.*0"):
        CalibrationOptions(batch_size=0)


def test_configs_refuse_options_that_are_not_calibration_options():
    with pytest.raises(TypeError, match=r"`options`.*dict"):
        PruneConfig.create(options={"num_samples": 8})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`options`.*dict"):
        ShrinkConfig.create(mlp=0.5, options={"num_samples": 8})  # type: ignore[arg-type]


def test_prune_config_to_dict_keeps_its_keys():
    config = PruneConfig.create(options=CalibrationOptions(num_samples=16, batch_size=4, sequential=False))
    assert config.to_dict() == {
        "sparsity": 0.5,
        "structure": "unstructured",
        "method": "wanda",
        "allocation": None,
        "refinement": None,
        "reconstruction": None,
        "targets": None,
        "ignore": None,
        "sequential": False,
        "blocks": None,
        "num_samples": 16,
        "batch_size": 4,
    }
    given = config.with_batches_as_given()
    assert given.options.num_samples is None and given.options.batch_size is None and not given.options.sequential


def test_shrink_config_to_dict_and_batches_as_given():
    config = ShrinkConfig.create(mlp=0.5, method="flap", options=CalibrationOptions(num_samples=8, device="cpu"))
    assert config.to_dict() == {
        "mlp": 0.5,
        "heads": 0.0,
        "layers": 0.0,
        "layer_score": "influence",
        "speedup": None,
        "speed_on": None,
        "method": "flap",
        "widths": "uniform",
        "multiple_of": None,
        **CalibrationOptions(num_samples=8, device="cpu").to_dict(),
    }
    assert config.with_batches_as_given().options == CalibrationOptions(num_samples=None, device="cpu")


def test_shrink_options_equal_keywords():
    batches = make_batches()
    by_keyword, by_options = tiny_llama(), tiny_llama()
    report = shrink(by_keyword, batches, mlp=0.5, num_samples=5, batch_size=2)
    options_report = shrink(
        by_options, batches, mlp=0.5, calibration_options=CalibrationOptions(num_samples=5, batch_size=2)
    )
    assert report.num_samples == options_report.num_samples == 5 and report.num_batches == options_report.num_batches
    expected, found = by_keyword.state_dict(), by_options.state_dict()
    assert expected.keys() == found.keys() and all(torch.equal(expected[k], found[k]) for k in expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        (dict(batchsize=2), TypeError, ["batchsize", "batch_size"]),
        (dict(batch_size=0), ValueError, ["`batch_size`", "0"]),
        (dict(calibration_options=CalibrationOptions(), sequential="yes"), TypeError, ["`sequential`", "'yes'"]),
    ],
)
def test_shrink_refuses_bad_options_before_touching_the_model(kwargs, error, fragments):
    model = tiny_llama()
    before, config = snapshot(model), model.config.to_dict()
    with pytest.raises(error) as info:
        shrink(model, make_batches(), mlp=0.5, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert_unchanged(model, before)
    assert model.config.to_dict() == config


def test_forward_fn_keyword_overrides_the_configured_one(llama, calibration_batches):
    calls = {"configured": 0, "given": 0}

    def forward(name):
        def run(model, batch):
            calls[name] += 1
            return model(**batch)

        return run

    options = CalibrationOptions(forward_fn=forward("configured"), sequential=False)
    prune_with(llama, calibration_batches, PruneConfig.create(options=options), forward_fn=forward("given"))
    shrink_with(
        tiny_llama(), make_batches(), ShrinkConfig.create(mlp=0.5, options=options), forward_fn=forward("given")
    )
    assert calls == {"configured": 0, "given": 2 * len(calibration_batches)}
    with pytest.raises(TypeError, match=r"`forward_fn`.*42"):
        prune_with(llama, calibration_batches, PruneConfig.create(), forward_fn=42)  # type: ignore[arg-type]
