"""``shrink(..., multiple_of=N)``: kept widths against a brute-force reference written here (every kept count the
layer allows, the nearest to the fraction asked), every row length of a shrunk model a multiple of N, the default's
rounding, the report, the speed target's candidates, the CLI flag and every refusal."""

from __future__ import annotations

import copy
import json
from fractions import Fraction

import pytest
import torch
from helpers.cli import PRUNE_FAST, char_tokenizer, run_cli, tiny_llama_config
from helpers.models import make_batches, tiny_llama

from wanda_lightning import shrink
from wanda_lightning.core.speed import SpeedResult
from wanda_lightning.width import ShrinkConfig
from wanda_lightning.width import speedup as speedup_module
from wanda_lightning.width.config import kept_units, resolve_multiple
from wanda_lightning.width.speed_target import SpeedTarget

transformers = pytest.importorskip("transformers")


def reference_kept(fraction: float, units: int, per_unit: int, multiple: int) -> int | str:
    """Kept units by brute force: of the counts 1..units whose width (count x per_unit) is a multiple of ``multiple``,
    the one whose removed count lies nearest to fraction x units, exactly (ties: the one that removes more). Returns
    an error word instead where the fraction rounds to no unit or all units one by one, where the layer holds no
    multiple, or where the nearest count removes nothing."""
    asked = Fraction(fraction * units)  # the product in float, as the library forms it (0.3 x 5 is 1.5), then exact
    one_by_one = int(asked + Fraction(1, 2))  # nearest whole unit, halves up
    if one_by_one == 0:
        return "none"
    if one_by_one >= units:
        return "all"
    allowed = [k for k in range(1, units + 1) if (k * per_unit) % multiple == 0]
    if not allowed:
        return "narrow"
    best = min(allowed, key=lambda k: (abs(units - k - asked), k))
    return "nothing" if best == units else best


FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.375, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99)


@pytest.mark.parametrize(
    ("units", "per_unit"),
    [(1536, 1), (128, 1), (100, 1), (40, 1), (16, 1), (3, 192), (6, 8), (5, 24), (4, 12), (2, 32)],
)
@pytest.mark.parametrize("multiple", [1, 8, 32, 64])
def test_kept_units_match_a_brute_force_reference(units, per_unit, multiple):
    messages = {
        "none": "rounds to none",
        "all": "removes all",
        "narrow": "needs",
        "nothing": "removes none once the kept width is rounded",
    }
    for fraction in FRACTIONS:
        expected = reference_kept(fraction, units, per_unit, multiple)
        if isinstance(expected, str):
            with pytest.raises(ValueError, match=messages[expected]):
                kept_units(fraction, units, per_unit, multiple, "mlp", "down_proj")
            continue
        kept = kept_units(fraction, units, per_unit, multiple, "mlp", "down_proj")
        assert kept == expected, (fraction, units, per_unit, multiple)
        assert (kept * per_unit) % multiple == 0 and 0 < kept < units


def test_smollm2_widths_and_the_default():
    # SmolLM2-135M: MLP 1536, 9 query heads in 3 key/value groups of head_dim 64 (o_proj reads 576 channels).
    assert resolve_multiple(None, 1536) == 32 and resolve_multiple(None, 576) == 32 and resolve_multiple(None, 100) == 1
    assert kept_units(0.5, 1536, 1, resolve_multiple(None, 1536), "mlp", "down_proj") == 768  # unchanged
    assert kept_units(0.3, 1536, 1, resolve_multiple(None, 1536), "mlp", "down_proj") == 1088  # 1075 as asked
    assert kept_units(0.3, 1536, 1, 1, "mlp", "down_proj") == 1075
    assert kept_units(1 / 3, 3, 192, 32, "heads", "o_proj") == 2  # any count of 3-head groups is a multiple


def wide_llama(**overrides) -> torch.nn.Module:
    """A tiny Llama whose MLP (96) and attention (8 heads of 8, 4 key/value groups: 16 channels each) are narrow
    enough for multiples to matter."""
    settings = dict(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    return tiny_llama(**{**settings, **overrides})


def row_lengths(model: torch.nn.Module) -> dict[str, int]:
    return {name: m.in_features for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize(("multiple", "mlp", "heads"), [(32, 0.3, 0.3), (16, 0.4, 0.5), (64, 0.5, 0.0), (8, 0.7, 0.75)])
def test_every_row_length_of_a_shrunk_model_is_a_multiple(multiple, mlp, heads, tmp_path):
    model, batches = wide_llama(), make_batches()
    report = shrink(model, batches, mlp=mlp, heads=heads, multiple_of=multiple)

    kept_mlp = reference_kept(mlp, 96, 1, multiple)
    assert model.config.intermediate_size == kept_mlp
    if heads:  # (heads=0.3 with multiples of 32 keeps 2 of the 4 groups, not 3: two groups read 32 channels)
        kept_groups = reference_kept(heads, 4, 16, multiple)
        assert model.config.num_key_value_heads == kept_groups and model.config.num_attention_heads == 2 * kept_groups
    lengths = row_lengths(model)
    assert all(length % multiple == 0 for length in lengths.values()), lengths
    assert lengths["model.layers.1.mlp.down_proj"] == kept_mlp
    assert report.multiple_of == {"mlp": multiple, **({"attention": multiple} if heads else {})}
    assert f"-> {kept_mlp} (mlp={mlp:g}, width a multiple of {multiple})" in str(report)
    # The config describes the weights: the folder loads and computes what the shrunk model computes.
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_the_default_rounds_where_the_dense_width_is_a_multiple_of_32_and_nothing_else():
    batches = make_batches()
    asked, default = tiny_llama(), tiny_llama()  # MLP 128: a multiple of 32
    shrink(asked, batches, mlp=0.3, multiple_of=1)
    report = shrink(default, batches, mlp=0.3)
    assert (asked.config.intermediate_size, default.config.intermediate_size) == (90, 96)
    assert report.multiple_of == {"mlp": 32}
    odd = tiny_llama(intermediate_size=100)  # not a multiple of 32: the widths asked
    assert shrink(odd, batches, mlp=0.3).multiple_of == {"mlp": 1} and odd.config.intermediate_size == 70
    assert "width a multiple" not in str(shrink(tiny_llama(intermediate_size=100), batches, mlp=0.3))


def test_the_default_changes_nothing_where_the_old_widths_were_multiples():
    batches = make_batches()
    old, new = tiny_llama(), tiny_llama()
    shrink(old, batches, mlp=0.5, heads=0.5, multiple_of=1)
    shrink(new, batches, mlp=0.5, heads=0.5)
    assert old.config.to_dict() == new.config.to_dict()
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("value", [0, -32, 2.5, "32", True])
def test_a_bad_multiple_of_is_refused_naming_it(value):
    with pytest.raises(ValueError) as caught:
        ShrinkConfig.create(mlp=0.5, multiple_of=value)
    message = str(caught.value)
    assert "`multiple_of`" in message and repr(value) in message and "positive integer" in message


def test_multiple_of_with_adaptive_widths_is_refused():
    with pytest.raises(ValueError, match=r"`multiple_of`=32 rounds uniform widths.*widths='adaptive'"):
        ShrinkConfig.create(mlp=0.5, widths="adaptive", multiple_of=32)
    assert ShrinkConfig.create(mlp=0.5, widths="adaptive", multiple_of=1).multiple_of == 1


@pytest.mark.parametrize(
    ("overrides", "kwargs", "fragments"),
    [
        (dict(intermediate_size=16), dict(mlp=0.5, multiple_of=32), ["`multiple_of`=32", "mlp.down_proj", "16 units"]),
        ({}, dict(heads=0.5, multiple_of=128), ["`multiple_of`=128", "self_attn.o_proj", "4 units", "8 units"]),
        ({}, dict(mlp=0.1, multiple_of=32), ["`mlp`=0.1", "removes none", "multiple of 32", "`multiple_of`=1"]),
    ],
)
def test_widths_a_multiple_cannot_give_are_refused_before_anything_changes(overrides, kwargs, fragments):
    model = wide_llama(**overrides)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as caught:
        shrink(model, make_batches(), **kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_speed_target_candidates_are_rounded_the_same_way(monkeypatch):
    seen: list[int] = []

    def timer(throwaway, **kwargs):  # deterministic: decode cost grows with blocks and MLP width
        config = throwaway.config
        seen.append(config.intermediate_size)
        cost = config.num_hidden_layers * (1 + config.intermediate_size / 128) + 2
        return SpeedResult("x", 1, 0, 100.0 / cost, 100.0 / cost, None, "cpu", 1, 32, (4, 256))

    monkeypatch.setattr(speedup_module, "measure_speed", timer)
    target = SpeedTarget(1.3, layers=(0.0,), mlp=(0.0, 0.5, 0.6, 0.7), heads=(0.0,))
    model = tiny_llama(num_hidden_layers=3)
    report = shrink(model, make_batches(), speedup=target)
    # MLP 128 in multiples of 32: 0.6 keeps 64 like 0.5 (not timed twice), 0.7 keeps 32.
    assert {c["mlp"]: c["config"]["intermediate_size"] for c in report.candidates} == {0.5: 64, 0.7: 32}
    assert all(width % 32 == 0 for width in seen)
    chosen = next(c for c in report.candidates if c["chosen"])
    assert model.config.intermediate_size == chosen["config"]["intermediate_size"]
    assert "MLP 64" in report.candidates_table()


def test_the_cli_flag(tmp_path, capsys):
    dense = tmp_path / "dense"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    widths = {}
    for multiple in ("1", "32"):
        out = tmp_path / f"small{multiple}"
        args = ("shrink", dense, "--out", out, "--mlp", "0.3", "--multiple-of", multiple, *PRUNE_FAST, "--json")
        code, stdout, stderr = run_cli(capsys, *args)
        assert code == 0, stderr
        widths[multiple] = json.loads(stdout)["report"]["config_updates"]["intermediate_size"]
    assert widths == {"1": 90, "32": 96}
    code, _, stderr = run_cli(capsys, "shrink", dense, "--out", tmp_path / "bad", "--mlp", "0.3", "--multiple-of", "0")
    assert code != 0 and "`multiple_of`" in stderr and not (tmp_path / "bad").exists()
