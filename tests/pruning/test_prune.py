"""End-to-end: prune() vs an independent, slow re-implementation of the Wanda reference code, plus the API contract.

The reference below follows locuslab/wanda lib/prune.py (prune_wanda) and lib/layerwrapper.py (WrappedGPT):
inputs of the first block are caught one sequence at a time; for each block, forward hooks on its Linear / Conv1D
layers keep the running mean ``scaler_row`` over sequences of ``||x_j||^2`` (float32) while the dense block runs
over every sequence; every layer of the block is then pruned from ``|W| * sqrt(scaler_row)`` (stable sort per row,
N:M per group, or the ``--use_variant`` bisection), and the pruned block is run again to make the next block's
inputs. One-shot: one dense forward of the whole model with hooks on every layer, then pruning. Unlike the reference
code, tokens whose attention mask is 0 are left out of ``scaler_row`` (the reference code never pads).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers.models import VOCAB, make_batches
from torch import nn
from transformers.pytorch_utils import Conv1D

from wanda_lightning import Magnitude, SkippedLayer, Wanda, prune

# --- reference ------------------------------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("single_thread")


class _Caught(Exception):
    def __init__(self, args, kwargs):
        super().__init__()
        self.args = args
        self.kwargs = kwargs


def _block_stack(model):
    if hasattr(model, "model"):
        return "model.layers", model.model.layers
    return "transformer.h", model.transformer.h


def _layers_of(module, prefix):
    """Full name -> (module, transposed) for every Linear / Conv1D under ``module``."""
    found = {}
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found[f"{prefix}.{name}"] = (sub, False)
        elif isinstance(sub, Conv1D):
            found[f"{prefix}.{name}"] = (sub, True)
    return found


def _weight_2d(module, transposed):
    return module.weight.data.t() if transposed else module.weight.data


class WrappedLayer:
    """WrappedGPT.add_batch, fed one sequence at a time, optionally without its padding tokens."""

    def __init__(self, columns, device):
        self.scaler_row = torch.zeros(columns, device=device)
        self.nsamples = 0
        self.token_mask = None

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1])  # (T, in) of one sequence
        if self.token_mask is not None:
            inp = inp[self.token_mask.reshape(-1).bool()]
        tmp = 1
        inp = inp.t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float32)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def reference_prune_mask(w_metric, spec):
    """Boolean mask of the weights to zero, as in prune_wanda (stable sorts everywhere; N = kept per group)."""
    mask = torch.zeros_like(w_metric, dtype=torch.bool)
    kind = spec[0]
    if kind == "n:m":
        n, m = spec[1], spec[2]
        for ii in range(0, w_metric.shape[1], m):
            tmp = w_metric[:, ii : ii + m].float()
            mask.scatter_(1, ii + torch.sort(tmp, dim=1, stable=True)[1][:, : m - n], True)
        return mask
    sparsity = spec[1]
    sort_res = torch.sort(w_metric, dim=-1, stable=True)
    if kind == "variant":
        tmp_metric = torch.cumsum(sort_res[0], dim=1)
        sum_before = w_metric.sum(dim=1)

        def return_given_alpha(alpha):
            thres_cumsum = sum_before * alpha
            sort_mask = tmp_metric <= thres_cumsum.reshape((-1, 1))
            count = sort_mask.sum(dim=1, keepdims=True)
            thres = torch.gather(sort_res[0], dim=1, index=(count - 1).clamp_min(0))
            w_mask = (w_metric <= thres) & (count > 0)  # a row with count 0 prunes nothing
            return w_mask, (w_mask == True).sum() / w_mask.numel()  # noqa: E712 - as in the reference

        alpha = 0.4
        alpha_hist = [0.0, 0.8]
        w_mask, cur_sparsity = return_given_alpha(alpha)
        while (torch.abs(cur_sparsity - sparsity) > 0.001) and (alpha_hist[1] - alpha_hist[0] >= 0.001):
            if cur_sparsity > sparsity:
                alpha_new = (alpha + alpha_hist[0]) / 2.0
                alpha_hist[1] = alpha
            else:
                alpha_new = (alpha + alpha_hist[1]) / 2.0
                alpha_hist[0] = alpha
            alpha = alpha_new
            w_mask, cur_sparsity = return_given_alpha(alpha)
        return w_mask
    indices = sort_res[1][:, : int(w_metric.shape[1] * sparsity)]
    mask.scatter_(1, indices, True)
    return mask


def _prune_wrapped(layers, wrapped, spec):
    masks = {}
    for name, (module, transposed) in layers.items():
        weight = _weight_2d(module, transposed)
        w_metric = torch.abs(weight) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
        w_mask = reference_prune_mask(w_metric, spec)
        weight[w_mask] = 0
        masks[name] = w_mask
    return masks


def _sequences(batches):
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            yield batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]


def _hook_all(layers, wrapped):
    def add_batch(name):
        def tmp(_, inp, out):
            wrapped[name].add_batch(inp[0].data)

        return tmp

    return [module.register_forward_hook(add_batch(name)) for name, (module, _) in layers.items()]


@torch.no_grad()
def reference_wanda(model, batches, spec, sequential=True, select=lambda name: True):
    """Prunes ``model`` in place like the reference code; returns {layer name: boolean pruned mask}."""
    prefix, blocks = _block_stack(model)
    sequences = list(_sequences(batches))
    masks = {}
    if not sequential:
        layers = {}
        for i, block in enumerate(blocks):
            layers.update({k: v for k, v in _layers_of(block, f"{prefix}.{i}").items() if select(k)})
        wrapped = {name: WrappedLayer(_weight_2d(*layer).shape[1], "cpu") for name, layer in layers.items()}
        handles = _hook_all(layers, wrapped)
        for ids, attention_mask in sequences:
            for w in wrapped.values():
                w.token_mask = attention_mask
            model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        for h in handles:
            h.remove()
        return _prune_wrapped(layers, wrapped, spec)

    def catcher(module, args, kwargs):
        raise _Caught(args, kwargs)

    inps = []
    handle = blocks[0].register_forward_pre_hook(catcher, with_kwargs=True)
    for ids, attention_mask in sequences:
        try:
            model(input_ids=ids, attention_mask=attention_mask, use_cache=False)
        except _Caught as caught:
            inps.append([caught.args[0], caught.args[1:], caught.kwargs, attention_mask])
        else:
            raise AssertionError("block 0 not reached")
    handle.remove()

    def run(block, record):
        out = block(record[0], *record[1], **record[2])
        return out[0] if isinstance(out, tuple) else out

    for i, block in enumerate(blocks):
        layers = {k: v for k, v in _layers_of(block, f"{prefix}.{i}").items() if select(k)}
        wrapped = {name: WrappedLayer(_weight_2d(*layer).shape[1], "cpu") for name, layer in layers.items()}
        handles = _hook_all(layers, wrapped)
        for record in inps:
            for w in wrapped.values():
                w.token_mask = record[3]
            run(block, record)
        for h in handles:
            h.remove()
        masks.update(_prune_wrapped(layers, wrapped, spec))
        outs = [run(block, record) for record in inps]
        for record, out in zip(inps, outs, strict=True):
            record[0] = out
    return masks


# --- helpers --------------------------------------------------------------------------------------------------------

CONFIGS = {
    "unstructured-0.3": (dict(sparsity=0.3), ("unstructured", 0.3)),
    "unstructured-0.5": (dict(sparsity=0.5), ("unstructured", 0.5)),
    "unstructured-0.8": (dict(sparsity=0.8), ("unstructured", 0.8)),
    "2:4": (dict(structure="2:4"), ("n:m", 2, 4)),
    "4:8": (dict(structure="4:8"), ("n:m", 4, 8)),
    "variant-0.5": (dict(sparsity=0.5, method=Wanda(variant=True)), ("variant", 0.5)),
}


def run_library(model, batches, **kwargs):
    keeps = {}

    def record(name, keep):
        keeps[name] = keep.clone()

    report = prune(model, batches, on_layer_pruned=record, **kwargs)
    return report, keeps


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different}"


def assert_masks_equal(keeps, reference_masks):
    assert sorted(keeps) == sorted(reference_masks)
    mismatches = {name: int((keeps[name] != ~reference_masks[name]).sum()) for name in keeps}
    assert not any(mismatches.values()), f"mask entries differing from the reference: {mismatches}"


# --- end to end vs the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one_shot"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("tiny_model", ["llama", "gpt2"], indirect=True)
def test_matches_reference(tiny_model, config, sequential, dtype, calibration_batches):
    kwargs, spec = CONFIGS[config]
    model = tiny_model.to(dtype)
    reference = copy.deepcopy(model)
    report, keeps = run_library(model, calibration_batches, sequential=sequential, **kwargs)
    reference_masks = reference_wanda(reference, calibration_batches, spec, sequential=sequential)

    assert report.sequential is sequential
    assert len(report.layers) == (8 if hasattr(model, "transformer") else 14)
    assert_masks_equal(keeps, reference_masks)
    assert_same_state(model, reference)  # same zeros, nothing else touched
    for layer in report.layers:
        assert layer.num_tokens == 2 * 4 * 16
        if spec[0] == "unstructured":
            assert layer.num_pruned == layer.shape[0] * math.floor(layer.shape[1] * spec[1])
        elif spec[0] == "n:m":
            assert layer.num_pruned == layer.shape[0] * layer.shape[1] * (spec[2] - spec[1]) // spec[2]


@pytest.mark.parametrize("tiny_model", ["llama", "gpt2"], indirect=True)
def test_sequential_differs_from_one_shot(tiny_model, calibration_batches):
    # Guards the comparison above: block 1 sees the pruned block 0 only in sequential mode, so the modes differ there.
    one_shot = copy.deepcopy(tiny_model)
    _, sequential_keeps = run_library(tiny_model, calibration_batches, sparsity=0.5)
    _, one_shot_keeps = run_library(one_shot, calibration_batches, sparsity=0.5, sequential=False)
    prefix = _block_stack(tiny_model)[0]
    for name in sequential_keeps:
        same = torch.equal(sequential_keeps[name], one_shot_keeps[name])
        assert same == name.startswith(f"{prefix}.0."), name


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one_shot"])
def test_selected_targets_match_reference(llama, calibration_batches, sequential):
    reference = copy.deepcopy(llama)
    report, keeps = run_library(llama, calibration_batches, targets=["re:.*\\.(q|k)_proj"], sequential=sequential)
    masks = reference_wanda(
        reference,
        calibration_batches,
        ("unstructured", 0.5),
        sequential=sequential,
        select=lambda name: name.endswith(("q_proj", "k_proj")),
    )
    assert [layer.name for layer in report.layers] == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qk"
    ]
    assert_masks_equal(keeps, masks)
    assert_same_state(llama, reference)


# --- padding --------------------------------------------------------------------------------------------------------

LENGTHS = [16, 9, 4, 12]


def padded_and_trimmed(seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (len(LENGTHS), 16), generator=generator)
    mask = torch.zeros(len(LENGTHS), 16, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        mask[i, :length] = 1
    padded = [{"input_ids": ids, "attention_mask": mask}]  # right padding: real tokens see the same positions
    trimmed = [
        {"input_ids": ids[i : i + 1, :length], "attention_mask": torch.ones(1, length, dtype=torch.long)}
        for i, length in enumerate(LENGTHS)
    ]
    return padded, trimmed


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one_shot"])
@pytest.mark.parametrize("tiny_model", ["llama", "gpt2"], indirect=True)
def test_padding_tokens_do_not_count(tiny_model, sequential):
    padded, trimmed = padded_and_trimmed()
    trimmed_model = copy.deepcopy(tiny_model)
    reference = copy.deepcopy(tiny_model)
    unmasked_model = copy.deepcopy(tiny_model)

    report, keeps = run_library(tiny_model, padded, sequential=sequential)
    _, trimmed_keeps = run_library(trimmed_model, trimmed, sequential=sequential)
    masks = reference_wanda(reference, padded, ("unstructured", 0.5), sequential=sequential)

    assert all(layer.num_tokens == sum(LENGTHS) for layer in report.layers)
    assert report.num_samples == 4 and report.num_batches == 1
    assert_masks_equal(keeps, masks)
    assert_same_state(tiny_model, reference)
    # Same real tokens without padding (right padding leaves their hidden states unchanged) -> the same masks.
    assert all(torch.equal(keeps[name], trimmed_keeps[name]) for name in keeps)
    # ... while counting the padding would change them.
    unmasked = [{"input_ids": padded[0]["input_ids"]}]
    unmasked_report, unmasked_keeps = run_library(unmasked_model, unmasked, sequential=sequential)
    assert all(layer.num_tokens == 4 * 16 for layer in unmasked_report.layers)
    assert any(not torch.equal(keeps[name], unmasked_keeps[name]) for name in keeps)


# --- layers outside the blocks, skipping and reporting --------------------------------------------------------------


def test_llama_lm_head_ignored_by_default(llama, calibration_batches):
    head = llama.lm_head.weight.detach().clone()
    report = prune(llama, calibration_batches)
    assert report.skipped == [SkippedLayer("lm_head", "matches `ignore`")]
    assert "lm_head" not in {layer.name for layer in report.layers}
    assert torch.equal(llama.lm_head.weight, head)


def test_llama_lm_head_pruned_after_the_blocks_when_not_ignored(llama, calibration_batches):
    reference = copy.deepcopy(llama)
    report, keeps = run_library(llama, calibration_batches, ignore=[])
    assert report.skipped == []
    assert report.layers[-1].name == "lm_head" and report.layers[-1].block is None
    assert report.layers[-1].num_tokens == 2 * 4 * 16
    # Reference: the blocks as usual, then lm_head calibrated on the pruned model (one forward per sequence).
    masks = reference_wanda(reference, calibration_batches, ("unstructured", 0.5))
    layers = {"lm_head": (reference.lm_head, False)}
    wrapped = {"lm_head": WrappedLayer(64, "cpu")}
    handles = _hook_all(layers, wrapped)
    with torch.no_grad():
        for ids, attention_mask in _sequences(calibration_batches):
            reference(input_ids=ids, attention_mask=attention_mask)
    for h in handles:
        h.remove()
    with torch.no_grad():
        masks.update(_prune_wrapped(layers, wrapped, ("unstructured", 0.5)))
    assert_masks_equal(keeps, masks)
    assert_same_state(llama, reference)


def test_gpt2_tied_lm_head_is_skipped_with_reason(gpt2, calibration_batches):
    embedding = gpt2.transformer.wte.weight.detach().clone()
    for ignore in (None, []):
        model = copy.deepcopy(gpt2)
        report = prune(model, calibration_batches, ignore=ignore)
        assert [s.name for s in report.skipped] == ["lm_head"]
        assert "embedding" in report.skipped[0].reason and "transformer.wte" in report.skipped[0].reason
        assert torch.equal(model.transformer.wte.weight, embedding)
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        assert "lm_head" in str(report) and "lm_head" in report.to_markdown()


@pytest.mark.parametrize("tiny_model", ["llama", "gpt2"], indirect=True)
def test_report_contents(tiny_model, calibration_batches):
    is_gpt2 = hasattr(tiny_model, "transformer")
    report = prune(tiny_model, calibration_batches, sparsity=0.3)
    modules = dict(tiny_model.named_modules())
    assert report.method == "wanda" and report.structure == "unstructured" and report.target_sparsity == 0.3
    assert report.sequential and report.block_stack == ("transformer.h" if is_gpt2 else "model.layers")
    assert report.num_samples == 8 and report.num_batches == 2 and report.num_tokens == 128
    total = pruned = 0
    for layer in report.layers:
        module = modules[layer.name]
        weight = module.weight.t() if is_gpt2 else module.weight
        assert layer.kind == ("Conv1D" if is_gpt2 else "Linear")
        assert layer.shape == tuple(weight.shape)
        assert layer.block == int(layer.name.split(".")[2])
        zeros = int((weight == 0).sum())
        assert layer.num_pruned == zeros == weight.shape[0] * math.floor(weight.shape[1] * 0.3)
        assert layer.sparsity == zeros / weight.numel()
        assert layer.target_sparsity == 0.3 and layer.num_tokens == 128
        total += weight.numel()
        pruned += zeros
    if not is_gpt2:
        shapes = {layer.name.split(".")[-1]: layer.shape for layer in report.layers}
        assert shapes == {
            "q_proj": (64, 64),
            "k_proj": (32, 64),
            "v_proj": (32, 64),
            "o_proj": (64, 64),
            "gate_proj": (128, 64),
            "up_proj": (128, 64),
            "down_proj": (64, 128),
        }
    assert report.num_parameters == total and report.num_pruned == pruned
    assert report.global_sparsity == pruned / total

    data = report.to_dict()
    json.dumps(data)
    assert [d["name"] for d in data["layers"]] == [layer.name for layer in report.layers]
    assert data["layers"][0]["shape"] == list(report.layers[0].shape)
    assert data["global_sparsity"] == report.global_sparsity and data["num_tokens"] == 128
    assert data["skipped"] == [{"name": s.name, "reason": s.reason} for s in report.skipped]
    text, markdown = str(report), report.to_markdown()
    for layer in report.layers:
        assert layer.name in text and f"`{layer.name}`" in markdown
    assert f"{report.global_sparsity:.2%}" in text and f"{report.global_sparsity:.2%}" in markdown


def test_n_m_report(llama, calibration_batches):
    report = prune(llama, calibration_batches, structure="1:4")
    assert report.structure == "1:4" and report.target_sparsity == 0.75
    assert report.global_sparsity == 0.75 and all(layer.sparsity == 0.75 for layer in report.layers)
    weight = llama.model.layers[1].mlp.down_proj.weight
    assert ((weight.reshape(64, 32, 4) != 0).sum(dim=-1) == 1).all()


# --- model state after pruning --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one_shot"])
@pytest.mark.parametrize("tiny_model", ["llama", "gpt2"], indirect=True)
def test_model_state_is_preserved(tiny_model, calibration_batches, sequential):
    model = tiny_model.to(torch.bfloat16)
    model.train()
    blocks = _block_stack(model)[1]
    blocks[1].eval()  # a mixed pattern of modes must come back as it was
    modes = {name: module.training for name, module in model.named_modules()}
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    use_cache = model.config.use_cache
    user_hook = blocks[0].register_forward_pre_hook(lambda module, args: None)

    prune(model, calibration_batches, sequential=sequential)

    assert {name: module.training for name, module in model.named_modules()} == modes
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert model.config.use_cache == use_cache
    assert list(blocks[0]._forward_pre_hooks) == [user_hook.id]
    user_hook.remove()
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, name
    # still a working model
    with torch.no_grad():
        logits = model(**calibration_batches[0]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_no_autograd_graph(llama, calibration_batches):
    # Calibration and masking run without autograd, even though every parameter requires grad.
    seen = []
    handle = llama.model.layers[1].mlp.up_proj.register_forward_hook(
        lambda module, inputs, output: seen.append(output.requires_grad or torch.is_grad_enabled())
    )
    grad_mode = []
    report = prune(llama, calibration_batches, on_layer_pruned=lambda name, keep: grad_mode.append(keep.requires_grad))
    handle.remove()
    assert seen and not any(seen)
    assert len(grad_mode) == len(report.layers) and not any(grad_mode)
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in llama.parameters())
    assert all(p.requires_grad for p in llama.parameters())
    llama(**calibration_batches[0]).logits.sum().backward()  # the pruned model still trains
    assert llama.model.layers[0].mlp.up_proj.weight.grad is not None


# --- magnitude ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("tiny_model", ["llama", "gpt2"], indirect=True)
def test_magnitude_needs_no_calibration(tiny_model, structure):
    reference = copy.deepcopy(tiny_model)
    kwargs = dict(sparsity=0.6) if structure == "unstructured" else dict(structure="2:4")
    report, keeps = run_library(tiny_model, None, method="magnitude", **kwargs)
    assert report.method == "magnitude" and not report.sequential and report.num_samples == 0
    assert all(layer.num_tokens == 0 for layer in report.layers)
    spec = ("unstructured", 0.6) if structure == "unstructured" else ("n:m", 2, 4)
    prefix, blocks = _block_stack(reference)
    masks = {}
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for name, (module, transposed) in _layers_of(block, f"{prefix}.{i}").items():
                weight = _weight_2d(module, transposed)
                masks[name] = reference_prune_mask(weight.abs().float(), spec)
                weight[masks[name]] = 0
    assert_masks_equal(keeps, masks)
    assert_same_state(tiny_model, reference)
    # data is ignored when given
    again = copy.deepcopy(reference)
    prune(
        again,
        make_batches(),
        method=Magnitude(),
        sparsity=0.6 if structure == "unstructured" else None,
        structure=structure,
    )
    assert_same_state(again, reference)


# --- targets / ignore patterns --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "ignore", "expected"),
    [
        (["*.mlp.*"], None, {"gate_proj", "up_proj", "down_proj"}),
        (["re:.*\\.(q|k)_proj"], None, {"q_proj", "k_proj"}),
        (["re:(q|v)_proj"], None, {"q_proj", "v_proj"}),
        (["*_proj"], ["*.self_attn.*"], {"gate_proj", "up_proj", "down_proj"}),
        (None, ["re:.*\\.(gate|up|down)_proj", "lm_head"], {"q_proj", "k_proj", "v_proj", "o_proj"}),
        # a custom `ignore` replaces the default ["lm_head"]
        (None, ["re:.*\\.(gate|up|down)_proj"], {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"}),
        ("o_proj", None, {"o_proj"}),
        (["model.layers.1.*"], None, {"1.*"}),
    ],
)
def test_target_and_ignore_patterns(llama, calibration_batches, targets, ignore, expected):
    original = copy.deepcopy(llama.state_dict())
    report = prune(llama, calibration_batches, targets=targets, ignore=ignore, sequential=False)
    pruned = {layer.name for layer in report.layers}
    linear = [name for name, module in llama.named_modules() if isinstance(module, nn.Linear)]
    if expected == {"1.*"}:
        assert pruned == {name for name in linear if name.startswith("model.layers.1.")} and len(pruned) == 7
    else:
        assert pruned == {name for name in linear if name.split(".")[-1] in expected}
    for name, tensor in llama.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module_name in pruned:
            assert not torch.equal(tensor, original[name]), name
        else:
            assert torch.equal(tensor, original[name]), name


def test_ignore_a_whole_block(llama, calibration_batches):
    original = copy.deepcopy(llama.state_dict())
    report = prune(llama, calibration_batches, ignore=["model.layers.0.*", "lm_head"])
    assert {layer.block for layer in report.layers} == {1}
    assert {s.name for s in report.skipped} == {"lm_head"} | {
        n for n, m in llama.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)
    }
    assert all(torch.equal(t, original[k]) for k, t in llama.state_dict().items() if k.startswith("model.layers.0."))


# --- batching -------------------------------------------------------------------------------------------------------


def _cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _split(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in batch.items()})
        start += size
    return out


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one_shot"])
def test_batch_size_rebatching_equals_manual_batches(llama, calibration_batches, sequential):
    manual = _split(_cat(calibration_batches), [3, 3, 2])
    manual_model = copy.deepcopy(llama)
    report = prune(llama, calibration_batches, batch_size=3, sequential=sequential)
    manual_report = prune(manual_model, manual, sequential=sequential)
    assert report.num_batches == manual_report.num_batches == 3 and report.num_samples == 8
    assert_same_state(llama, manual_model)


def test_num_samples_equals_manual_batches(gpt2, calibration_batches):
    manual = _split(_cat(calibration_batches), [4, 1])
    manual_model = copy.deepcopy(gpt2)
    report = prune(gpt2, calibration_batches, num_samples=5)
    manual_report = prune(manual_model, manual)
    assert report.num_samples == manual_report.num_samples == 5
    assert report.num_batches == 2 and report.num_tokens == 5 * 16
    assert_same_state(gpt2, manual_model)


def test_num_samples_and_batch_size_together_and_from_a_generator(gpt2, calibration_batches):
    manual = _split(_cat(calibration_batches), [2, 2, 2, 1])
    manual_model = copy.deepcopy(gpt2)
    report = prune(gpt2, (b for b in calibration_batches), num_samples=7, batch_size=2)
    prune(manual_model, manual)
    assert report.num_samples == 7 and report.num_batches == 4
    assert_same_state(gpt2, manual_model)


def test_num_samples_none_uses_everything_and_default_is_128(llama):
    batches = make_batches(num_batches=3, batch=50, seq_len=4)
    report = prune(copy.deepcopy(llama), batches, num_samples=None, sequential=False)
    assert report.num_samples == 150 and report.num_tokens == 600
    report = prune(llama, batches, sequential=False)
    assert report.num_samples == 128 and report.num_batches == 3 and report.num_tokens == 512


def test_explicit_cpu_device_and_offload_give_the_same_result(gpt2, calibration_batches):
    other = copy.deepcopy(gpt2)
    prune(gpt2, calibration_batches)
    prune(other, calibration_batches, device="cpu", offload_device=torch.device("cpu"))
    assert_same_state(gpt2, other)
    assert all(p.device.type == "cpu" for p in other.parameters())


def test_batch_size_one_matches_reference_exactly(gpt2, calibration_batches):
    reference = copy.deepcopy(gpt2)
    _, keeps = run_library(gpt2, calibration_batches, batch_size=1, structure="4:8")
    assert_masks_equal(keeps, reference_wanda(reference, calibration_batches, ("n:m", 4, 8)))
    assert_same_state(gpt2, reference)


def test_tuple_and_tensor_batches(calibration_batches):
    # plain modules: a tensor batch and a (tensor,) tuple batch feed model(x) the same way
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(6, 8)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    prune(a, [x[:3], x[3:]], sparsity=0.5)
    prune(b, [(x[:3],), (x[3:],)], sparsity=0.5)
    assert_same_state(a, b)
    # reference: stats from x through the dense net (one shot: no block stack of identical blocks here)
    with torch.no_grad():
        h = torch.relu(net[0](x))
    for layer, inputs in ((net[0], x), (net[2], h)):
        metric = layer.weight.abs() * (inputs.double().square().sum(0) / 6).sqrt().float()
        expected = reference_prune_mask(metric, ("unstructured", 0.5))
        assert torch.equal(a[0 if layer is net[0] else 2].weight == 0, expected)
