"""Depth pruning (``shrink(layers=...)``): the shorter model against the dense model with the same blocks skipped by
hooks, the block scores against slow per-token references written here, generation with and without the KV cache,
stock ``from_pretrained``, and every refusal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.models import VOCAB, make_batches, tiny_llama

from wanda_lightning import shrink
from wanda_lightning.depth import choose_blocks

transformers = pytest.importorskip("transformers")

BLOCKS = 5
FAMILIES = ("llama", "mistral", "qwen2", "phi", "gpt2", "opt", "gpt_neox")


def tiny(family: str, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` with 5 blocks (Qwen2: sliding-window attention in its last 3 blocks, a
    window shorter than the sequences, so ``layer_types`` matters)."""
    if family == "llama":
        return tiny_llama(num_hidden_layers=BLOCKS, **overrides)
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS)
    configs = {
        "mistral": lambda: transformers.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2),
        "qwen2": lambda: transformers.Qwen2Config(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
        ),
        "phi": lambda: transformers.PhiConfig(**common, num_attention_heads=4),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=BLOCKS, n_head=4),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=BLOCKS,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common, num_attention_heads=4, bos_token_id=0, eos_token_id=1),
    }
    config = configs[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.base_model
    return base.h if hasattr(base, "h") else base.decoder.layers if hasattr(base, "decoder") else base.layers


def padded_batches() -> list[dict]:
    """Calibration batches whose last tokens are padding in some rows (they must not count)."""
    batches = make_batches()
    batches[0]["attention_mask"][1, 10:] = 0
    batches[1]["attention_mask"][3, 4:] = 0
    return batches


def logits(model: torch.nn.Module, seed: int = 7) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def skip_blocks(model: torch.nn.Module, removed: list[int]) -> None:
    """Makes the listed blocks of ``model`` hand their input hidden states on unchanged (forward hooks)."""

    def passthrough(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for index in removed:
        blocks_of(model)[index].register_forward_hook(passthrough, with_kwargs=True)


def block_streams(model: torch.nn.Module, batches: list[dict]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch, every block's (input, output) hidden states in the dense model, by hooks."""
    streams = []
    for batch in batches:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def record(module, args, kwargs, output, seen=seen):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            seen.append((hidden.detach().clone(), out.detach().clone()))

        handles = [block.register_forward_hook(record, with_kwargs=True) for block in blocks_of(model)]
        with torch.no_grad():
            model(**batch, use_cache=False)
        for handle in handles:
            handle.remove()
        streams.append(seen)
    return streams


def slow_distance(first: torch.Tensor, last: torch.Tensor, mask: torch.Tensor, score: str) -> tuple[float, int]:
    """Summed per-token distance over the counted tokens, one token at a time."""
    total, count = 0.0, 0
    for b in range(first.shape[0]):
        for t in range(first.shape[1]):
            if not mask[b, t]:
                continue
            x, y = first[b, t].double(), last[b, t].double()
            cos = float(x @ y / (x.norm() * y.norm()))
            total += 1.0 - cos if score == "influence" else math.acos(max(-1.0, min(1.0, cos))) / math.pi
            count += 1
    return total, count


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- exactness ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_shorter_model_equals_the_dense_model_with_the_blocks_skipped(family):
    model = tiny(family)
    dense = copy.deepcopy(model)
    report = shrink(model, padded_batches(), layers=0.4)
    assert len(report.removed_blocks) == 2 and report.blocks_before == BLOCKS and report.blocks_after == 3
    assert len(blocks_of(model)) == 3 and model.config.num_hidden_layers == 3
    assert report.config_updates["num_hidden_layers"] == 3
    skip_blocks(dense, report.removed_blocks)
    torch.testing.assert_close(logits(model), logits(dense), rtol=0, atol=0)
    # The KV cache's slots follow the new order.
    indices = [m.layer_idx for block in blocks_of(model) for m in block.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(indices)) == [0, 1, 2]


def test_layer_types_follow_the_kept_blocks():
    model = tiny("qwen2")
    types = list(model.config.layer_types)
    assert types == ["full_attention"] * 2 + ["sliding_attention"] * 3
    report = shrink(model, padded_batches(), layers=0.4)
    kept = [i for i in range(BLOCKS) if i not in report.removed_blocks]
    assert model.config.layer_types == [types[i] for i in kept]
    assert report.config_updates["layer_types"] == model.config.layer_types


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "gpt_neox"])
def test_generation_with_and_without_the_cache_is_identical(family):
    model = tiny(family)
    shrink(model, padded_batches(), layers=0.4)
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    cached = model.generate(prompt, use_cache=True, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi", "gpt2", "opt", "gpt_neox"])
def test_the_folder_loads_with_stock_from_pretrained(family, tmp_path):
    model = tiny(family)
    shrink(model, padded_batches(), layers=0.4, mlp=0.5 if family != "phi" else 0.0)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_depth_and_width_in_one_call_equal_two_calls():
    batches = make_batches()
    together, apart = tiny("llama"), tiny("llama")
    report = shrink(together, batches, layers=0.4, mlp=0.5, heads=0.5)
    first = shrink(apart, batches, layers=0.4)
    second = shrink(apart, batches, mlp=0.5, heads=0.5)
    assert report.removed_blocks == first.removed_blocks
    assert [g.kept_units for g in report.groups] == [g.kept_units for g in second.groups]
    torch.testing.assert_close(logits(together), logits(apart), rtol=0, atol=0)
    assert report.parameters_before == first.parameters_before
    assert report.parameters_after == second.parameters_after
    assert report.config_updates == {**first.config_updates, **second.config_updates}
    assert "blocks" in str(report) and "5 -> 3" in str(report)


# --- scores -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_influence_matches_a_slow_reference(family):
    model = tiny(family)
    batches = padded_batches()
    streams = block_streams(model, batches)
    expected = []
    for index in range(BLOCKS):
        sums = [
            slow_distance(*seen[index], batch["attention_mask"].bool(), "influence")
            for seen, batch in zip(streams, batches, strict=True)
        ]
        expected.append(sum(s for s, _ in sums) / sum(c for _, c in sums))
    report = shrink(model, batches, layers=0.4)
    assert report.block_scores == pytest.approx(expected, rel=1e-5, abs=1e-7)
    lowest = sorted(range(BLOCKS), key=lambda i: expected[i])[:2]
    assert report.removed_blocks == sorted(lowest)
    assert report.layer_score == "influence"


def test_angular_distance_removes_the_closest_run_of_consecutive_blocks():
    model = tiny("llama")
    batches = padded_batches()
    streams = block_streams(model, batches)
    run = 2
    expected = []
    for start in range(BLOCKS - run + 1):
        sums = [
            slow_distance(seen[start][0], seen[start + run - 1][1], batch["attention_mask"].bool(), "angular")
            for seen, batch in zip(streams, batches, strict=True)
        ]
        expected.append(sum(s for s, _ in sums) / sum(c for _, c in sums))
    dense = copy.deepcopy(model)
    report = shrink(model, batches, layers=0.4, layer_score="angular")
    assert report.block_scores == pytest.approx(expected, rel=1e-5, abs=1e-7)
    best = min(range(len(expected)), key=lambda i: expected[i])
    assert report.removed_blocks == [best, best + 1]
    skip_blocks(dense, report.removed_blocks)
    torch.testing.assert_close(logits(model), logits(dense), rtol=0, atol=0)


def test_choose_blocks_breaks_ties_towards_later_blocks():
    assert choose_blocks(torch.tensor([0.2, 0.1, 0.1, 0.3]), 1, "influence") == [2]
    assert choose_blocks(torch.tensor([0.1, 0.1, 0.3]), 2, "angular") == [1, 2]
    with pytest.raises(ValueError, match="not finite"):
        choose_blocks(torch.tensor([0.1, float("nan")]), 1, "influence")


def test_scores_are_synced_before_blocks_are_chosen():
    model = tiny("llama")
    reference = shrink(copy.deepcopy(model), make_batches(), layers=0.2)
    (first,) = reference.removed_blocks
    calls = []

    def sync(tensors):
        calls.append(len(tensors))
        sums, counts = tensors
        sums[first] += 10.0 * counts[first]  # another process saw block `first` change its input a lot

    report = shrink(model, make_batches(), layers=0.2, sync_statistics=sync)
    assert calls == [2]
    assert report.removed_blocks != reference.removed_blocks


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragments"),
    [
        (dict(layers=1.0), ValueError, ["`layers`", "[0, 1)", "1.0"]),
        (dict(layers=-0.2), ValueError, ["`layers`", "-0.2"]),
        (dict(layers="0.2"), TypeError, ["`layers`", "'0.2'"]),
        (dict(layers=0.05), ValueError, ["`layers`=0.05", "rounds to none", "0.1"]),
        (dict(layers=0.95), ValueError, ["`layers`=0.95", "removes all"]),
        (dict(layers=0.2, layer_score="cosine"), ValueError, ["`layer_score`", "'cosine'", "influence", "angular"]),
        (dict(layers=0.2, update="reconstruct"), ValueError, ["`update`", "only whole blocks"]),
    ],
)
def test_bad_values_are_refused_and_the_model_is_untouched(kwargs, error, fragments):
    model = tiny("llama")
    before = snapshot(model)
    with pytest.raises(error) as caught:
        shrink(model, make_batches(), **kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert len(blocks_of(model)) == BLOCKS and model.config.num_hidden_layers == BLOCKS
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_depth_dependent_attention_scaling_is_refused():
    model = tiny("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        shrink(model, make_batches(), layers=0.4)
    assert len(blocks_of(model)) == BLOCKS


def test_an_unknown_per_layer_config_list_is_refused():
    model = tiny("llama")
    model.config.rope_per_layer = [1.0] * BLOCKS
    with pytest.raises(ValueError, match="`rope_per_layer` has one value per layer"):
        shrink(model, make_batches(), layers=0.4)
    assert len(blocks_of(model)) == BLOCKS


def test_a_config_that_disagrees_with_the_stack_is_refused():
    model = tiny("llama")
    model.config.num_hidden_layers = 4
    with pytest.raises(ValueError, match="says 4 hidden layers"):
        shrink(model, make_batches(), layers=0.4)
    assert len(blocks_of(model)) == BLOCKS


def test_a_width_plan_the_config_cannot_hold_is_refused_before_blocks_go():
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="heads"):
        shrink(model, make_batches(), layers=0.4, heads=0.5)
    assert len(blocks_of(model)) == BLOCKS
