"""``shrink()``: width pruning checked against dense models with the removed units zeroed, against slow references
of the unit scores written here with loops, through ``save_pretrained``/``from_pretrained``, and for every refusal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.models import VOCAB, make_batches, tiny_llama

from wanda_lightning import shrink
from wanda_lightning.width import FLAP, find_unit_groups
from wanda_lightning.width.report import linear_macs_per_token, parameter_count

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "gpt2", "opt", "gpt_neox")
WITH_HEADS = ("llama", "qwen2")  # configs with an explicit head_dim: fewer heads are expressible


def tiny(family: str) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` (2 blocks, hidden 64, MLP 128, 4 heads; GQA 4/2 where offered)."""
    if family == "llama":
        return tiny_llama()
    torch.manual_seed(0)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=2, n_head=4),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=0,
            eos_token_id=1,
        ),
    }
    return transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()


def logits(model: torch.nn.Module, seed: int = 7) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def zero_removed(dense: torch.nn.Module, report) -> None:
    """Zeroes, in the dense model, the consumer columns of every unit the report says was removed."""
    modules = dict(dense.named_modules())
    for group in report.groups:
        layer = modules[group.name]
        per_unit = group.width_before // group.units_before
        removed = [u for u in range(group.units_before) if u not in group.kept_units]
        columns = [u * per_unit + i for u in removed for i in range(per_unit)]
        with torch.no_grad():
            if type(layer).__name__ == "Conv1D":
                layer.weight[columns, :] = 0
            else:
                layer.weight[:, columns] = 0


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- exactness ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda-sp", "magnitude-sp", FLAP(update="none")], ids=str)
def test_shrunk_logits_equal_the_dense_model_with_removed_units_zeroed(family, method):
    model = tiny(family)
    dense = copy.deepcopy(model)
    heads = 0.5 if family in WITH_HEADS else 0.0
    report = shrink(model, make_batches(), mlp=0.5, heads=heads, method=method)
    kinds = {g.kind for g in report.groups}
    assert kinds == ({"mlp", "attention"} if heads else {"mlp"})
    assert all(g.units_after == g.units_before // 2 for g in report.groups)
    zero_removed(dense, report)
    torch.testing.assert_close(logits(model), logits(dense), rtol=1e-5, atol=1e-5)
    assert parameter_count(model) < parameter_count(dense)


def test_one_shot_and_sequential_both_shrink_exactly():
    for sequential in (True, False):
        model = tiny("llama")
        dense = copy.deepcopy(model)
        report = shrink(model, make_batches(), mlp=0.25, heads=0.5, sequential=sequential)
        assert report.sequential is sequential
        zero_removed(dense, report)
        torch.testing.assert_close(logits(model), logits(dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_the_folder_loads_with_stock_from_pretrained(family, tmp_path):
    model = tiny(family)
    heads = 0.5 if family in WITH_HEADS else 0.0
    report = shrink(model, make_batches(), mlp=0.5, heads=heads)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
    for key, value in report.config_updates.items():
        assert getattr(loaded.config, key) == value
    assert parameter_count(loaded) == report.parameters_after


def test_flap_compensation_is_expressed_by_the_llama_config(tmp_path):
    model = tiny("llama")
    report = shrink(model, make_batches(), mlp=0.5, heads=0.5, method="flap")
    assert report.config_updates["mlp_bias"] is True and report.config_updates["attention_bias"] is True
    assert all(g.update == "bias" for g in report.groups)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
    # The biases mlp_bias/attention_bias add to the producers are zero; the consumers hold the compensation.
    block = loaded.model.layers[0]
    for layer in (block.mlp.gate_proj, block.mlp.up_proj, block.self_attn.q_proj, block.self_attn.k_proj):
        assert not layer.bias.any()
    assert block.mlp.down_proj.bias.abs().sum() > 0


# --- scores against slow references -------------------------------------------------------------------------------


def consumer_inputs(model, names, batches):
    """Every input row each named layer receives on ``batches``, per sequence: {name: [list of (T, in) tensors]}."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        modules[name].register_forward_pre_hook(lambda m, args, name=name: seen[name].extend(args[0].detach()))
        for name in names
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return seen


def slow_wanda_sp_keep(weight, sequences, per_unit, keep):
    """Wanda-sp by hand: per channel the mean over sequences of sum_t x^2, square-rooted, times sum_i |W_ic|."""
    out_features, in_features = weight.shape
    norms = []
    for c in range(in_features):
        total = 0.0
        for sequence in sequences:
            total += sum(float(sequence[t, c]) ** 2 for t in range(sequence.shape[0]))
        norms.append(math.sqrt(total / len(sequences)))
    channel = [sum(abs(float(weight[i, c])) for i in range(out_features)) * norms[c] for c in range(in_features)]
    units = [sum(channel[u * per_unit : (u + 1) * per_unit]) for u in range(in_features // per_unit)]
    ranked = sorted(range(len(units)), key=lambda u: (-units[u], u))
    return sorted(ranked[:keep])


def test_wanda_sp_keeps_the_units_a_slow_reference_keeps_block_by_block():
    model = tiny("llama")
    reference = copy.deepcopy(model)
    batches = make_batches(num_batches=2, batch=2, seq_len=8)
    report = shrink(model, batches, mlp=0.5, heads=0.5)
    by_block = {}
    for group in report.groups:
        by_block.setdefault(group.block, []).append(group)
    modules = dict(reference.named_modules())
    for block in (0, 1):
        # Block k's statistics come from the blocks before it, already shrunk: zeroing the removed units' columns in
        # the reference computes the same function (checked by the exactness test).
        groups = by_block[block]
        inputs = consumer_inputs(reference, [g.name for g in groups], batches)
        for group in groups:
            weight = modules[group.name].weight.detach()
            per_unit = group.width_before // group.units_before
            expected = slow_wanda_sp_keep(weight, inputs[group.name], per_unit, group.units_after)
            assert group.kept_units == expected, group.name

        class Partial:
            groups = by_block[block]

        zero_removed(reference, Partial)


def test_flap_scores_and_bias_compensation_match_a_slow_reference():
    model = tiny("llama")
    dense = copy.deepcopy(model)
    batches = make_batches(num_batches=2, batch=2, seq_len=8)
    report = shrink(model, batches, mlp=0.5, method="flap", sequential=False)
    name = "model.layers.1.mlp.down_proj"
    (group,) = [g for g in report.groups if g.name == name]
    tokens = torch.cat([x for x in consumer_inputs(dense, [name], batches)[name]])  # one-shot: all from dense
    weight = dict(dense.named_modules())[name].weight.detach()
    count = tokens.shape[0]
    means, scores = [], []
    for c in range(tokens.shape[1]):
        values = [float(v) for v in tokens[:, c]]
        mean = sum(values) / count
        variance = sum((v - mean) ** 2 for v in values) / count
        means.append(mean)
        scores.append(variance * sum(float(w) ** 2 for w in weight[:, c]))
    ranked = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
    assert group.kept_units == sorted(ranked[: group.units_after])
    removed = [c for c in range(len(scores)) if c not in group.kept_units]
    expected_bias = [sum(float(weight[i, c]) * means[c] for c in removed) for i in range(weight.shape[0])]
    found = dict(model.named_modules())[name].bias.detach()
    torch.testing.assert_close(found, torch.tensor(expected_bias), rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_loses_whole_key_value_groups():
    model = tiny("llama")  # 4 query heads sharing 2 key/value heads: head_dim 16
    dense = copy.deepcopy(model)
    report = shrink(model, make_batches(), heads=0.5)
    attention = [g for g in report.groups if g.kind == "attention"]
    assert [(g.units_before, g.units_after, g.width_before, g.width_after) for g in attention] == [(2, 1, 64, 32)] * 2
    for group in attention:
        (kv,) = group.kept_units
        block = int(group.name.split(".")[2])
        new, old = model.model.layers[block].self_attn, dense.model.layers[block].self_attn
        assert torch.equal(new.k_proj.weight, old.k_proj.weight[kv * 16 : (kv + 1) * 16])
        assert torch.equal(new.v_proj.weight, old.v_proj.weight[kv * 16 : (kv + 1) * 16])
        assert torch.equal(new.q_proj.weight, old.q_proj.weight[kv * 32 : (kv + 1) * 32])  # its 2 query heads
        assert torch.equal(new.o_proj.weight, old.o_proj.weight[:, kv * 32 : (kv + 1) * 32])
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)


def test_report_counts_parameters_macs_and_widths():
    model = tiny("llama")
    params, macs = parameter_count(model), linear_macs_per_token(model)
    report = shrink(model, make_batches(), mlp=0.25, heads=0.5)
    assert (report.parameters_before, report.macs_before) == (params, macs)
    assert (report.parameters_after, report.macs_after) == (parameter_count(model), linear_macs_per_token(model))
    # Per block: MLP 3 x 64 x 32 removed; attention 2 x 64 x 32 (q, o) + 2 x 64 x 16 (k, v).
    assert macs - report.macs_after == 2 * (3 * 64 * 32 + 2 * 64 * 32 + 2 * 64 * 16)
    assert report.units("mlp") == (128, 96)
    assert "128 -> 96" in str(report) and "model.layers.1.mlp.down_proj" in report.table()
    assert report.to_dict()["macs_ratio"] == pytest.approx(report.macs_after / macs)


def test_unit_groups_of_each_family():
    found = {family: find_unit_groups(tiny(family), None, ["mlp", "attention"]) for family in FAMILIES}
    assert [g.consumer.name for g in found["opt"] if g.kind == "mlp"] == [
        "model.decoder.layers.0.fc2",
        "model.decoder.layers.1.fc2",
    ]
    assert all(g.problem is None for g in found["llama"])
    assert {g.problem is not None for g in found["gpt2"] if g.kind == "attention"} == {True}
    assert {g.problem is not None for g in found["gpt_neox"] if g.kind == "attention"} == {True}


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "kwargs", "error", "fragments"),
    [
        ("llama", dict(mlp=1.0), ValueError, ["`mlp`", "1.0", "[0, 1)"]),
        ("llama", dict(mlp=-0.1), ValueError, ["`mlp`", "-0.1"]),
        ("llama", dict(heads=True), TypeError, ["`heads`", "True"]),
        ("llama", dict(mlp=0.0, heads=0.0), ValueError, ["`mlp`, `heads` and `layers` are all 0"]),
        ("llama", dict(heads=0.2), ValueError, ["`heads`=0.2", "rounds to none"]),
        ("llama", dict(heads=0.8), ValueError, ["`heads`=0.8", "removes all"]),
        ("llama", dict(mlp=0.5, method="nope"), ValueError, ["`method`", "'nope'", "wanda-sp"]),
        ("llama", dict(mlp=0.5, num_samples=0), ValueError, ["`num_samples`", "0"]),
        ("gpt2", dict(heads=0.5), ValueError, ["transformer.h.0.attn.c_proj", "fused", "c_attn"]),
        ("gpt_neox", dict(heads=0.5), ValueError, ["attention.dense", "fused", "query_key_value"]),
        ("opt", dict(heads=0.5), ValueError, ["self_attn", "derives the head size", "`heads`=0"]),
        ("qwen2", dict(mlp=0.5, method="flap"), ValueError, ["down_proj", "bias compensation", "qwen2"]),
    ],
)
def test_bad_inputs_leave_the_model_untouched(family, kwargs, error, fragments):
    model = tiny(family)
    before = snapshot(model)
    config = model.config.to_dict()
    with pytest.raises(error) as info:
        shrink(model, make_batches(), **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.config.to_dict() == config
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_calibration_is_needed_except_for_magnitude_sp():
    model = tiny_llama()
    with pytest.raises(ValueError, match="wanda-sp needs `calibration`"):
        shrink(model, None, mlp=0.5)
    report = shrink(model, None, mlp=0.5, method="magnitude-sp")
    assert report.num_batches == 0 and model.config.intermediate_size == 64


def test_statistics_are_synced_before_units_are_chosen():
    """What DDP relies on: the all-reduce sees every consumer's statistics before any unit is chosen."""
    model, seen = tiny("llama"), []

    def sync(tensors):
        seen.append(len(tensors))
        for tensor in tensors:
            tensor.mul_(1)  # an all-reduce over one process

    shrink(model, make_batches(), mlp=0.5, heads=0.5, sync_statistics=sync)
    assert seen == [2 * 2, 2 * 2]  # per block: o_proj and down_proj, each a sum and its counts


# --- adaptive widths ----------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.gate_proj, self.up_proj, self.down_proj = (
            torch.nn.Linear(8, 16),
            torch.nn.Linear(8, 16),
            torch.nn.Linear(16, 8),
        )
        with torch.no_grad():
            self.down_proj.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class _Net(torch.nn.Module):
    """A custom model without a transformers config: three MLP blocks of different importance."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([_Block(scale) for scale in (0.2, 1.0, 3.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def test_adaptive_widths_rank_units_across_layers_like_a_slow_reference():
    net = _Net()
    dense = copy.deepcopy(net)
    batches = [torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    report = shrink(net, batches, mlp=0.5, widths="adaptive")
    assert not report.sequential
    kept = {g.name: g.kept_units for g in report.groups}
    assert sum(len(k) for k in kept.values()) == 24 and len({len(k) for k in kept.values()}) > 1
    # The reference: every layer's Wanda-sp unit scores from the dense model, standardised per layer, ranked together.
    inputs = {}
    for index, block in enumerate(dense.layers):
        block.down_proj.register_forward_pre_hook(lambda m, a, i=index: inputs.setdefault(i, []).extend(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            dense(batch)
    candidates = []
    for index, block in enumerate(dense.layers):
        weight = block.down_proj.weight.detach()
        sequences = inputs[index]
        norms = [math.sqrt(sum(float(s[:, c].square().sum()) for s in sequences) / len(sequences)) for c in range(16)]
        scores = [sum(abs(float(weight[i, c])) for i in range(8)) * norms[c] for c in range(16)]
        mean = sum(scores) / 16
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / 15)
        best = max(range(16), key=lambda c: (scores[c], -c))
        candidates += [((s - mean) / std, index, c) for c, s in enumerate(scores) if c != best]
    removed = sorted(candidates)[:24]
    for index in range(3):
        expected = sorted(set(range(16)) - {c for _, i, c in removed if i == index})
        assert kept[f"layers.{index}.down_proj"] == expected, index
    zero_removed(dense, report)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), dense(x), rtol=1e-5, atol=1e-6)


def test_adaptive_widths_are_refused_for_a_config_that_holds_one_width():
    model = tiny("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`widths`='adaptive'.*LlamaConfig.*from_pretrained"):
        shrink(model, make_batches(), mlp=0.5, widths="adaptive")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --- weight updates -----------------------------------------------------------------------------------------------


def test_least_squares_refit_matches_a_direct_least_squares_solve():
    from wanda_lightning.width.updates import least_squares_refit

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator, dtype=torch.float64) + 0.7  # inputs with a mean
    w = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5])
    for fit_bias in (False, True):
        design = torch.cat([x[:, kept], torch.ones(200, 1, dtype=torch.float64)], dim=1) if fit_bias else x[:, kept]
        solution = torch.linalg.lstsq(design, x @ w.t()).solution.t()  # (3, k [+ 1])
        new, change = least_squares_refit(
            w.float(), (x.t() @ x).float(), x.sum(0).float(), 200, kept, fit_bias=fit_bias, percdamp=0.0
        )
        torch.testing.assert_close(new.double(), solution[:, :4], rtol=1e-3, atol=1e-3)
        if fit_bias:
            torch.testing.assert_close(change.double(), solution[:, 4], rtol=1e-3, atol=1e-3)
        else:
            assert change is None


def test_updates_lower_the_consumers_calibration_error_in_order():
    """One-shot, so every consumer's statistics come from the dense model: the least-squares refit reproduces the dense
    outputs best, the bias compensation next, nothing worst."""
    batches = make_batches()
    name = "model.layers.1.mlp.down_proj"
    dense = tiny("llama")
    inputs = torch.cat([x for x in consumer_inputs(dense, [name], batches)[name]])  # (tokens, 128)
    target = inputs @ dense.model.layers[1].mlp.down_proj.weight.detach().t()
    errors = {}
    for update in ("none", "bias", "least-squares"):
        model = tiny("llama")
        report = shrink(model, batches, mlp=0.5, update=update, sequential=False)
        (group,) = [g for g in report.groups if g.name == name]
        assert group.update == update
        layer = model.model.layers[1].mlp.down_proj
        with torch.no_grad():
            output = layer(inputs[:, group.kept_units])
        errors[update] = float((output - target).square().sum())
    assert errors["least-squares"] < errors["bias"] <= errors["none"] * (1 + 1e-6)


def test_least_squares_refits_weights_alone_where_the_config_holds_no_bias(tmp_path):
    model = tiny("qwen2")  # Qwen2's down_proj and o_proj have no bias, and its config cannot give them one
    report = shrink(model, make_batches(), mlp=0.5, heads=0.5, update="least-squares")
    assert {g.update for g in report.groups} == {"least-squares (weights)"}
    assert "mlp_bias" not in report.config_updates
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_least_squares_with_biases_round_trips_on_llama(tmp_path):
    model = tiny("llama")
    report = shrink(model, make_batches(), mlp=0.5, heads=0.5, method="flap", update="least-squares")
    assert {g.update for g in report.groups} == {"least-squares"} and report.config_updates["mlp_bias"] is True
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))
