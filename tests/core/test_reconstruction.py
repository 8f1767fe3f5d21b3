"""Block reconstruction: the pure training function, and the pipeline running it after ``shrink()`` and ``prune()``,
checked against a slow reference that trains the block by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.models import make_batches, tiny_llama
from torch import nn

from wanda_lightning import Reconstruction, prune, shrink
from wanda_lightning.core.reconstruction import reconstruct_block, reconstruction_error


def _mlp_block(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))


def _inputs(count: int = 3, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 6, generator=generator) for _ in range(count)]


def _run(inputs):
    return lambda module, i, cast: module(cast(inputs[i]))


def test_training_lowers_the_error_and_touches_only_the_chosen_parameters():
    block, inputs = _mlp_block(), _inputs()
    targets = [_mlp_block(1)(x).detach() for x in inputs]
    frozen = block[0].weight.detach().clone()
    fit = reconstruct_block(
        block, _run(inputs), targets, [None] * 3, [block[2].weight, block[2].bias], [None, None],
        Reconstruction(steps=60, learning_rate=1e-2),
    )  # fmt: skip
    assert fit.kept and fit.error_after < 0.9 * fit.error_before
    assert torch.equal(block[0].weight, frozen)
    assert all(p.requires_grad for p in block.parameters())  # flags restored
    with torch.no_grad():
        sums = [reconstruction_error(block(x), t) for x, t in zip(inputs, targets, strict=True)]
    measured = sum(float(d) for d, _ in sums) / sum(float(e) for _, e in sums)
    with torch.no_grad():
        errors = [((block(x) - t) ** 2).sum(-1) / (t**2).sum(-1) for x, t in zip(inputs, targets, strict=True)]
    per_token = torch.cat([e.flatten() for e in errors])
    assert measured == pytest.approx(float(per_token.mean()), rel=1e-5)
    assert measured == pytest.approx(fit.error_after, rel=1e-5)


def test_matches_a_hand_written_adam_loop():
    block, inputs = _mlp_block(), _inputs()
    targets = [_mlp_block(1)(x).detach() for x in inputs]
    reference = copy.deepcopy(block)
    options = Reconstruction(steps=7, learning_rate=3e-3)
    reconstruct_block(block, _run(inputs), targets, [None] * 3, list(block.parameters()), [None] * 4, options)

    params = list(reference.parameters())
    optimizer = torch.optim.Adam(params, lr=options.learning_rate)
    for step in range(options.steps):
        optimizer.param_groups[0]["lr"] = options.learning_rate * (1 + math.cos(math.pi * step / options.steps)) / 2
        x, target = inputs[step % 3], targets[step % 3]
        loss = (((reference(x) - target) ** 2).sum(-1) / (target**2).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for found, expected in zip(block.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def test_held_weights_stay_zero_and_masked_tokens_do_not_count():
    block, inputs = _mlp_block(), _inputs()
    targets = [_mlp_block(1)(x).detach() for x in inputs]
    held = torch.rand(block[0].weight.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    with torch.no_grad():
        block[0].weight[held] = 0
    masks = [torch.ones(2, 5, dtype=torch.bool) for _ in inputs]
    for mask in masks:
        mask[:, -2:] = False
    poisoned = [t.clone() for t in targets]
    for target in poisoned:
        target[:, -2:] = 1e6  # only masked tokens are wrong: they must not steer training
    options = Reconstruction(steps=20, learning_rate=3e-4)
    twin = copy.deepcopy(block)
    reconstruct_block(block, _run(inputs), poisoned, masks, [block[0].weight], [held], options)
    reconstruct_block(twin, _run(inputs), [t.clone() for t in targets], masks, [twin[0].weight], [held], options)
    assert bool((block[0].weight[held] == 0).all())
    torch.testing.assert_close(block[0].weight, twin[0].weight)


def test_worse_training_is_undone():
    block, inputs = _mlp_block(), _inputs()
    targets = [block(x).detach() for x in inputs]  # already exact: any step makes it worse
    before = copy.deepcopy(block.state_dict())
    fit = reconstruct_block(
        block, _run(inputs), targets, [None] * 3, list(block.parameters()), [None] * 4,
        Reconstruction(steps=3, learning_rate=1.0),
    )  # fmt: skip
    assert not fit.kept and fit.error_after == fit.error_before
    for name, value in block.state_dict().items():
        assert torch.equal(value, before[name])


def test_a_bfloat16_block_trains_in_float32_and_keeps_its_dtype():
    block, inputs = _mlp_block(), _inputs()
    targets = [_mlp_block(1)(x).detach() for x in inputs]
    low = copy.deepcopy(block).to(torch.bfloat16)
    reference = copy.deepcopy(low).float()  # what training in float32 starts from
    options = Reconstruction(steps=10, learning_rate=1e-2)
    low_inputs = [x.to(torch.bfloat16) for x in inputs]
    fit = reconstruct_block(low, _run(low_inputs), targets, [None] * 3, list(low.parameters()), [None] * 4, options)
    reconstruct_block(
        reference, _run([x.float() for x in low_inputs]), targets, [None] * 3, list(reference.parameters()),
        [None] * 4, options,
    )  # fmt: skip
    assert fit.kept and {p.dtype for p in low.parameters()} == {torch.bfloat16}
    for found, expected in zip(low.parameters(), reference.parameters(), strict=True):
        assert torch.equal(found, expected.to(torch.bfloat16))


def test_a_callers_autocast_does_not_lower_the_precision():
    block, inputs = _mlp_block(), _inputs()
    targets = [_mlp_block(1)(x).detach() for x in inputs]
    twin = copy.deepcopy(block)
    options = Reconstruction(steps=5, learning_rate=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reconstruct_block(block, _run(inputs), targets, [None] * 3, list(block.parameters()), [None] * 4, options)
    reconstruct_block(twin, _run(inputs), targets, [None] * 3, list(twin.parameters()), [None] * 4, options)
    for found, expected in zip(block.parameters(), twin.parameters(), strict=True):
        assert torch.equal(found, expected)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 1.5}, {"learning_rate": 0}, {"learning_rate": -1e-3}])
def test_bad_options_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        Reconstruction(**bad)


# --- in the pipeline ------------------------------------------------------------------------------------------------


def _one_block_llama() -> nn.Module:
    return tiny_llama(num_hidden_layers=1)


def test_shrink_reconstruct_equals_least_squares_then_training_the_mlp_by_hand():
    batches = make_batches()
    dense = _one_block_llama()
    model, reference = copy.deepcopy(dense), copy.deepcopy(dense)
    options = Reconstruction(steps=5, learning_rate=3e-4)
    report = shrink(model, batches, mlp=0.5, method="flap", update=options)
    shrink(reference, batches, mlp=0.5, method="flap", update="least-squares")

    # The slow reference: the dense block's outputs, then Adam on the shrunk MLP's weights by hand.
    captured: list[tuple] = []
    layer = dense.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, a, k: captured.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            dense(**batch)
    handle.remove()

    def run(block, i):
        args, kwargs = captured[i]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        output = block(*args, **kwargs)
        return output[0] if isinstance(output, tuple) else output

    with torch.no_grad():
        targets = [run(layer, i) for i in range(len(batches))]
    block = reference.model.layers[0]
    params = [p for proj in ("gate_proj", "up_proj", "down_proj") for p in getattr(block.mlp, proj).parameters()]
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=options.learning_rate)
    for step in range(options.steps):
        optimizer.param_groups[0]["lr"] = options.learning_rate * (1 + math.cos(math.pi * step / options.steps)) / 2
        target = targets[step % len(batches)]
        loss = (((run(block, step % len(batches)) - target) ** 2).sum(-1) / (target**2).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for (name, found), expected in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-6, msg=name)
    assert report.reconstruction is not None and "5 steps" in report.method
    before, after = report.reconstruction_error
    assert after < before and report.reconstruction_undone == 0
    assert report.dense_forward_seconds > 0 and report.reconstruction_seconds > 0
    assert "reconstruction" in str(report)


def test_shrink_reconstruct_lowers_the_block_error_of_a_two_block_model_and_keeps_attention():
    batches = make_batches()
    model, least_squares = tiny_llama(), tiny_llama()
    attention = copy.deepcopy(model.model.layers[1].self_attn.state_dict())
    report = shrink(model, batches, mlp=0.5, update=Reconstruction(steps=20, learning_rate=3e-4))
    shrink(least_squares, batches, mlp=0.5, update="least-squares")
    dense = tiny_llama()
    with torch.no_grad():
        target = dense(**batches[0], output_hidden_states=True).hidden_states[-1]
        found = model(**batches[0], output_hidden_states=True).hidden_states[-1]
        baseline = least_squares(**batches[0], output_hidden_states=True).hidden_states[-1]
    assert float((found - target).pow(2).sum()) < float((baseline - target).pow(2).sum())
    for name, value in model.model.layers[1].self_attn.state_dict().items():
        assert torch.equal(value, attention[name])  # heads kept: attention is not trained
    assert report.units("mlp") == (128, 64) and report.reconstruction_undone == 0


def test_prune_reconstruct_keeps_exact_sparsity_and_lowers_the_output_error():
    batches = make_batches()
    model, plain, dense = tiny_llama(), tiny_llama(), tiny_llama()
    report = prune(model, batches, sparsity=0.5, refine=Reconstruction(steps=20, learning_rate=3e-4))
    prune(plain, batches, sparsity=0.5)
    for layer in report.layers:
        weight = model.get_submodule(layer.name).weight
        assert int((weight == 0).sum()) == weight.numel() // 2
    with torch.no_grad():
        target = dense(**batches[0]).logits
        error = float((model(**batches[0]).logits - target).pow(2).sum())
        baseline = float((plain(**batches[0]).logits - target).pow(2).sum())
    assert error < baseline
    assert report.reconstruction_error is not None and report.reconstruction_undone == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, b: shrink(m, b, mlp=0.5, update="reconstruct", sequential=False), "sequential=False"),
        (lambda m, b: shrink(m, b, mlp=0.5, update="reconstruct", widths="adaptive"), "widths='adaptive'"),
        (lambda m, b: prune(m, b, sparsity=0.5, refine="reconstruct", sequential=False), "sequential=False"),
    ],
)
def test_reconstruction_without_block_sequential_calibration_is_refused_untouched(call, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        call(model, make_batches())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_an_unknown_update_or_refine_names_every_choice():
    with pytest.raises(ValueError, match=r"\['none', 'bias', 'least-squares', 'reconstruct'\] or a Reconstruction"):
        shrink(tiny_llama(), make_batches(), mlp=0.5, update="reconstructed")
    with pytest.raises(ValueError, match=r"'admm-update', 'reconstruct'\], a Refinement or a Reconstruction"):
        prune(tiny_llama(), make_batches(), sparsity=0.5, refine="recon")
