"""``wanda-lightning shrink`` and ``wanda-lightning speed`` end to end on tiny models in temporary directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import PRUNE_FAST, char_tokenizer, run_cli, tiny_llama_config

from wanda_lightning import shrink
from wanda_lightning.cli.speed import verdicts

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_shrink_writes_a_folder_stock_from_pretrained_loads(dense_dir, tmp_path, capsys):
    out = tmp_path / "small"
    code, stdout, stderr = run_cli(
        capsys, "shrink", dense_dir, "--out", out, "--mlp", "0.5", "--heads", "0.5", *PRUNE_FAST, "--json"
    )
    assert code == 0, stderr
    report = json.loads(stdout)["report"]
    assert report["config_updates"] == {
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.model.layers[1].mlp.down_proj.in_features == 64
    assert sum(p.numel() for p in loaded.parameters()) == report["parameters_after"]
    # The same units as shrink() on the same calibration windows (the CLI reads pydoc's first 70 %).
    from wanda_lightning.data.corpus import split_tokens

    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    windows = split_tokens(char_tokenizer(), num_samples=4, seqlen=32).calibration
    expected = shrink(dense, [{"input_ids": windows}], mlp=0.5, heads=0.5)
    assert [g["kept_units"] for g in report["groups"]] == [g.kept_units for g in expected.groups]
    ids = windows[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, dense(input_ids=ids).logits)
    # eval and inspect read the folder like any transformers model.
    code, stdout, stderr = run_cli(capsys, "eval", out, "--seqlen", "32", "--max-windows", "2", "--json")
    assert code == 0 and json.loads(stdout)["perplexity"] > 1, stderr
    code, _, stderr = run_cli(capsys, "inspect", out)
    assert code == 0, stderr


def test_shrink_removes_blocks_with_layers(dense_dir, tmp_path, capsys):
    out = tmp_path / "shallow"
    code, stdout, stderr = run_cli(capsys, "shrink", dense_dir, "--out", out, "--layers", "0.5", *PRUNE_FAST, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)["report"]
    assert report["config_updates"] == {"num_hidden_layers": 1}
    from wanda_lightning.data.corpus import split_tokens

    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    windows = split_tokens(char_tokenizer(), num_samples=4, seqlen=32).calibration
    expected = shrink(dense, [{"input_ids": windows}], layers=0.5)
    assert report["removed_blocks"] == expected.removed_blocks and report["block_scores"] == expected.block_scores
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(loaded.model.layers) == 1
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=windows[:2]).logits, dense(input_ids=windows[:2]).logits)


def test_shrink_to_a_speed_target_writes_the_chosen_model_and_the_plot(dense_dir, tmp_path, capsys, monkeypatch):
    from wanda_lightning.core.speed import SpeedResult
    from wanda_lightning.width import speedup as speedup_module

    def timer(throwaway, **kwargs):  # deterministic: speed from the MLP width alone
        cost = 1 + throwaway.config.intermediate_size / 128
        return SpeedResult("x", 1, 0, 10.0 / cost, 10.0 / cost, None, "cpu", 1, 32, (4, 256))

    monkeypatch.setattr(speedup_module, "measure_speed", timer)
    out, plot = tmp_path / "fast", tmp_path / "candidates.png"
    code, stdout, stderr = run_cli(
        capsys, "shrink", dense_dir, "--out", out, "--speedup", "1.3", "--plot", plot, *PRUNE_FAST, "--json"
    )
    assert code == 0, stderr
    report = json.loads(stdout)["report"]
    (chosen,) = [c for c in report["candidates"] if c["chosen"]]
    assert chosen["mlp"] == 0.5 and chosen["layers"] == 0.0  # the only shape that reaches 1.3x here
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.intermediate_size == 64
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mlp", "1.5"], "`mlp` must be a fraction in [0, 1), got 1.5"),
        ([], "`mlp`, `heads` and `layers` are all 0"),
        (["--layers", "0.2"], "`layers`=0.2 of 2 blocks in the block stack `model.layers` rounds to none"),
        (["--heads", "0.1"], "rounds to none"),
        (["--mlp", "0.5", "--samples", "0"], "--samples must be a positive integer"),
        (["--mlp", "0.5", "--plot", "x.png"], "--plot draws the --speedup candidates"),
        (["--speedup", "0.9"], "`speedup` must be a number above 1"),
    ],
)
def test_shrink_refuses_bad_input_and_writes_nothing(dense_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "small"
    code, _, stderr = run_cli(capsys, "shrink", dense_dir, "--out", out, *flags, *PRUNE_FAST[2:])
    assert code == 2 and message in stderr and stderr.startswith("wanda-lightning shrink: error:")
    assert not out.exists()


def test_speed_times_each_model_and_says_which_pays(dense_dir, tmp_path, capsys):
    out = tmp_path / "small"
    code, _, stderr = run_cli(capsys, "shrink", dense_dir, "--out", out, "--mlp", "0.5", "--method", "magnitude-sp")
    assert code == 0, stderr
    speed = ["--new-tokens", "4", "--prefill-length", "8", "--prefill-batch", "2", "--repeats", "1"]
    code, stdout, stderr = run_cli(capsys, "speed", dense_dir, out, *speed, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    dense, small = result["results"]
    assert small["parameters"] < dense["parameters"] and small["weight_bytes"] < dense["weight_bytes"]
    assert all(r["decode_tokens_per_second"] > 0 and r["prefill_tokens_per_second"] > 0 for r in (dense, small))
    assert small["prefill_shape"] == [2, 8] and small["new_tokens"] == 4
    assert result["verdicts"] == verdicts(result["results"])
    code, stdout, _ = run_cli(capsys, "speed", dense_dir, out, *speed)
    assert code == 0 and "decode tok/s" in stdout and f"{out}: " in stdout and "against" in stdout


def test_verdicts_compare_with_the_first_model():
    rows = [
        {"name": "dense", "decode_tokens_per_second": 10.0, "prefill_tokens_per_second": 100.0},
        {"name": "masked", "decode_tokens_per_second": 10.2, "prefill_tokens_per_second": 99.0},
        {"name": "small", "decode_tokens_per_second": 13.5, "prefill_tokens_per_second": 146.0},
    ]
    assert verdicts(rows) == [
        "masked: 1.02x decode, 0.99x prefill against dense: no speed-up here",
        "small: 1.35x decode, 1.46x prefill against dense: pays",
    ]
