"""PEFT LoRA / DoRA models: the base layers are pruned from the statistics of the wrapper's input, the adapters never;
the masks hold while the adapters train; ``merge_adapters`` and the exports keep the merged model exactly sparse."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import PRUNE_FAST, char_tokenizer, tiny_llama_config, transformers
from helpers.models import make_batches, tiny_llama
from helpers.trainer import Snapshot, loader, make_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from wanda_lightning import (
    AfterEpoch,
    CalibrationOptions,
    CausalLMModule,
    WandaPruningCallback,
    load_pruned,
    merge_adapters,
    prune,
    save_pruned,
)
from wanda_lightning.core.targets import find_targets

peft = pytest.importorskip("peft")

LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def lora_llama(*, dora: bool = False, zero_update: bool = False) -> Any:
    """A tiny Llama with LoRA (or DoRA) on q, v, up and down; ``zero_update``: peft's default init (B = 0)."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, use_dora=dora, init_lora_weights=zero_update
    )
    torch.manual_seed(1)
    return peft.get_peft_model(tiny_llama(), config)


def masks_of(model: nn.Module, batches: list[Any], **kwargs: Any) -> dict[str, Tensor]:
    masks: dict[str, Tensor] = {}
    prune(model, batches, sparsity=0.5, on_layer_pruned=lambda n, k: masks.__setitem__(n, k.clone()), **kwargs)
    return masks


def wanda_keep(weight: Tensor, sum_sq: Tensor, sequences: int) -> Tensor:
    scores = weight.double().abs() * (sum_sq / sequences).sqrt()
    order = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, : weight.shape[1] // 2], False)
    return keep


def test_adapters_are_never_targets_and_patterns_see_the_wrapped_names():
    model = lora_llama(dora=True)
    layers, skipped = find_targets(model)
    names = [t.name for t in layers]
    assert not any("lora_" in name for name in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in names
    assert "base_model.model.model.layers.0.self_attn.k_proj" in names  # not wrapped: itself
    assert len(names) == 14 and skipped == [("base_model.model.lm_head", "matches `ignore`")]
    # A pattern written for the plain model selects the base layer through its wrapper's name.
    only_q = [t.name for t in find_targets(model, targets=["*.q_proj"])[0]]
    assert only_q == [f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer" for i in range(2)]
    ignored = [t.name for t in find_targets(model, ignore=["lm_head", "*.q_proj"])[0]]
    assert len(ignored) == 12 and not any(".q_proj" in name for name in ignored)


def test_modules_to_save_prunes_the_copy_that_runs_and_merges_it():
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["up_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(tiny_llama(), config)
    layers, skipped = find_targets(model)
    names = [t.name for t in layers]
    assert "base_model.model.model.layers.0.mlp.up_proj.modules_to_save.default" in names
    original = "base_model.model.model.layers.0.mlp.up_proj.original_module"
    assert original not in names and (original, "inactive original of peft's modules_to_save (its trained copy runs "
                                      "instead)") in skipped  # fmt: skip
    masks = masks_of(model, make_batches())  # every target reached: the original never runs
    merged = merge_adapters(model)
    up = merged.model.layers[0].mlp.up_proj.weight
    assert torch.equal(up != 0, masks["base_model.model.model.layers.0.mlp.up_proj.modules_to_save.default"])


def test_a_pattern_matching_only_adapters_is_refused_and_nothing_changes():
    model = lora_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"match only PEFT adapter layers .*lora_A.* such as '.*self_attn.q_proj'"):
        prune(model, make_batches(), targets=["*lora_A*"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_with_a_zero_update_the_masks_are_those_of_the_plain_model(single_thread):
    """peft's default init leaves the model unchanged: block-sequential masks must then be the plain model's, under the
    base layers' names (a statistic taken anywhere but at the wrapper's input, or an adapter pruned, would differ)."""
    batches = make_batches()
    plain = masks_of(tiny_llama(), batches)
    adapted = masks_of(lora_llama(zero_update=True), batches)
    renamed = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): keep for name, keep in adapted.items()
    }
    assert sorted(renamed) == sorted(plain)
    for name, keep in plain.items():
        assert torch.equal(renamed[name], keep), name


@pytest.mark.parametrize("dora", [False, True])
def test_masks_equal_a_reference_from_the_wrapped_layers_inputs(single_thread, dora):
    """Adapters with a real update change every later activation; the reference records the input of each *wrapper*
    (the LoRA/DoRA layer as the model calls it) with its own hooks and scores the base weight by hand (one shot)."""
    model = lora_llama(dora=dora)
    batches = make_batches()
    base = model.base_model.model
    wrapped: dict[str, nn.Module] = {}
    for name, module in base.model.layers.named_modules():
        if isinstance(module, (nn.Linear, peft.tuners.lora.LoraLayer)) and name.split(".")[-1].endswith("_proj"):
            wrapped[f"base_model.model.model.layers.{name}"] = module
    sums: dict[str, Tensor] = {name: torch.zeros(0) for name in wrapped}
    handles = []
    for name, module in wrapped.items():

        def record(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = x.square().sum(0) + (sums[name] if sums[name].numel() else 0)

        handles.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    sequences = sum(b["input_ids"].shape[0] for b in batches)
    expected = {}
    for name, module in wrapped.items():
        is_wrapper = isinstance(module, peft.tuners.lora.LoraLayer)
        weight = module.get_base_layer().weight if is_wrapper else module.weight
        expected[f"{name}.base_layer" if is_wrapper else name] = wanda_keep(weight, sums[name], sequences)

    found = masks_of(model, batches, sequential=False)
    assert sorted(found) == sorted(expected)
    for name, keep in expected.items():
        assert torch.equal(found[name], keep), name
    # Only base weights changed: the adapters are as they were.
    adapter = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not (adapter.lora_B["default"].weight == 0).any() and not (adapter.lora_A["default"].weight == 0).any()


def test_merge_adapters_keeps_the_masks_where_peft_merge_does_not():
    model = lora_llama()
    prune(model, make_batches(), sparsity=0.5)
    by_peft = copy.deepcopy(model).merge_and_unload()
    base = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.detach().clone()
    assert not (by_peft.model.layers[0].mlp.up_proj.weight == 0).any()  # peft fills every pruned entry

    merged = merge_adapters(model)
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in merged.named_parameters())
    weight = merged.model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight == 0, base == 0)  # exactly as sparse as the base
    kept = weight != 0
    assert torch.equal(weight[kept], by_peft.model.layers[0].mlp.up_proj.weight[kept])  # peft's merge elsewhere
    assert merge_adapters(merged) is merged  # nothing left to merge


def test_merge_adapters_takes_exact_masks():
    """A kept weight that is exactly 0 stays kept (it gets the adapter's update) when the masks say so."""
    model = lora_llama()
    prune(model, make_batches(), sparsity=0.5)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    weight = layer.base_layer.weight
    keep = weight != 0
    row, column = 0, int(keep[0].nonzero()[0])
    with torch.no_grad():
        weight[row, column] = 0.0  # kept, and zero
    name = "base_model.model.model.layers.1.self_attn.v_proj.base_layer.weight"
    delta = layer.get_delta_weight("default")[row, column]
    merged = merge_adapters(copy.deepcopy(model), masks={name: keep})
    assert float(merged.model.layers[1].self_attn.v_proj.weight[row, column]) == pytest.approx(float(delta))
    from_zeros = merge_adapters(model)
    assert float(from_zeros.model.layers[1].self_attn.v_proj.weight[row, column]) == 0.0
    untouched = lora_llama()
    state = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError, match=r"mask given for .* has shape \(2, 2\)"):
        merge_adapters(untouched, masks={name: torch.ones(2, 2, dtype=torch.bool)})
    assert all(torch.equal(untouched.state_dict()[k], v) for k, v in state.items())  # nothing merged


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' packed 4-bit weight (uint8 data in a Parameter subclass of that name)."""


class Linear4bit(nn.Linear):
    """Stands in for ``bitsandbytes.nn.Linear4bit``: an nn.Linear subclass holding a Params4bit."""


Linear4bit.__module__ = "bitsandbytes.nn.modules"


def test_a_quantized_base_layer_is_refused_naming_it(tmp_path):
    model = lora_llama()
    wrapper = model.base_model.model.model.layers[1].mlp.up_proj
    quantized = Linear4bit(64, 128, bias=False)
    quantized.weight = Params4bit(torch.zeros(64 * 128 // 2, 1, dtype=torch.uint8), requires_grad=False)
    wrapper.base_layer = quantized
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'base_model.model.model.layers.1.mlp.up_proj.base_layer' is quantized "):
        prune(model, make_batches())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # Through the callback: refused before training, by name.
    module = CausalLMModule(model=model, learning_rate=1e-3)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[WandaPruningCallback(evaluate=False)])
    with pytest.raises(MisconfigurationException, match=r"layers.1.mlp.up_proj.base_layer' is quantized \(bitsand"):
        trainer.fit(module, loader(8, seed=1), loader(4, seed=2))
    assert trainer.global_step == 0


def test_adapters_merged_into_the_base_are_refused():
    model = lora_llama()
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"adapters of '.*q_proj' are merged into its base layer"):
        prune(model, make_batches())


# --- through a Trainer ------------------------------------------------------------------------------------------------


def test_lora_training_keeps_the_masks_and_the_export_is_the_merged_sparse_model(tmp_path: Path):
    model = lora_llama()
    module = CausalLMModule(model=model, learning_rate=1e-2)
    before, after = Snapshot(), Snapshot()
    out = tmp_path / "export"
    pruning = WandaPruningCallback(
        prune_on=AfterEpoch(0),
        evaluate=False,
        verbose=False,
        export=str(out),
        calibration_options=CalibrationOptions(num_samples=8),
    )
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[before, pruning, after])
    val = loader(8, seed=2)
    trainer.fit(module, loader(8, seed=1), val)

    masks = pruning.masks
    assert len(masks) == 14 and not any("lora_" in name for name in masks)
    assert "model.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight" in masks
    # The masks are the core prune() of the weights at the end of epoch 0 (adapters trained for an epoch by then).
    reference = CausalLMModule(model=lora_llama(), learning_rate=1e-2)
    reference.load_state_dict(before.states[(0, 1)])
    expected: dict[str, Tensor] = {}
    prune(reference, list(val), num_samples=8, on_layer_pruned=lambda n, k: expected.__setitem__(f"{n}.weight", k))
    assert sorted(expected) == sorted(masks)
    for name, keep in expected.items():
        assert torch.equal(masks[name], keep), name
    # The adapters went on training; the base weights stayed exactly zero where pruned.
    parameters = dict(module.named_parameters())
    lora_b = "model.base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"
    assert not torch.equal(parameters[lora_b], after.states[(0, 1)][lora_b])
    for name, keep in masks.items():
        assert torch.equal(parameters[name] != 0, keep), name

    # The export (written right after pruning) is the merged model, exactly as sparse as the base was then; the live
    # module kept its adapters.
    assert isinstance(module.model, peft.PeftModel)
    exported = load_pruned(out)
    at_pruning = CausalLMModule(model=lora_llama(), learning_rate=1e-2)
    at_pruning.load_state_dict(after.states[(0, 1)])
    merged = merge_adapters(at_pruning.model, {k.removeprefix("model."): v for k, v in masks.items()})
    for name, tensor in merged.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    up = exported.model.layers[0].mlp.up_proj.weight
    assert torch.equal(up != 0, masks["model.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"])


def test_save_pruned_of_a_peft_model_exports_it_merged_and_leaves_it_alone(tmp_path: Path):
    model = lora_llama()
    prune(model, make_batches(), sparsity=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_pruned(model, tmp_path / "out")
    loaded = load_pruned(tmp_path / "out")
    expected = merge_adapters(copy.deepcopy(model))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())  # adapters still there, unmerged


# --- the command line -------------------------------------------------------------------------------------------------


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A dense tiny Llama with a tokenizer, saved with save_pretrained (a base model for adapters)."""
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_cli_prunes_a_peft_adapter_directory_and_exports_it_merged(base_dir: Path, tmp_path: Path, capsys):
    import json

    from wanda_lightning.cli import main
    from wanda_lightning.cli.loading import calibration_windows, load_model

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(3)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapters")  # names base_dir as its base model

    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "adapters"), "--out", str(out), *PRUNE_FAST, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [layer["name"] for layer in result["report"]["layers"]]
    assert len(names) == 14 and "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in names
    assert not any("lora_" in name for name in names)

    # The same as prune() on the loaded PeftModel with the same windows, merged with the masks kept.
    loaded = load_model(str(tmp_path / "adapters"))
    assert loaded.kind == "peft" and loaded.tokenizer is not None  # the base model's tokenizer
    windows = calibration_windows(loaded, "pydoc", None, 4, 32)
    prune(loaded.model, [{"input_ids": w} for w in windows.split(4)], num_samples=None)
    expected = merge_adapters(loaded.model)
    exported = load_pruned(out)
    assert type(exported).__name__ == "LlamaForCausalLM"
    for name, tensor in expected.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    weight = exported.model.layers[1].mlp.down_proj.weight
    assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()


def test_merged_state_dict_of_a_module_holding_a_peft_model_of_a_plain_network():
    from wanda_lightning.export.adapters import merged_state_dict

    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    holder = nn.Module()
    holder.net = peft.get_peft_model(network, config)
    masks = masks_of(holder, [torch.randn(4, 8)], ignore=[], forward_fn=lambda m, x: m.net(x))
    state = merged_state_dict(holder)
    assert sorted(state) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert torch.equal(state["net.0.weight"] != 0, masks["net.base_model.model.0.base_layer"])
    assert isinstance(holder.net, peft.PeftModel)  # merged on a copy
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers outside a PeftModel"):
        merged_state_dict(
            peft.inject_adapter_in_model(config, nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
        )
