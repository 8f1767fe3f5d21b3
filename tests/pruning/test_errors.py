"""Bad input: the right exception, a message naming the argument / value / layer, and an untouched model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import make_batches
from torch import nn

from wanda_lightning import Wanda, prune

pytestmark = pytest.mark.usefixtures("single_thread")


def small_net(first_in=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(first_in, 8), nn.ReLU(), nn.Linear(8, 4))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"changed by a failed prune(): {changed}"
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, name
    assert all(p.grad is None for p in model.parameters())


def expect_error(model, error, fragments, *args, **kwargs):
    before = snapshot(model)
    modes = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(error) as info:
        prune(model, *args, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_unchanged(model, before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    return message


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


# --- arguments ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        (dict(sparsity=1.0), ValueError, ["`sparsity`", "1.0"]),
        (dict(sparsity=1), ValueError, ["`sparsity`", "1"]),
        (dict(sparsity=-0.1), ValueError, ["`sparsity`", "-0.1"]),
        (dict(sparsity=math.nan), ValueError, ["`sparsity`", "nan"]),
        (dict(sparsity=math.inf), ValueError, ["`sparsity`", "inf"]),
        (dict(sparsity=True), TypeError, ["`sparsity`", "True"]),
        (dict(sparsity="0.5"), TypeError, ["`sparsity`", "'0.5'"]),
        (dict(structure="3:2"), ValueError, ["`structure`", "'3:2'"]),
        (dict(structure="0:4"), ValueError, ["`structure`", "'0:4'"]),
        (dict(structure="a:b"), ValueError, ["`structure`", "'a:b'"]),
        (dict(structure="foo"), ValueError, ["`structure`", "'foo'"]),
        (dict(structure=24), TypeError, ["`structure`", "24"]),
        (dict(structure="2:4", sparsity=0.7), ValueError, ["`sparsity`", "0.7", "'2:4'"]),
        (dict(num_samples=0), ValueError, ["`num_samples`", "0"]),
        (dict(num_samples=-3), ValueError, ["`num_samples`", "-3"]),
        (dict(num_samples=2.5), ValueError, ["`num_samples`", "2.5"]),
        (dict(num_samples=True), ValueError, ["`num_samples`", "True"]),
        (dict(num_samples="8"), ValueError, ["`num_samples`", "'8'"]),
        (dict(batch_size=0), ValueError, ["`batch_size`", "0"]),
        (dict(batch_size=-1), ValueError, ["`batch_size`", "-1"]),
        (dict(batch_size=1.0), ValueError, ["`batch_size`", "1.0"]),
        (dict(device="gpu"), ValueError, ["`device`", "'gpu'"]),
        (dict(device="not a device"), ValueError, ["`device`", "'not a device'"]),
        (dict(device=3.5), ValueError, ["`device`", "3.5"]),
        (dict(offload_device="nowhere"), ValueError, ["`offload_device`", "'nowhere'"]),
        (dict(method="obs"), ValueError, ["`method`", "'obs'", "magnitude", "wanda"]),
        (dict(method=42), TypeError, ["`method`", "42"]),
        (dict(sequential="yes"), TypeError, ["`sequential`", "'yes'"]),
        (dict(forward_fn=42), TypeError, ["`forward_fn`", "42"]),
        (dict(targets=[""]), TypeError, ["`targets`", "''"]),
        (dict(targets=[3]), TypeError, ["`targets`", "3"]),
        (dict(ignore=[None]), TypeError, ["`ignore`", "None"]),
        (dict(targets=["re:("]), ValueError, ["`targets`", "'re:('"]),
        (dict(blocks="decoder.layers"), ValueError, ["`blocks`", "'decoder.layers'"]),
        (dict(blocks="0"), ValueError, ["`blocks`", "'0'", "Linear"]),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else "",
)
def test_bad_arguments(kwargs, error, fragments):
    expect_error(small_net(), error, fragments, [X], **kwargs)


def test_unknown_method_lists_available_methods():
    from wanda_lightning import available_methods

    message = expect_error(small_net(), ValueError, ["`method`", "'nope'"], [X], method="nope")
    assert str(available_methods()) in message


def test_bad_method_option():
    with pytest.raises(TypeError, match=r"`variant`.*'yes'"):
        Wanda(variant="yes")


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"`model`.*dict"):
        prune({"weight": torch.zeros(2, 2)}, [X])


def test_bad_arguments_on_a_hf_model(llama, calibration_batches):
    expect_error(llama, ValueError, ["`sparsity`", "1.0"], calibration_batches, sparsity=1.0)
    expect_error(llama, ValueError, ["`structure`", "'4:3'"], calibration_batches, structure="4:3")
    expect_error(llama, ValueError, ["`num_samples`", "0"], calibration_batches, num_samples=0)


# --- structures the layers cannot take ------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["4:8", "2:4"])
def test_n_m_needs_multiple_of_m(structure):
    net = small_net(first_in=6)  # layer "0" has 6 inputs, layer "2" has 8
    message = expect_error(
        net, ValueError, ["`structure`", structure, "'0 (in_features=6)'", "`ignore`"], [X[:, :6]], structure=structure
    )
    assert "2 (in_features" not in message  # only the offending layer is named
    # leaving it out makes the call valid
    report = prune(net, [X[:, :6]], structure=structure, ignore=["0"])
    assert [layer.name for layer in report.layers] == ["2"] and report.layers[0].sparsity == 0.5


def test_n_m_on_a_hf_model_names_the_layers(llama, calibration_batches):
    # hidden 64 and intermediate 128 are multiples of 64 but not of 48
    message = expect_error(
        llama, ValueError, ["`structure`", "'24:48'", "`ignore`"], calibration_batches, structure="24:48"
    )
    assert "model.layers.0.self_attn.q_proj (in_features=64)" in message
    assert "model.layers.1.mlp.down_proj (in_features=128)" in message


# --- calibration ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("calibration", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_calibration(calibration):
    expect_error(small_net(), ValueError, ["`calibration`", "no batch"], calibration)


def test_missing_calibration_for_wanda():
    expect_error(small_net(), ValueError, ["`calibration`", "None", "wanda"], None)


def test_calibration_not_iterable():
    expect_error(small_net(), TypeError, ["`calibration`", "int"], 5)


def test_batch_without_tensor():
    expect_error(small_net(), TypeError, ["batch", "str"], ["text"])


def test_rebatching_sequences_of_different_lengths(llama):
    batches = make_batches(1, 2, 16) + make_batches(1, 2, 8)
    expect_error(llama, ValueError, ["batch_size=None"], batches, batch_size=3)


def test_no_layer_matches_targets(llama, calibration_batches):
    message = expect_error(
        llama, ValueError, ["`targets`", "nothing*", "re:.*zzz"], calibration_batches, targets=["nothing*", "re:.*zzz"]
    )
    assert "model.layers.0.self_attn.q_proj" in message  # the message shows what there is


def test_everything_ignored(llama, calibration_batches):
    expect_error(llama, ValueError, ["`ignore`", "*"], calibration_batches, ignore=["*"])


def test_model_without_linear_layers():
    model = nn.Sequential(nn.Conv2d(1, 1, 3))
    expect_error(model, ValueError, ["no nn.Linear, Conv1D or MultiheadAttention"], [torch.zeros(1, 1, 4, 4)])


class WithUnusedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("sequential", [True, False])
def test_unreached_target_layer(sequential):
    net = WithUnusedLayer()
    expect_error(net, ValueError, ["'unused'", "`ignore`"], [X], sequential=sequential)
    report = prune(net, [X], ignore=["unused"])
    assert [layer.name for layer in report.layers] == ["used"]


class Block(nn.Module):
    def __init__(self, use_extra):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.extra = nn.Linear(8, 8)
        self.use_extra = use_extra

    def forward(self, x):
        x = torch.relu(self.fc(x))
        return self.extra(x) if self.use_extra else x


class Stack(nn.Module):
    def __init__(self, uses):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(use) for use in uses)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_unreached_layer_in_first_block_changes_nothing():
    net = Stack([False, True])
    expect_error(net, ValueError, ["'blocks.0.extra'", "in block 0", "`ignore`"], [X])


def test_unreached_layer_in_a_later_block_says_what_was_pruned():
    net = Stack([True, False])
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"'blocks\.1\.extra'.*in block 1.*blocks 0-0 were already pruned"):
        prune(net, [X])
    after = net.state_dict()
    assert not torch.equal(after["blocks.0.fc.weight"], before["blocks.0.fc.weight"])
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("blocks.1."))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_nan_inputs_name_the_layer_one_shot():
    bad = X.clone()
    bad[1, 3] = math.nan
    expect_error(small_net(), FloatingPointError, ["'0'", "NaN or Inf"], [bad])


def test_nan_inputs_name_the_layer_hf_model_one_shot(llama, calibration_batches):
    embeds = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    embeds[0, 5, 7] = math.inf
    expect_error(
        llama,
        FloatingPointError,
        ["'model.layers.0.self_attn.q_proj'", "NaN or Inf"],
        [{"inputs_embeds": embeds}],
        sequential=False,
    )


def test_non_finite_weight_leaves_the_model_unchanged_one_shot():
    # Non-finite weights are found before any layer is pruned (layer "0" would otherwise be pruned already).
    net = small_net()
    with torch.no_grad():
        net[2].weight[0, 0] = math.inf
    expect_error(net, FloatingPointError, ["'2'", "not finite"], [X], sequential=False)


def test_meta_device_parameters():
    with torch.device("meta"):
        net = small_net()
    with pytest.raises(ValueError) as info:
        prune(net, [X.to("meta")])
    message = str(info.value)
    assert "meta" in message and "0.weight" in message
    assert all(p.is_meta for p in net.parameters())
    assert all(not m._forward_pre_hooks for m in net.modules())


def skip_lm_head(model, batch):
    return model.model(**batch)  # runs the decoder only: lm_head never sees a token


def test_errors_leave_an_hf_model_as_it_was(llama):
    llama.train()
    llama.config.use_cache = True
    expect_error(llama, ValueError, ["`calibration`"], [])
    expect_error(
        llama,
        ValueError,
        ["no calibration token", "'lm_head'", "`ignore`"],
        make_batches(1, 2, 4),
        ignore=[],
        forward_fn=skip_lm_head,
        sequential=False,
    )
    assert llama.training and llama.model.layers[0].training
    assert llama.config.use_cache is True


def test_unreached_layer_after_the_blocks_says_blocks_were_pruned(llama):
    llama.train()
    with pytest.raises(ValueError, match=r"'lm_head'.*blocks 0-1 were already pruned"):
        prune(llama, make_batches(1, 2, 4), ignore=[], forward_fn=skip_lm_head)
    assert torch.count_nonzero(llama.lm_head.weight) == llama.lm_head.weight.numel()
    assert (llama.model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.5
    assert llama.training and all(not m._forward_pre_hooks and not m._forward_hooks for m in llama.modules())
