"""llama.cpp itself on tiny random Llamas written with ``save_gguf``: its logits and held-out perplexity against
PyTorch's on the same windows (dense, masked and every shrunk shape; f32 tight, q8_0 looser), and timing that returns
positive, finite speeds (never a ratio: no timing is asserted)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install wanda-lightning[llamacpp]): llama.cpp untested"
)
pytest.importorskip("gguf", reason="the gguf package is not installed: save_gguf cannot write")

import gguf
from helpers.cli import char_tokenizer
from helpers.models import VOCAB, make_batches, tiny_llama

from wanda_lightning import prune, shrink
from wanda_lightning.cli import main
from wanda_lightning.gguf import save_gguf
from wanda_lightning.llamacpp import (
    gguf_perplexity,
    load_gguf,
    measure_gguf_speed,
    measure_speed,
    time_in_turns,
)

SHAPES = {
    "dense": None,
    "masked": dict(sparsity=0.5),
    "mlp": dict(mlp=0.5),
    "heads": dict(heads=0.5),
    "blocks": dict(layers=0.5),
    "all three": dict(mlp=0.5, heads=0.5, layers=0.5),
}
#: Relative distance allowed between llama.cpp's perplexity and PyTorch's, per GGUF type and llama.cpp key/value cache
#: type. PyTorch runs the model with its weights rounded to the type by the gguf package's own quantizer (identity at
#: f32), so the file's layout is checked, not the type's loss. An f32 file with an f32 cache computes what PyTorch
#: computes; llama.cpp's default f16 cache rounds keys and values (~5e-4 here), and its q8_0/q4_0 kernels round the
#: activations to 8 bits too (up to ~1.5 % on these deliberately sharp random models; the issue's targets against
#: PyTorch's float32, 1 % and 2 %, are measured on SmolLM2 in benchmarks/bench_gguf.py).
TOLERANCE = {
    ("f32", "f32"): 1e-5,
    ("f32", "f16"): 1e-3,
    ("f16", "f16"): 1e-3,
    ("q8_0", "f16"): 3e-2,
    ("q4_0", "f16"): 3e-2,
}


@pytest.fixture(scope="module")
def sharp_llama():
    """A tiny random Llama with large weights, so its logits spread over several units: a wrong row order, norm or
    rotary convention moves its perplexity far (a default-initialised one predicts near-uniformly whatever it does)."""
    return tiny_llama(initializer_range=0.25, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def windows():
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, VOCAB, (3, 24), generator=generator)


def _shaped(model, shape: str):
    model = copy.deepcopy(model)
    settings = SHAPES[shape]
    if shape == "masked":
        prune(model, make_batches(), **settings)
    elif settings is not None:
        shrink(model, make_batches(), **settings)
    return model


def _rounded(model, dtype: str):
    """A copy of ``model`` whose matrices went through the gguf package's quantizer and back (what the file holds)."""
    if dtype == "f32":
        return model
    kind = getattr(gguf.GGMLQuantizationType, dtype.upper())
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                values = parameter.numpy().astype(np.float32)
                back = gguf.quants.dequantize(gguf.quants.quantize(values, kind), kind).reshape(values.shape)
                parameter.copy_(torch.from_numpy(back))
    return model


def _torch_perplexity(model, windows) -> float:
    """Reference: every window on its own (no padding, so one batch), float64 cross-entropy of each next token,
    averaged over all predicted tokens."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()  # (N, T, V)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    return math.exp(float(nll) / windows[:, 1:].numel())


@pytest.mark.parametrize("shape", list(SHAPES))
def test_perplexity_in_llama_cpp_agrees_with_pytorch(sharp_llama, windows, tmp_path, shape, single_thread):
    model = _shaped(sharp_llama, shape)
    assert abs(math.log(_torch_perplexity(model, windows) / VOCAB)) > 0.5  # far from uniform: agreement means something
    found = {}
    for dtype, cache in TOLERANCE:
        path = tmp_path / f"{shape}.{dtype}.gguf"
        if not path.exists():
            save_gguf(model, path, dtype=dtype, tokenizer="placeholder", modelfile=False)
        expected = _torch_perplexity(_rounded(model, dtype), windows)
        found[dtype, cache] = (gguf_perplexity(path, windows, threads=1, cache_type=cache), expected)
    assert found == {
        key: (pytest.approx(expected, rel=TOLERANCE[key]), expected) for key, (_, expected) in found.items()
    }


@pytest.mark.parametrize("shape", ["dense", "all three"])
def test_llama_cpp_logits_equal_pytorch_logits_at_f32(sharp_llama, windows, tmp_path, shape, single_thread):
    model = _shaped(sharp_llama, shape)
    path = tmp_path / "model.gguf"
    save_gguf(model, path, dtype="f32", tokenizer="placeholder", modelfile=False)
    window = windows[0].tolist()
    llama = load_gguf(path, n_ctx=len(window), threads=1, logits_all=True, cache_type="f32")
    try:
        llama.eval(window)
        theirs = torch.from_numpy(llama.scores[: len(window)].copy())
        # the same window passed as an already-loaded Llama scores the same as from its path
        assert gguf_perplexity(llama, windows[:1]) == pytest.approx(
            gguf_perplexity(path, windows[:1], cache_type="f32"), rel=1e-9
        )
    finally:
        llama.close()
    with torch.no_grad():
        ours = model(input_ids=windows[:1]).logits[0]
    assert ours.std() > 1.0
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_gguf_perplexity_refuses_ids_outside_the_files_vocabulary(sharp_llama, tmp_path):
    path = tmp_path / "model.gguf"
    save_gguf(sharp_llama, path, dtype="f32", tokenizer="placeholder", modelfile=False)
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {VOCAB}\)"):
        gguf_perplexity(path, [[1, 2, VOCAB]])


def test_measure_speed_in_llama_cpp_returns_positive_speeds_and_leaves_the_model(sharp_llama):
    model = _shaped(sharp_llama, "mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_speed(
        model, runtime="llama.cpp", dtype="q8_0", name="small", new_tokens=4, prompt_length=8, prefill_length=16
    )
    assert (result.runtime, result.dtype, result.name, result.batch_size) == ("llama.cpp", "q8_0", "small", 1)
    assert result.prefill_shape == (1, 16) and result.new_tokens == 4
    for speed in (result.decode_tokens_per_second, result.prefill_tokens_per_second):
        assert math.isfinite(speed) and speed > 0
    assert result.parameters == sum(p.numel() for p in model.parameters())
    assert result.file_bytes is not None and result.file_bytes > result.weight_bytes > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_time_in_turns_times_paths_and_models_together(sharp_llama, tmp_path):
    dense = tmp_path / "dense.gguf"
    save_gguf(sharp_llama, dense, dtype="f16", tokenizer="placeholder", modelfile=False)
    options = dict(new_tokens=3, prompt_length=4, prefill_length=8)
    results = time_in_turns({"dense": dense, "small": _shaped(sharp_llama, "blocks")}, repeats=2, **options)
    assert list(results) == ["dense", "small"]
    assert results["dense"].dtype == "f16" and results["small"].dtype == "q8_0"
    assert results["small"].parameters < results["dense"].parameters
    alone = measure_gguf_speed(dense, repeats=1, **options)
    assert alone.name == "dense.gguf" and alone.file_bytes == dense.stat().st_size
    for result in (*results.values(), alone):
        assert math.isfinite(result.decode_tokens_per_second) and result.decode_tokens_per_second > 0
        assert math.isfinite(result.prefill_tokens_per_second) and result.prefill_tokens_per_second > 0


def test_speed_cli_times_folders_and_gguf_files_in_llama_cpp(sharp_llama, tmp_path, capsys):
    folder = tmp_path / "dense"
    sharp_llama.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    stored = tmp_path / "stored.gguf"
    save_gguf(sharp_llama, stored, dtype="f16", tokenizer="placeholder", modelfile=False)
    fast = ["--new-tokens", "3", "--prefill-length", "8", "--repeats", "1"]
    code = main(["speed", str(folder), str(stored), "--runtime", "llama.cpp", *fast, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    results = json.loads(out)["results"]
    assert [(r["runtime"], r["dtype"]) for r in results] == [("llama.cpp", "q8_0"), ("llama.cpp", "f16")]
    assert "GGUF as stored" in results[1]["note"]
    code = main(["speed", str(folder), "--runtime", "llama.cpp", "--gguf-type", "q4_0", "--threads", "1", *fast])
    out = capsys.readouterr().out
    assert code == 0 and "q4_0" in out and "llama.cpp (llama-cpp-python" in out and "CPU, 1 thread, batch 1" in out
