"""The tensor types of save_gguf: which tensors stay float32, values in each type against gguf's own dequantizer, zeros
of a masked model exactly zero in every type, and row lengths a type cannot hold refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_models import calibration, make_model
from helpers.models import tiny_llama

from wanda_lightning import prune
from wanda_lightning.gguf import GGUF_TYPES, save_gguf

gguf = pytest.importorskip("gguf")


def read_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    """``{name: (type name, values)}``, quantized blocks dequantized by the gguf package, torch shapes."""
    out = {}
    for tensor in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        out[tensor.name] = (tensor.tensor_type.name, values.reshape(tuple(reversed(tensor.shape.tolist()))))
    return out


@pytest.mark.parametrize("dtype", GGUF_TYPES)
def test_norms_and_biases_stay_float32_and_weights_take_the_type(dtype, tmp_path):
    model = make_model("qwen2")  # q/k/v biases and norms
    save_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer="placeholder")
    tensors = read_tensors(tmp_path / "m.gguf")
    for name, (kind, values) in tensors.items():
        if values.ndim == 1:
            assert kind == "F32", name
        else:
            assert kind == dtype.upper(), name
    assert {n for n in tensors if n.endswith(".bias")} == {f"blk.{b}.attn_{x}.bias" for b in (0, 1) for x in "qkv"}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    file_types = {
        "f32": "ALL_F32",
        "f16": "MOSTLY_F16",
        "bf16": "MOSTLY_BF16",
        "q8_0": "MOSTLY_Q8_0",
        "q4_0": "MOSTLY_Q4_0",
    }
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType[file_types[dtype]])


def quantize_reference(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round trip of ``values`` through ``dtype``, written here for the float types and the symmetric q8_0 scheme."""
    if dtype == "f32":
        return values
    if dtype == "f16":
        return values.astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    blocks = values.reshape(-1, 32).astype(np.float32)
    if dtype == "q8_0":  # per 32 values: scale max |x| / 127 (stored as float16), codes x / scale rounded half away
        scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
        inverse = np.where(scale == 0, np.float32(0), np.float32(1) / np.where(scale == 0, 1, scale))
        scaled = blocks * inverse
        codes = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
        return (codes * scale.astype(np.float16).astype(np.float32)).reshape(values.shape)
    raise ValueError(dtype)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_weights_in_the_file_equal_a_reference_encoding(dtype, tmp_path):
    model = make_model("gemma3")  # no permutation: file rows are the model's rows
    save_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer="placeholder")
    tensors = read_tensors(tmp_path / "m.gguf")
    for source, name in [
        ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
        ("model.embed_tokens.weight", "token_embd.weight"),
    ]:
        values = dict(model.named_parameters())[source].detach().numpy()
        found = tensors[name][1]
        assert np.array_equal(found, quantize_reference(values, dtype)), name


def test_q4_0_stays_within_its_step(tmp_path):
    model = make_model("llama")
    save_gguf(model, tmp_path / "m.gguf", dtype="q4_0", tokenizer="placeholder")
    found = read_tensors(tmp_path / "m.gguf")["blk.1.ffn_down.weight"][1]
    values = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    step = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True) / 8  # 16 levels over [-max, max]
    assert np.all(np.abs(found.reshape(-1, 32) - values.reshape(-1, 32)) <= step * 1.01)
    assert not np.array_equal(found, values)  # it is quantized


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_a_masked_models_zeros_stay_exactly_zero(dtype, tmp_path):
    model = tiny_llama()
    prune(model, calibration(), sparsity=0.5)
    save_gguf(model, tmp_path / "m.gguf", dtype=dtype, tokenizer="placeholder")
    tensors = read_tensors(tmp_path / "m.gguf")
    for block in range(2):
        for module, name in [
            ("mlp.down_proj", "ffn_down"),
            ("mlp.up_proj", "ffn_up"),
            ("self_attn.o_proj", "attn_output"),
            ("self_attn.v_proj", "attn_v"),
        ]:
            weight = model.get_submodule(f"model.layers.{block}.{module}").weight.detach().numpy()
            found = tensors[f"blk.{block}.{name}.weight"][1]
            zeros = weight == 0
            assert zeros.mean() == pytest.approx(0.5, abs=0.01)
            assert np.all(found[zeros] == 0), (dtype, name)
        # query rows are permuted for llama.cpp, so compare the zero counts per head
        query = model.model.layers[block].self_attn.q_proj.weight.detach().numpy()
        found = tensors[f"blk.{block}.attn_q.weight"][1]
        assert (found == 0).sum() >= (query == 0).sum()


def test_a_row_length_the_type_cannot_hold_is_refused_naming_the_layer_and_nothing_is_written(tmp_path):
    model = tiny_llama(intermediate_size=100)
    target = tmp_path / "m.gguf"
    for dtype in ("q8_0", "q4_0"):
        with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj'.*rows of 100.*multiple of 32"):
            save_gguf(model, target, dtype=dtype, tokenizer="placeholder")
        assert list(tmp_path.iterdir()) == []
    save_gguf(model, target, dtype="f16", tokenizer="placeholder")  # float types hold any row length
    assert target.is_file()


def test_an_unknown_dtype_is_refused_naming_the_allowed_ones(tmp_path):
    with pytest.raises(
        ValueError, match=r"`dtype` must be one of \['f32', 'f16', 'bf16', 'q8_0', 'q4_0'\], got 'q4_k'"
    ):
        save_gguf(tiny_llama(), tmp_path / "m.gguf", dtype="q4_k", tokenizer="placeholder")
    assert list(tmp_path.iterdir()) == []
