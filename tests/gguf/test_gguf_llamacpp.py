"""llama.cpp itself (llama-cpp-python) loads what save_gguf writes: tiny models of every family and shrink() shape
give PyTorch's logits at f32, and llama.cpp tokenizes text as the transformers tokenizer the vocabulary was built from.
Skipped, with the reason, where llama-cpp-python is not installed (``pip install wanda-lightning[llamacpp]``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_models import byte_fallback_tokenizer, byte_level_tokenizer, calibration, make_model
from helpers.models import tiny_llama

from wanda_lightning import shrink
from wanda_lightning.gguf import save_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

IDS = [5, 17, 99, 3, 42, 8, 77, 120, 64, 1, 33, 21]  # 12 tokens: Gemma's window of 4 slides
F32_KV_CACHE = 0  # GGML_TYPE_F32: keys and values kept in f32 (llama.cpp's default f16 cache adds its own rounding)
# llama.cpp's f32 logits against PyTorch's: llama and qwen2 agree to float32 rounding (about 1e-7 measured); gemma3's
# GELU is tabulated in float16 by ggml, which moves its logits by a few 1e-4
TOLERANCE = {"llama": 1e-4, "qwen2": 1e-4, "gemma3": 1e-3}


def load(path, **kwargs):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_threads=1, verbose=False, type_k=F32_KV_CACHE, type_v=F32_KV_CACHE, **kwargs
    )


def llama_cpp_logits(path) -> np.ndarray:
    model = load(path, logits_all=True)
    try:
        model.eval(IDS)
        return np.array(model.scores[: len(IDS)])
    finally:
        model.close()


@pytest.mark.parametrize(
    ("family", "shape"),
    [(f, s) for f in ("llama", "qwen2", "gemma3") for s in ("dense", "all")] + [("llama", "flap")],
)
def test_llama_cpp_gives_pytorchs_logits_at_f32(family, shape, tmp_path):
    model = make_model(family, "dense" if shape == "flap" else shape)
    if shape == "flap":
        shrink(model, calibration(), mlp=0.5, heads=0.5, layers=0.5, method="flap")
    save_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer="placeholder")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([IDS])).logits[0].numpy()
    found = llama_cpp_logits(tmp_path / "m.gguf")
    assert np.abs(found - expected).max() <= TOLERANCE[family]


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_llama_cpp_runs_every_type_on_the_weights_in_the_file(dtype, tmp_path):
    import transformers

    save_gguf(make_model("llama", "all"), tmp_path / "m.gguf", dtype=dtype, tokenizer="placeholder")
    found = llama_cpp_logits(tmp_path / "m.gguf")
    # the same weights, dequantized by transformers' reader: llama.cpp differs from it only by its own arithmetic
    # (for q8_0 and q4_0 weights it quantizes the activations to 8 bits too: about 1 % of the logits' range here)
    read = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        expected = read(input_ids=torch.tensor([IDS])).logits[0].numpy()
    assert np.isfinite(found).all() and np.abs(found - expected).max() <= 0.02 * np.abs(expected).max()


TEXT = "Shrinking a model:\n  def f(x):\n      return x * 12345  # naïve café\n"


def test_llama_cpp_tokenizes_like_the_byte_level_tokenizer(tmp_path):
    tokenizer = byte_level_tokenizer(300)
    save_gguf(tiny_llama(vocab_size=300), tmp_path / "m.gguf", tokenizer=tokenizer)
    model = load(tmp_path / "m.gguf")
    try:
        assert model.tokenize(TEXT.encode(), add_bos=False) == tokenizer(TEXT).input_ids
    finally:
        model.close()


def test_llama_cpp_tokenizes_like_the_byte_fallback_tokenizer(tmp_path):
    tokenizer = byte_fallback_tokenizer(400)
    save_gguf(tiny_llama(vocab_size=400), tmp_path / "m.gguf", tokenizer=tokenizer)
    model = load(tmp_path / "m.gguf")
    try:  # merges in the tokenizer's order (the scores), "▁" prefix, <s> first, bytes for what the vocabulary lacks
        assert model.tokenize(TEXT.encode(), add_bos=True) == tokenizer(TEXT).input_ids
    finally:
        model.close()


def test_the_placeholder_vocabulary_loads_and_tokenizes(tmp_path):
    save_gguf(tiny_llama(vocab_size=300), tmp_path / "m.gguf", tokenizer="placeholder")
    model = load(tmp_path / "m.gguf")
    try:
        assert model.n_vocab() == 300
        ids = model.tokenize(b"any text at all\n", add_bos=False)
        assert ids and all(3 <= i < 259 for i in ids)  # byte tokens: meaningless, but valid
    finally:
        model.close()
