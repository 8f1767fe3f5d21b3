"""What save_gguf promises around the file: bad inputs refused naming the argument with nothing written, the model
untouched, existing files kept without overwrite=True, an atomic write, the Modelfile, and GGUFExport."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from gguf_models import make_model
from helpers.models import tiny_gpt2, tiny_llama

from wanda_lightning.gguf import GGUFExport, GGUFSummary, save_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def test_an_unsupported_family_is_refused_with_the_reason_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel with model_type 'gpt2' is not one of them"):
        save_gguf(tiny_gpt2(), tmp_path / "m.gguf", tokenizer="placeholder")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tokenizer_is_refused_naming_it_and_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"`tokenizer` is required.*GGUF file.*'placeholder'"):
        save_gguf(tiny_llama(), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_model_with_adapters_is_refused_with_how_to_merge_them(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"`model` holds adapter layers.*merge_adapters"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer="placeholder")
    assert list(tmp_path.iterdir()) == []


def test_a_module_without_a_transformers_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="`model` must be a transformers causal LM"):
        save_gguf(torch.nn.Linear(2, 2), tmp_path / "m.gguf", tokenizer="placeholder")


@pytest.mark.parametrize(
    ("path", "error"),
    [("model.bin", "must end in .gguf"), (".", "must end in .gguf"), (3, "must be a file path")],
)
def test_a_bad_path_is_refused(path, error, tmp_path):
    with pytest.raises((ValueError, TypeError), match=error):
        save_gguf(tiny_llama(), path, tokenizer="placeholder")


def test_what_llama_cpp_would_compute_differently_is_refused(tmp_path):
    model = make_model("gemma3")
    model.config.query_pre_attn_scalar = 64  # llama.cpp scales a 6-block gemma3 by its head size, 256
    with pytest.raises(ValueError, match=r"query_pre_attn_scalar=64.*by 256"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer="placeholder")
    model = tiny_llama(hidden_act="gelu")
    with pytest.raises(ValueError, match=r"llama.cpp's `llama`: its MLP activation is 'gelu'"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer="placeholder")
    model = tiny_llama(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope scaling 'yarn'"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer="placeholder")
    assert list(tmp_path.iterdir()) == []


def test_blocks_of_different_widths_are_refused(tmp_path):
    model = tiny_llama()
    layer = model.model.layers[0].mlp
    layer.gate_proj, layer.up_proj = torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(64, 96, bias=False)
    layer.down_proj = torch.nn.Linear(96, 64, bias=False)
    with pytest.raises(ValueError, match=r"block 0: 4 heads, 2 kv heads, 96 MLP units.*`deci`"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer="placeholder")


def test_a_bias_llama_cpp_would_not_read_is_dropped_only_when_zero(tmp_path):
    model = make_model("gemma3")
    output = model.model.layers[0].self_attn.o_proj
    output.bias = torch.nn.Parameter(torch.zeros(output.out_features))
    save_gguf(model, tmp_path / "zero.gguf", dtype="f32", tokenizer="placeholder")
    assert "blk.0.attn_output.bias" not in {t.name for t in gguf.GGUFReader(tmp_path / "zero.gguf").tensors}
    with torch.no_grad():
        output.bias[3] = 0.5
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.o_proj.bias' is a non-zero bias"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer="placeholder", overwrite=True)
    assert not (tmp_path / "m.gguf").exists()


def test_the_model_is_not_changed(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    before = copy.deepcopy(model.state_dict())
    save_gguf(model, tmp_path / "m.gguf", dtype="q4_0", tokenizer="placeholder")
    after = model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())
    assert next(model.parameters()).device.type == "cpu" and not model.training


def test_an_existing_file_is_kept_without_overwrite(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"exists; pass overwrite=True"):
        save_gguf(tiny_llama(), target, tokenizer="placeholder")
    assert target.read_bytes() == b"precious" and not (tmp_path / "Modelfile").exists()
    summary = save_gguf(tiny_llama(), target, tokenizer="placeholder", overwrite=True)
    assert target.read_bytes()[:4] == b"GGUF" and summary.file_bytes == target.stat().st_size


def test_an_existing_modelfile_is_kept_without_overwrite(tmp_path):
    (tmp_path / "Modelfile").write_text("FROM ./other.gguf\n")
    with pytest.raises(ValueError, match=r"Modelfile' exists; pass overwrite=True.*modelfile=False"):
        save_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer="placeholder")
    assert not (tmp_path / "m.gguf").exists()
    summary = save_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer="placeholder", modelfile=False)
    assert summary.modelfile is None and (tmp_path / "Modelfile").read_text() == "FROM ./other.gguf\n"


def test_the_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "m.gguf"
    save_gguf(tiny_llama(), target, tokenizer="placeholder")
    first = target.read_bytes()

    def broken(values, qtype):
        raise OSError("disk full")

    monkeypatch.setattr("wanda_lightning.gguf.writer.encode", broken)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(make_model("llama"), target, tokenizer="placeholder", overwrite=True)
    assert target.read_bytes() == first  # the old file is still whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "m.gguf"]  # no temporary file left
    (tmp_path / "plain").write_bytes(b"")  # the renamed file has the permissions any new file gets here
    assert target.stat().st_mode == (tmp_path / "plain").stat().st_mode == (tmp_path / "Modelfile").stat().st_mode


def test_the_summary_and_the_modelfile(tmp_path):
    summary = save_gguf(tiny_llama(), tmp_path / "sub" / "small.gguf", tokenizer="placeholder")
    assert isinstance(summary, GGUFSummary)
    assert summary.path == str(tmp_path / "sub" / "small.gguf") and summary.dtype == "q8_0"
    assert summary.architecture == "llama" and summary.tensor_count == 21
    assert summary.parameters == sum(p.numel() for p in tiny_llama().parameters())
    assert summary.modelfile == str(tmp_path / "sub" / "Modelfile")
    assert (tmp_path / "sub" / "Modelfile").read_text() == "FROM ./small.gguf\n"  # no chat template: FROM only
    assert summary.to_dict()["file_bytes"] == os.path.getsize(summary.path)
    assert "ollama create" in str(summary)


def test_gguf_export_checks_when_made_and_overwrites_when_saving(tmp_path):
    with pytest.raises(ValueError, match=r"`path` must end in .gguf, got 'small.bin'"):
        GGUFExport("small.bin")
    with pytest.raises(ValueError, match=r"`dtype` must be one of"):
        GGUFExport("small.gguf", dtype="q5_k")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`tokenizer` must be"):
        GGUFExport("small.gguf", tokenizer=3)  # type: ignore[arg-type]
    export = GGUFExport(tmp_path / "small.gguf", dtype="Q4_0", tokenizer="placeholder")  # type: ignore[arg-type]
    assert export.path == str(tmp_path / "small.gguf") and export.dtype == "q4_0"
    first = export.save(tiny_llama())
    second = export.save(make_model("llama"))  # the callbacks rewrite it at each act
    assert first.path == second.path and second.dtype == "q4_0"
    tensors = {t.name: t for t in gguf.GGUFReader(export.path).tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_0"


def test_gguf_export_prefers_its_own_tokenizer_over_the_one_given_to_save(tmp_path):
    export = GGUFExport(str(tmp_path / "a.gguf"), tokenizer="placeholder")
    summary = export.save(tiny_llama(), tokenizer=object())  # ignored: the export names its tokenizer
    assert summary.tokenizer.startswith("placeholder")
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        GGUFExport(str(tmp_path / "b.gguf")).save(tiny_llama())
