"""The speed target's turns, its margin for the noise it measures, and llama.cpp as the runtime it times in: the median
and spread checked against a reference computed here from stand-in timings that vary by turn, the GGUF files the
search writes read back with the ``gguf`` package, the real llama.cpp timings where llama-cpp-python is installed
(never asserting a speed), and every refusal."""

from __future__ import annotations

import copy
import math
import statistics
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers.models import make_batches, tiny_llama

from wanda_lightning import shrink
from wanda_lightning.core.speed import SpeedResult
from wanda_lightning.llamacpp import runtime as llamacpp_runtime
from wanda_lightning.llamacpp import speed as llamacpp_speed
from wanda_lightning.width import speedup as speedup_module
from wanda_lightning.width.speed_target import SpeedTarget

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TURN_FACTORS = (1.03, 0.97, 1.0)  # a shape's reading in its first, second and third turn, relative to the truth


def decode_speed(blocks: int, width: int) -> float:
    """The stand-ins' true decode speed: cost = blocks x (1 + MLP width / 128) + 2."""
    return 100.0 / (blocks * (1 + width / 128) + 2)


def result(decode: float) -> SpeedResult:
    return SpeedResult("x", 1, 0, decode, decode, None, "cpu", 1, 32, (1, 256))


def turn_varying_timer(seen: list[tuple[int, int]]):
    """A stand-in for ``measure_speed`` whose reading of a shrunk shape in its n-th turn is off by ``TURN_FACTORS[n]``
    (its first, scanning, run and every dense run are exact)."""
    readings: dict[tuple[int, int], int] = {}

    def timer(throwaway, **kwargs):
        shape = (throwaway.config.num_hidden_layers, throwaway.config.intermediate_size)
        seen.append(shape)
        count = readings.get(shape, 0)
        readings[shape] = count + 1
        factor = TURN_FACTORS[count - 1] if shape != (5, 128) and count > 0 else 1.0
        return result(decode_speed(*shape) * factor)

    return timer


def pooled_log_spread(groups: list[list[float]]) -> float:
    """Reference: the pooled sample standard deviation of log ratios, each group about its own mean."""
    squares = sum(sum((math.log(r) - statistics.fmean(map(math.log, g))) ** 2 for r in g) for g in groups)
    return math.sqrt(squares / sum(len(g) - 1 for g in groups))


# Two shapes, neither removing less than the other everywhere: 4 of 5 blocks (1.2x in truth) and half the MLP (1.263x).
GRID = dict(layers=(0.0, 0.2), mlp=(0.0, 0.5), heads=(0.0,))


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_turns_give_the_median_and_the_margin_leaves_out_a_shape_within_the_noise(margin, monkeypatch):
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(speedup_module, "measure_speed", turn_varying_timer(seen))
    target = SpeedTarget(1.18, rounds=3, margin=margin, **GRID)
    lm = tiny_llama(num_hidden_layers=5)
    report = shrink(lm, make_batches(), speedup=target)

    # Scan: dense, 4 blocks (meets 1.18x at once), half the MLP (meets it too); then each in three turns after a dense
    # run, the two first in line together.
    assert seen[:3] == [(5, 128), (4, 128), (5, 64)]
    assert seen[3:] == [(5, 128), (4, 128)] * 3 + [(5, 128), (5, 64)] * 3
    candidates = {(c["layers"], c["mlp"]): c for c in report.candidates}
    dense = decode_speed(5, 128)
    truth = {(0.2, 0.0): decode_speed(4, 128) / dense, (0.0, 0.5): decode_speed(5, 64) / dense}
    spread = pooled_log_spread([[t * f for f in TURN_FACTORS] for t in truth.values()])
    assert report.speed_target["spread"] == pytest.approx(spread, rel=1e-9)
    for shape, true_speedup in truth.items():
        candidate = candidates[shape]
        assert candidate["runs"] == 4
        assert candidate["paired_speedups"] == pytest.approx([true_speedup * f for f in TURN_FACTORS])
        assert candidate["decode_speedup"] == pytest.approx(true_speedup)  # the median: the undisturbed turn
        error = spread / math.sqrt(3)
        expected = statistics.NormalDist().cdf(math.log(true_speedup / 1.18) / error)
        assert candidate["confidence"] == pytest.approx(expected, rel=1e-9)
        # It meets the target when the median clears it by `margin` standard errors.
        assert candidate["meets"] == (true_speedup >= 1.18 * math.exp(margin * error))
    assert 1.18 * math.exp(spread / math.sqrt(3)) > 1.2  # 4 blocks lies within one standard error of the target
    scored = {shape for shape, c in candidates.items() if c["quality"] is not None}
    assert scored == ({(0.2, 0.0), (0.0, 0.5)} if margin == 0 else {(0.0, 0.5)})
    if margin:
        (chosen,) = [c for c in report.candidates if c["chosen"]]
        assert (chosen["layers"], chosen["mlp"]) == (0.0, 0.5) and lm.config.intermediate_size == 64
        assert "median of 3 turns" in str(report) and "sure it reaches the target" in str(report)
        assert "sure" in report.candidates_table().splitlines()[0]


def test_a_row_whose_stopping_shape_fails_in_turns_scans_on_to_its_next_depth(monkeypatch):
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(speedup_module, "measure_speed", turn_varying_timer(seen))
    target = SpeedTarget(1.18, layers=(0.0, 0.2, 0.4, 0.6), mlp=(0.0,), heads=(0.0,))
    lm = tiny_llama(num_hidden_layers=5)
    report = shrink(lm, make_batches(), speedup=target)

    # 4 blocks reads 1.2x alone, so the scan stops there; in turns it stays within a standard error of 1.18x, so the
    # scan goes on to 3 blocks (1.5x), which is timed in turns and chosen; 2 blocks is never timed.
    assert seen == [(5, 128), (4, 128), *[(5, 128), (4, 128)] * 3, (3, 128), *[(5, 128), (3, 128)] * 3]
    meets = {c["layers"]: c["meets"] for c in report.candidates}
    assert meets == {0.2: False, 0.4: True}
    assert len(lm.model.layers) == 3


def gguf_shape(path: Path) -> tuple[int, int, int]:
    """(blocks, MLP width, file type) of a llama GGUF, read with the gguf package."""
    reader = gguf.GGUFReader(path)

    def field(name: str) -> int:
        return int(reader.fields[name].contents())

    return field("llama.block_count"), field("llama.feed_forward_length"), field("general.file_type")


def gguf_timer(calls: list[dict[str, tuple[Path, tuple[int, int, int]]]], options: list[dict]):
    """A stand-in for llama.cpp's ``time_in_turns``: reads each file's shape and returns its true speed."""

    def time_in_turns(models, **kwargs):
        options.append(kwargs)
        calls.append({name: (Path(path), gguf_shape(path)) for name, path in models.items()})
        return {name: result(decode_speed(*gguf_shape(path)[:2])) for name, path in models.items()}

    return time_in_turns


def fake_timer_class(opened: list[tuple[Path, tuple[int, int, int], dict]], lucky_run: int | None = None):
    """A stand-in for llama.cpp's ``GGUFTimer``: each run returns the file's true speed, except that run number
    ``lucky_run`` of every shrunk file reads 1.5x fast (a burst of other work ending as it starts)."""

    class FakeTimer:
        def __init__(self, path, **kwargs):
            self.shape = gguf_shape(path)
            self.runs = 0
            opened.append((Path(path), self.shape, kwargs))

        def run(self):
            speed = decode_speed(*self.shape[:2])
            lucky = self.runs == lucky_run and self.shape[:2] != (5, 128)
            self.runs += 1
            return (speed * 1.5, speed * 1.5) if lucky else (speed, speed)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    return FakeTimer


def test_in_llama_cpp_each_shape_is_written_once_as_a_gguf_and_timed_in_turns_with_the_dense_file(monkeypatch):
    monkeypatch.setattr(llamacpp_runtime, "import_llama_cpp", lambda: None)  # runs without llama-cpp-python too
    monkeypatch.setattr(speedup_module, "_load", lambda: 0.0)
    calls: list[dict[str, tuple[Path, tuple[int, int, int]]]] = []
    options: list[dict] = []
    opened: list[tuple[Path, tuple[int, int, int], dict]] = []
    monkeypatch.setattr(llamacpp_speed, "time_in_turns", gguf_timer(calls, options))
    monkeypatch.setattr(llamacpp_speed, "GGUFTimer", fake_timer_class(opened, lucky_run=2))
    target = SpeedTarget(1.18, runtime="llama.cpp", **GRID)
    lm, batches = tiny_llama(num_hidden_layers=5), make_batches()
    dense = copy.deepcopy(lm)
    report = shrink(lm, batches, speedup=target)

    q8_0 = 7  # llama.cpp's file type of q8_0
    # The scan: dense, then each shape on its own, each file timed by time_in_turns (best of 5).
    assert [list(c) for c in calls] == [["shape"]] * 3
    assert [c["shape"][1] for c in calls] == [(5, 128, q8_0), (4, 128, q8_0), (5, 64, q8_0)]
    assert options[0] == dict(repeats=5, new_tokens=128, prefill_length=256, threads=None)
    files = {c["shape"][1]: c["shape"][0] for c in calls}
    assert len(set(files.values())) == 3
    # The turns: three per shape, each the dense file and the shape's file (both written once, in the scan), timed
    # run by run; the lucky run of each shape's file spoils one pair of five, not the turn's median.
    dense_file = files[(5, 128, q8_0)]
    expected_opened = [dense_file, files[(4, 128, q8_0)]] * 3 + [dense_file, files[(5, 64, q8_0)]] * 3
    assert [path for path, _, _ in opened] == expected_opened
    assert all(kwargs == dict(new_tokens=128, prefill_length=256, threads=None) for _, _, kwargs in opened)
    for candidate in report.candidates:
        blocks, width = 5 - round(candidate["layers"] * 5), 128 - round(candidate["mlp"] * 128)
        truth = decode_speed(blocks, width) / decode_speed(5, 128)
        assert candidate["paired_speedups"] == pytest.approx([truth] * 3)
    assert not dense_file.parent.exists()  # the files go with the search

    assert report.speed_target["runtime"] == "llama.cpp" and report.speed_target["dtype"] == "q8_0"
    assert report.speed_target["device"] == "llama.cpp q8_0 (CPU, a thread per core)"
    assert "on llama.cpp q8_0 (CPU, a thread per core): chose" in str(report)
    # Steady turns: the spread is 0, and the shape that keeps the lower loss is applied.
    assert report.speed_target["spread"] == pytest.approx(0.0, abs=1e-12)
    (chosen,) = [c for c in report.candidates if c["chosen"]]
    expected = copy.deepcopy(dense)
    shrink(expected, batches, layers=chosen["layers"], mlp=chosen["mlp"])
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=0)


def test_a_busy_machine_is_warned_about_and_several_llama_cpp_threads_are_told_to_use_one(monkeypatch):
    monkeypatch.setattr(llamacpp_runtime, "import_llama_cpp", lambda: None)
    monkeypatch.setattr(llamacpp_speed, "time_in_turns", gguf_timer([], []))
    monkeypatch.setattr(llamacpp_speed, "GGUFTimer", fake_timer_class([]))
    monkeypatch.setattr(speedup_module, "_load", lambda: 99.0)
    with pytest.warns(UserWarning, match=r"load average \(99.0\) exceeds its \d+ cores.*SpeedTarget\(threads=1\)"):
        shrink(tiny_llama(num_hidden_layers=5), make_batches(), speedup=SpeedTarget(1.18, runtime="llama.cpp", **GRID))
    # One thread does not wait on others, but its timings still share the cores: a choice made on them is warned of.
    target = SpeedTarget(1.18, runtime="llama.cpp", threads=1, **GRID)
    with pytest.warns(UserWarning, match=r"load average \(99.0\) exceeds its \d+ cores: .*quieter machine") as caught:
        shrink(tiny_llama(num_hidden_layers=5), make_batches(), speedup=target)
    assert not any("SpeedTarget(threads=1)" in str(w.message) for w in caught)
    # A quiet machine: no warning at all.
    monkeypatch.setattr(speedup_module, "_load", lambda: 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        shrink(tiny_llama(num_hidden_layers=5), make_batches(), speedup=target)


def test_without_llama_cpp_the_runtime_is_refused_with_the_install_hint_and_nothing_changes(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # importing it raises ImportError
    lm = tiny_llama(num_hidden_layers=5)
    before = copy.deepcopy(lm.state_dict())
    with pytest.raises(ModuleNotFoundError, match=r"llama-cpp-python.*wanda-lightning\[llamacpp\]"):
        shrink(lm, make_batches(), speedup=SpeedTarget(1.2, runtime="llama.cpp", **GRID))
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items()) and len(lm.model.layers) == 5


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (dict(runtime="onnx"), ["`runtime`", "'onnx'", "torch", "llama.cpp"]),
        (dict(dtype="q8_0"), ["`dtype`='q8_0'", "runtime='llama.cpp'"]),
        (dict(runtime="llama.cpp", dtype="q4_k"), ["`dtype`", "'q4_k'", "q8_0", "q4_0"]),
        (dict(runtime="llama.cpp", prefill_batch=2), ["`prefill_batch`", "batch 1", "2"]),
        (dict(margin=-1.0), ["`margin`", "-1.0"]),
        (dict(margin=math.nan), ["`margin`", "nan"]),
        (dict(rounds=0), ["`rounds`", "positive integer", "0"]),
        (dict(threads=2), ["`threads`=2", "runtime='torch'"]),
        (dict(runtime="llama.cpp", threads=0), ["`threads`", "positive integer", "0"]),
        (dict(repeats=0), ["`repeats`", "positive integer", "0"]),
    ],
)
def test_bad_speed_targets_are_refused_naming_the_argument(kwargs, fragments):
    with pytest.raises(ValueError) as caught:
        SpeedTarget(1.5, **kwargs)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_a_multiple_the_timed_gguf_type_cannot_hold_is_refused_before_anything_runs():
    from wanda_lightning.width import ShrinkConfig

    with pytest.raises(ValueError, match=r"`multiple_of`=16: .* q8_0 GGUF files, whose rows hold blocks of 32 values"):
        ShrinkConfig.create(speedup=SpeedTarget(1.5, runtime="llama.cpp"), multiple_of=16)
    for fine in (None, 64):
        assert ShrinkConfig.create(speedup=SpeedTarget(1.5, runtime="llama.cpp"), multiple_of=fine).multiple_of == fine
    assert (
        ShrinkConfig.create(speedup=SpeedTarget(1.5, runtime="llama.cpp", dtype="f16"), multiple_of=3).multiple_of == 3
    )
    described = ShrinkConfig.create(speedup=SpeedTarget(1.5, runtime="llama.cpp")).describe_method()
    assert described.startswith("speed target 1.5x (decode, llama.cpp q8_0) + ")


def test_counts_default_per_runtime_and_stay_as_given():
    torch_target, there = SpeedTarget(1.5), SpeedTarget(1.5, runtime="llama.cpp", dtype="Q4_0")
    assert (torch_target.new_tokens, torch_target.prefill_length, torch_target.repeats) == (32, 128, 3)
    assert (there.new_tokens, there.prefill_length, there.repeats, there.dtype) == (128, 256, 5, "q4_0")
    given = SpeedTarget(1.5, runtime="llama.cpp", new_tokens=16, prefill_length=64, repeats=2)
    assert (given.new_tokens, given.prefill_length, given.repeats) == (16, 64, 2)


def test_real_llama_cpp_timings_of_written_shapes():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install wanda-lightning[llamacpp])")
    lm = tiny_llama()
    target = SpeedTarget(1.5, runtime="llama.cpp", new_tokens=4, prefill_length=8, repeats=1, threads=1)
    timings = speedup_module._LlamaCppTimings(lambda updates: _built(lm, updates), target)
    try:
        (decode, prefill), parameters = timings.single({"intermediate_size": 64})
        assert (
            decode > 0
            and prefill > 0
            and parameters == sum(p.numel() for p in _built(lm, {"intermediate_size": 64}).parameters())
        )
        decode_speedup, prefill_speedup = timings.paired({"intermediate_size": 64})
        assert decode_speedup > 0 and prefill_speedup > 0
        assert len(timings.files) == 2  # the shape's file is reused, the dense one written once
        folder = Path(timings.folder.name)
        assert {gguf_shape(p)[1] for p in folder.glob("*.gguf")} == {64, 128}
    finally:
        timings.close()
    assert not folder.exists()


def _built(lm: torch.nn.Module, updates: dict) -> torch.nn.Module:
    config = copy.deepcopy(lm.config)
    for key, value in updates.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return type(lm)(config).eval()


def test_a_real_llama_cpp_search_chooses_a_shape_or_says_none_reached_it():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install wanda-lightning[llamacpp])")
    lm = tiny_llama(num_hidden_layers=4)
    target = SpeedTarget(
        1.2, layers=(0.0, 0.5), mlp=(0.0, 0.75), runtime="llama.cpp", new_tokens=8, prefill_length=16, threads=1
    )
    try:
        report = shrink(lm, make_batches(), speedup=target)
    except ValueError as error:  # timings on a busy machine decide which; neither is asserted
        assert "no candidate reaches it in llama.cpp (q8_0, CPU)" in str(error)
        assert len(lm.model.layers) == 4
        return
    (chosen,) = [c for c in report.candidates if c["chosen"]]
    assert chosen["meets"] and chosen["runs"] == 1 + target.rounds and len(chosen["paired_speedups"]) == target.rounds
    assert lm.config.num_hidden_layers == chosen["config"].get("num_hidden_layers", 4)
    assert report.speed_target["runtime"] == "llama.cpp"


def test_the_cli_times_the_speed_target_in_llama_cpp(tmp_path, capsys, monkeypatch):
    import json

    from helpers.cli import PRUNE_FAST, char_tokenizer, run_cli, tiny_llama_config

    monkeypatch.setattr(llamacpp_runtime, "import_llama_cpp", lambda: None)
    calls: list[dict[str, tuple[Path, tuple[int, int, int]]]] = []
    monkeypatch.setattr(llamacpp_speed, "time_in_turns", gguf_timer(calls, []))
    opened: list[tuple[Path, tuple[int, int, int], dict]] = []
    monkeypatch.setattr(llamacpp_speed, "GGUFTimer", fake_timer_class(opened))
    dense = tmp_path / "dense"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    out = tmp_path / "fast"
    flags = ("--speedup", "1.3", "--speed-runtime", "llama.cpp", "--speed-gguf-type", "q4_0", "--speed-threads", "1")
    flags = (*flags, *PRUNE_FAST, "--json")
    code, stdout, stderr = run_cli(capsys, "shrink", dense, "--out", out, *flags)
    assert code == 0, stderr
    report = json.loads(stdout)["report"]
    assert report["speed_target"]["runtime"] == "llama.cpp" and report["speed_target"]["dtype"] == "q4_0"
    assert report["speed_target"]["threads"] == 1
    timed = [c["shape"][1] for c in calls] + [shape for _, shape, _ in opened]
    assert {shape[2] for shape in timed} == {2}  # every file timed is q4_0 (llama.cpp's file type 2)
    assert all(kwargs["threads"] == 1 for _, _, kwargs in opened)
    (chosen,) = [c for c in report["candidates"] if c["chosen"]]
    written = transformers.AutoConfig.from_pretrained(out)
    kept = {"num_hidden_layers": 2, "intermediate_size": 128, **chosen["config"]}
    assert (written.num_hidden_layers, written.intermediate_size) == (
        kept["num_hidden_layers"],
        kept["intermediate_size"],
    )
    for bad, message in (
        (["--mlp", "0.5", "--speed-runtime", "llama.cpp"], "say how --speedup is timed; give it"),
        (["--speedup", "1.3", "--speed-threads", "1"], "--speed-threads 1 needs --speed-runtime llama.cpp"),
        (["--speedup", "1.3", "--speed-gguf-type", "q8_0"], "--speed-gguf-type q8_0 needs --speed-runtime llama.cpp"),
    ):
        code, _, stderr = run_cli(capsys, "shrink", dense, "--out", tmp_path / "bad", *bad, *PRUNE_FAST)
        assert code == 2 and message in stderr and not (tmp_path / "bad").exists()
