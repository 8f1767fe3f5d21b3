"""save_gguf against llama.cpp's own converter (``convert_hf_to_gguf.py``, set ``LLAMA_CPP_CONVERTER`` to its path):
for a dense and a shrunk Llama saved as a folder, both files hold the same tensors (names, shapes, types, bytes at
f32) and the same architecture metadata. Skipped, with the reason, where the converter is not available."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import tiny_llama

from wanda_lightning import save_plain_pretrained, shrink
from wanda_lightning.gguf import save_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converter() -> Path:
    path = os.environ.get("LLAMA_CPP_CONVERTER")
    if not path or not Path(path).is_file():
        pytest.skip(
            "set LLAMA_CPP_CONVERTER to llama.cpp's convert_hf_to_gguf.py (llama-cpp-python's sdist ships it under "
            "vendor/llama.cpp/) to compare with llama.cpp's own converter"
        )
    if importlib.util.find_spec("sentencepiece") is None:
        pytest.skip("llama.cpp's converter imports sentencepiece: pip install sentencepiece")
    return Path(path)


def tiny_llama_with_smollm2_vocabulary(flap: bool) -> torch.nn.Module:
    model = tiny_llama(vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    if flap:  # every shrink shape at once, with FLAP's biases on all seven projections
        batches = [{"input_ids": torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))}]
        shrink(model, batches, mlp=0.5, heads=0.5, layers=0.5, method="flap")
    return model


def values(field):
    try:
        return field.contents()
    except UnicodeDecodeError:
        return [bytes(field.parts[i]) for i in field.data]


@pytest.mark.slow  # each converter run starts a Python with torch: about 10 s
@pytest.mark.parametrize("flap", [False, True], ids=["dense", "shrunk-flap"])
def test_the_file_equals_llama_cpps_converters(flap, converter, smollm2_tokenizer, tmp_path):
    folder = tmp_path / "model"
    save_plain_pretrained(tiny_llama_with_smollm2_vocabulary(flap), folder, smollm2_tokenizer)
    theirs = tmp_path / "theirs.gguf"
    result = subprocess.run(
        [sys.executable, str(converter), str(folder), "--outfile", str(theirs), "--outtype", "f32"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    save_gguf(model, tmp_path / "ours.gguf", dtype="f32", tokenizer=folder)
    a, b = gguf.GGUFReader(tmp_path / "ours.gguf"), gguf.GGUFReader(theirs)
    ours_tensors, their_tensors = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ours_tensors) == set(their_tensors)
    if flap:
        assert {"blk.0.attn_q.bias", "blk.0.attn_output.bias", "blk.0.ffn_down.bias"} <= set(ours_tensors)
    for name, tensor in ours_tensors.items():
        other = their_tensors[name]
        assert tensor.shape.tolist() == other.shape.tolist() and tensor.tensor_type == other.tensor_type, name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(other.data)), name
    architecture = [k for k in a.fields.keys() | b.fields.keys() if k.startswith("llama.")]
    assert len(architecture) >= 10
    for key in [*architecture, "general.architecture", "general.file_type"]:
        assert key in a.fields and key in b.fields, key
        assert values(a.fields[key]) == values(b.fields[key]), key
    for key in ("tokens", "merges", "token_type", "model", "pre", "bos_token_id", "eos_token_id"):
        assert values(a.fields[f"tokenizer.ggml.{key}"]) == values(b.fields[f"tokenizer.ggml.{key}"]), key
