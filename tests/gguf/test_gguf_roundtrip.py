"""save_gguf on tiny models of every family and every shrink() shape: transformers' own GGUF reader gives the source
model's logits back, and each tensor in the file equals an independent reference built here from the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_models import FAMILIES, SHAPES, calibration, make_model
from helpers.models import make_batches, tiny_llama

from wanda_lightning import shrink
from wanda_lightning.gguf import save_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # max |logit difference| at f32 (the target)


def load_back(folder, name="m.gguf", config=None):
    kwargs = {} if config is None else {"config": config}
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **kwargs
    ).eval()


def max_logit_difference(a, b) -> float:
    ids = make_batches(num_batches=1, batch=2)[0]["input_ids"]
    with torch.no_grad():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def expected_architecture(family: str, shape: str) -> str:
    # llama.cpp's qwen2 sizes q/o by the hidden size: a Qwen2 with heads removed is written as the equivalent llama
    if family == "qwen2" and shape in ("heads", "all"):
        return "llama"
    return family


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_reads_the_f32_export_back_with_the_same_logits(family, shape, tmp_path):
    model = make_model(family, shape)
    summary = save_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer="placeholder")
    architecture = expected_architecture(family, shape)
    assert summary.architecture == architecture
    # A Qwen2 written as `llama` loads in transformers as a Llama without q/k/v biases unless told its config:
    # the GGUF format states biases only by the tensors present, and transformers' reader maps no bias flag.
    config = model.config if architecture != family else None
    loaded = load_back(tmp_path, config=config)
    assert max_logit_difference(loaded, model) <= TOLERANCE


def test_flap_bias_compensation_is_written_and_read_back(tmp_path):
    model = make_model("llama")
    shrink(model, calibration(), mlp=0.5, heads=0.5, layers=0.5, method="flap")
    assert model.config.attention_bias and model.config.mlp_bias
    save_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer="placeholder")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        assert f"blk.0.{kind}.bias" in names
    # transformers' GGUF reader has no key for Llama biases (llama.cpp finds them by tensor name), so it is given
    # the config; without it the biases would be dropped and the logits would differ.
    assert max_logit_difference(load_back(tmp_path, config=model.config), model) <= TOLERANCE
    assert max_logit_difference(load_back(tmp_path), model) > TOLERANCE


def test_a_masked_model_round_trips_and_a_module_holding_the_model_is_accepted(tmp_path):
    from wanda_lightning import prune

    model = tiny_llama()
    prune(model, calibration(), sparsity=0.5)

    class Holder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    save_gguf(Holder(model), tmp_path / "m.gguf", dtype="f32", tokenizer="placeholder")
    loaded = load_back(tmp_path)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    assert max_logit_difference(loaded, model) <= TOLERANCE


# -- an independent reference of every tensor in the file -------------------------------------------------------

_NAMES = {  # transformers module suffix -> GGUF tensor name, written out here rather than taken from gguf's map
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
_LLAMA_NAMES = {"post_attention_layernorm": "ffn_norm"}
_GEMMA_NAMES = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def reference_tensors(model, architecture: str) -> dict[str, np.ndarray]:
    """What llama.cpp expects in the file, built slowly from the model's parameters."""
    config = model.config
    heads, head_dim = config.num_attention_heads, config.head_dim
    kv_heads = config.num_key_value_heads
    names = {**_NAMES, **(_GEMMA_NAMES if architecture == "gemma3" else _LLAMA_NAMES)}
    expected: dict[str, np.ndarray] = {}
    for source, parameter in model.named_parameters():
        values = parameter.detach().float().numpy().copy()
        if source == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif source == "model.norm.weight":
            name = "output_norm.weight"
        elif source == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, block, rest = source.split(".", 3)
            module, _, suffix = rest.rpartition(".")
            name = f"blk.{block}.{names[module]}.{suffix}"
            if architecture == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                count = heads if module == "self_attn.q_proj" else kv_heads
                permuted = np.empty_like(values)
                for head in range(count):
                    for i in range(head_dim // 2):  # rotate-half pairs (i, i + d/2) become adjacent rows
                        permuted[head * head_dim + 2 * i] = values[head * head_dim + i]
                        permuted[head * head_dim + 2 * i + 1] = values[head * head_dim + head_dim // 2 + i]
                values = permuted
        if architecture == "gemma3" and name.endswith("norm.weight"):
            values = values + 1.0  # Gemma3RMSNorm scales by 1 + w
        expected[name] = values
    return expected


@pytest.mark.parametrize(("family", "flap"), [("llama", False), ("llama", True), ("qwen2", False), ("gemma3", False)])
def test_every_tensor_equals_the_reference(family, flap, tmp_path):
    model = make_model(family, "dense" if flap else "all")
    if flap:
        shrink(model, calibration(), mlp=0.5, heads=0.5, layers=0.5, method="flap")
    summary = save_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer="placeholder")
    expected = reference_tensors(model, summary.architecture)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    found = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert set(found) == set(expected)
    for name, values in expected.items():
        assert found[name].shape == values.shape, name
        assert np.array_equal(found[name], values), name
    assert summary.tensor_count == len(expected)
    assert summary.parameters == sum(v.size for v in expected.values())


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("shape", ["dense", "all"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_metadata_states_the_measured_shape(family, shape, tmp_path):
    model = make_model(family, shape)
    summary = save_gguf(model, tmp_path / "m.gguf", dtype="q8_0", tokenizer="placeholder")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = summary.architecture
    layer = model.model.layers[0]
    head_dim = layer.self_attn.head_dim
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == len(model.model.layers)
    assert field(reader, f"{arch}.embedding_length") == 64
    assert field(reader, f"{arch}.feed_forward_length") == layer.mlp.gate_proj.out_features
    assert field(reader, f"{arch}.attention.head_count") == layer.self_attn.q_proj.out_features // head_dim
    assert field(reader, f"{arch}.attention.head_count_kv") == layer.self_attn.k_proj.out_features // head_dim
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        assert field(reader, f"{arch}.{key}") == head_dim
    assert field(reader, f"{arch}.context_length") == model.config.max_position_embeddings
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    if family == "gemma3":
        kinds = model.config.layer_types
        assert field(reader, "gemma3.attention.sliding_window_pattern") == [k == "sliding_attention" for k in kinds]
        assert field(reader, "gemma3.attention.sliding_window") == 4
        assert field(reader, "gemma3.rope.freq_base_swa") == 10000.0
        assert field(reader, "gemma3.rope.freq_base") == 1_000_000.0


def test_gemma3_keeps_each_blocks_kind_when_blocks_go(tmp_path):
    from gguf_models import tiny_gemma3

    from wanda_lightning.core.blocks import BlockStack
    from wanda_lightning.depth import remove_blocks

    full, sliding = "full_attention", "sliding_attention"
    model = tiny_gemma3([full, sliding, sliding, full, sliding, full])
    remove_blocks(model, BlockStack("model.layers", list(model.model.layers)), [1, 2], model.config)
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "full_attention"]
    save_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer="placeholder")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert field(reader, "gemma3.attention.sliding_window_pattern") == [False, False, True, False]
    # transformers' reader rebuilds Gemma 3's default layer kinds (one global every 6th), so it is given the config
    assert max_logit_difference(load_back(tmp_path, config=model.config), model) <= TOLERANCE


def test_llama3_rope_scaling_is_written_as_the_frequency_divisors_transformers_applies(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_llama(rope_parameters=rope, max_position_embeddings=512, head_dim=32, num_attention_heads=2)
    save_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer="placeholder")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    factors = {t.name: np.asarray(t.data) for t in reader.tensors}["rope_freqs.weight"]
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    assert np.allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the blend are present
    assert max_logit_difference(load_back(tmp_path, config=model.config), model) <= TOLERANCE
