"""What the llama.cpp runtime does without llama.cpp: the float64 NLL against a slow reference, argument checks that
fail before anything runs, the install hint, and the order of timing in turns (with a fake timer)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from wanda_lightning.cli import main
from wanda_lightning.llamacpp import measure_speed, time_in_turns, window_nll
from wanda_lightning.llamacpp import perplexity as perplexity_module
from wanda_lightning.llamacpp import runtime as runtime_module
from wanda_lightning.llamacpp import speed as speed_module


def _slow_nll(logits: np.ndarray, tokens: list[int]) -> float:
    """Token by token, in Python floats: -log softmax(logits[t])[tokens[t + 1]]."""
    total = 0.0
    for t in range(len(tokens) - 1):
        row = [float(v) for v in logits[t]]
        top = max(row)
        log_sum = top + math.log(sum(math.exp(v - top) for v in row))
        total += log_sum - row[tokens[t + 1]]
    return total


def test_window_nll_matches_a_token_by_token_reference():
    generator = np.random.default_rng(0)
    logits = (generator.standard_normal((7, 11)) * 5).astype(np.float32)
    tokens = [int(t) for t in generator.integers(0, 11, size=7)]
    nll, count = window_nll(logits, tokens)
    assert count == 6
    assert nll == pytest.approx(_slow_nll(logits, tokens), rel=1e-12)


@pytest.mark.parametrize(
    ("logits", "tokens", "message"),
    [
        (np.zeros((3, 4)), [0, 1], "seqlen = 2"),
        (np.zeros((3, 4)), [0, 1, 4], r"\[0, 4\)"),
        (np.zeros(3), [0, 1, 2], "seqlen = 3"),
    ],
)
def test_window_nll_refuses_shapes_and_ids_that_disagree(logits, tokens, message):
    with pytest.raises(ValueError, match=message):
        window_nll(logits, tokens)


def test_gguf_perplexity_refuses_bad_windows_before_loading_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(perplexity_module, "load_gguf", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="at least one window of 2"):
        perplexity_module.gguf_perplexity(tmp_path / "x.gguf", torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(num_windows, seqlen\)"):
        perplexity_module.gguf_perplexity(tmp_path / "x.gguf", torch.zeros(5, dtype=torch.long))


def test_a_missing_llama_cpp_names_the_extra_that_installs_it(monkeypatch):
    real = runtime_module.importlib.import_module

    def refuse(name, *args):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real(name, *args)

    monkeypatch.setattr(runtime_module.importlib, "import_module", refuse)
    with pytest.raises(ModuleNotFoundError, match=r"pip install wanda-lightning\[llamacpp\]"):
        runtime_module.import_llama_cpp()
    assert runtime_module.is_available() is False
    with pytest.raises(ModuleNotFoundError, match=r"wanda-lightning\[llamacpp\]"):
        time_in_turns({"dense": Path("dense.gguf")})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(runtime="onnx"), r"`runtime` must be one of \['torch', 'llama.cpp'\], got 'onnx'"),
        (dict(runtime="torch", dtype="q8_0"), "`dtype`='q8_0' applies to runtime='llama.cpp'"),
        (dict(runtime="torch", threads=2), "`threads`=2 applies to runtime='llama.cpp'"),
        (dict(runtime="llama.cpp", batch_size=2), "`batch_size` and `prefill_batch` must be 1, got 2 and None"),
        (dict(runtime="llama.cpp", prefill_batch=4), "must be 1, got 1 and 4"),
        (dict(runtime="llama.cpp", device="meta"), "`device` must be None or 'cpu', got 'meta'"),
        (dict(runtime="llama.cpp", new_tokens=0), "`new_tokens` must be a positive integer, got 0"),
        (dict(runtime="llama.cpp", threads=0), "`threads` must be a positive integer, got 0"),
    ],
)
def test_measure_speed_refuses_what_the_runtime_does_not_take_before_writing(llama, options, message, monkeypatch):
    monkeypatch.setattr(speed_module, "temporary_gguf", lambda *a, **k: pytest.fail("wrote a GGUF"))
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        measure_speed(llama, **options)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_measure_speed_in_torch_is_the_eager_timer_and_says_so(llama):
    result = measure_speed(llama, name="tiny", new_tokens=2, prefill_length=8, prefill_batch=1, repeats=1)
    assert (result.runtime, result.dtype, result.file_bytes, result.name) == ("torch", "float32", None, "tiny")
    assert result.prefill_shape == (1, 8)
    assert math.isfinite(result.decode_tokens_per_second) and result.decode_tokens_per_second > 0


class _FakeTimer:
    """Stands in for GGUFTimer: records the order of runs and returns scripted speeds."""

    calls: ClassVar[list[str]] = []
    speeds: ClassVar[dict[str, list[tuple[float, float]]]] = {}

    def __init__(self, path, **options) -> None:
        self.name = Path(path).stem

    def run(self) -> tuple[float, float]:
        _FakeTimer.calls.append(self.name)
        return _FakeTimer.speeds[self.name].pop(0)

    def result(self, name, decode, prefill):
        return (name, decode, prefill)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_time_in_turns_rotates_the_order_and_keeps_each_models_best_run(monkeypatch):
    monkeypatch.setattr(speed_module, "GGUFTimer", _FakeTimer)
    monkeypatch.setattr(speed_module, "import_llama_cpp", lambda: None)
    _FakeTimer.calls = []
    _FakeTimer.speeds = {
        "a": [(10.0, 100.0), (12.0, 90.0), (11.0, 95.0)],
        "b": [(5.0, 50.0), (4.0, 70.0), (6.0, 60.0)],
        "c": [(1.0, 9.0), (3.0, 8.0), (2.0, 7.0)],
    }
    results = time_in_turns({"A": "a.gguf", "B": "b.gguf", "C": "c.gguf"}, repeats=3)
    assert _FakeTimer.calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert list(results) == ["A", "B", "C"]
    assert results == {"A": ("A", 12.0, 100.0), "B": ("B", 6.0, 70.0), "C": ("C", 3.0, 9.0)}


def test_time_in_turns_refuses_nothing_to_time_and_bad_counts():
    with pytest.raises(ValueError, match="at least one GGUF path or model"):
        time_in_turns({})
    with pytest.raises(ValueError, match="`repeats` must be a positive integer, got 0"):
        time_in_turns({"a": "a.gguf"}, repeats=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gguf-type", "q8_0"], "--gguf-type q8_0 needs --runtime llama.cpp"),
        (["--threads", "1"], "--threads 1 needs --runtime llama.cpp (got --runtime torch)"),
        (["--runtime", "llama.cpp", "--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--runtime", "llama.cpp", "--batch-size", "2"], "--batch-size and --prefill-batch must be 1, got 2 and None"),
        (["--runtime", "llama.cpp", "--prefill-batch", "4"], "must be 1, got 1 and 4"),
        (["--runtime", "llama.cpp", "--device", "cuda"], "--device must be cpu, got cuda"),
    ],
)
def test_speed_cli_refuses_flags_the_runtime_does_not_take(tmp_path, capsys, flags, message):
    code = main(["speed", str(tmp_path / "missing"), *flags])
    assert code != 0
    assert message in capsys.readouterr().err
