"""``wanda-lightning gguf`` and ``--gguf`` / ``--gguf-type`` on ``prune`` and ``shrink``, end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import PRUNE_FAST, char_tokenizer, run_cli
from helpers.models import tiny_llama

from wanda_lightning.cli import main

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 300


def byte_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer of 300 tokens, trained on the start of the pydoc corpus."""
    from wanda_lightning.data.corpus import pydoc_text

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([pydoc_text()[:20000]], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (vocab 300) with a byte-level BPE tokenizer, saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama(vocab_size=VOCAB, tie_word_embeddings=True, eos_token_id=0).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def read_back(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


IDS = torch.arange(40).view(2, 20) * 7 % VOCAB


def test_every_new_command_and_flag_has_help(capsys):
    for command, flags in [
        ("gguf", ("--type", "--tokenizer", "OUT.gguf")),
        ("prune", ("--gguf", "--gguf-type")),
        ("shrink", ("--gguf", "--gguf-type")),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and all(flag in out for flag in flags), command


def test_gguf_writes_a_folder_as_a_file_transformers_reads_back(bpe_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, stdout, stderr = run_cli(capsys, "gguf", bpe_dir, out, "--type", "f32", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["architecture"] == "llama" and summary["dtype"] == "f32" and summary["path"] == str(out)
    assert summary["modelfile"] == str(tmp_path / "Modelfile") and "byte-level BPE" in summary["tokenizer"]
    dense = transformers.AutoModelForCausalLM.from_pretrained(bpe_dir)
    assert (logits_of(read_back(out), IDS) - logits_of(dense, IDS)).abs().max() <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert tokenizer("def f(x): return 42").input_ids == byte_level_tokenizer()("def f(x): return 42").input_ids
    # a GGUF file as MODEL: its own tokenizer is copied, and the text output names the file
    code, stdout, stderr = run_cli(capsys, "gguf", out, tmp_path / "q" / "m.q8.gguf")
    assert code == 0, stderr
    assert f"wrote {tmp_path / 'q' / 'm.q8.gguf'}" in stdout and "copied from m.gguf" in stdout


def test_gguf_refuses_what_it_cannot_write_and_writes_nothing(bpe_dir, tmp_path, capsys):
    char_dir = tmp_path / "char"
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
        )
    ).save_pretrained(char_dir)
    char_tokenizer().save_pretrained(char_dir)
    code, _, stderr = run_cli(capsys, "gguf", char_dir, tmp_path / "m.gguf")
    assert code == 2 and "WordLevel tokenizer" in stderr and "'placeholder'" in stderr
    assert not (tmp_path / "m.gguf").exists()
    code, _, stderr = run_cli(capsys, "gguf", char_dir, tmp_path / "m.gguf", "--tokenizer", "placeholder")
    assert code == 0, stderr  # a timing-only file
    code, _, stderr = run_cli(capsys, "gguf", bpe_dir, tmp_path / "m.gguf")
    assert code == 2 and "pass overwrite=True" in stderr
    code, _, stderr = run_cli(capsys, "gguf", bpe_dir, tmp_path / "m.bin")
    assert code == 2 and "must end in .gguf" in stderr and not (tmp_path / "m.bin").exists()


def test_prune_also_writes_the_masked_model_as_gguf(bpe_dir, tmp_path, capsys):
    out, path = tmp_path / "pruned", tmp_path / "pruned.gguf"
    code, stdout, stderr = run_cli(
        capsys, "prune", bpe_dir, "--out", out, *PRUNE_FAST, "--gguf", path, "--gguf-type", "q4_0", "--json"
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["gguf"]["dtype"] == "q4_0" and result["gguf"]["path"] == str(path)
    from wanda_lightning.export import load_pruned

    pruned = load_pruned(out)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for block in range(2):
        weight = pruned.model.layers[block].mlp.down_proj.weight.detach().numpy()
        tensor = tensors[f"blk.{block}.ffn_down.weight"]
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(weight.shape)
        assert tensor.tensor_type.name == "Q4_0" and np.all(values[weight == 0] == 0)
    # the export folder itself converts too
    code, _, stderr = run_cli(capsys, "gguf", out, tmp_path / "again" / "m.gguf", "--type", "f32")
    assert code == 0, stderr
    assert (logits_of(read_back(tmp_path / "again" / "m.gguf"), IDS) - logits_of(pruned, IDS)).abs().max() <= 1e-4


def test_shrink_also_writes_the_shrunk_model_as_gguf(bpe_dir, tmp_path, capsys):
    out, path = tmp_path / "small", tmp_path / "small.gguf"
    flags = ["--mlp", "0.5", "--heads", "0.5", "--layers", "0.5", *PRUNE_FAST]
    code, stdout, stderr = run_cli(
        capsys, "shrink", bpe_dir, "--out", out, *flags, "--gguf", path, "--gguf-type", "f32"
    )
    assert code == 0, stderr
    assert f"wrote {path}" in stdout
    small = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(small.model.layers) == 1 and small.config.intermediate_size == 64
    assert (logits_of(read_back(path), IDS) - logits_of(small, IDS)).abs().max() <= 1e-4


def test_prune_and_shrink_check_the_gguf_target_before_the_slow_part(bpe_dir, tmp_path, capsys):
    existing = tmp_path / "taken.gguf"
    existing.write_bytes(b"keep")
    for command, flags in [("prune", []), ("shrink", ["--mlp", "0.5"])]:
        out = tmp_path / command
        code, _, stderr = run_cli(capsys, command, bpe_dir, "--out", out, *flags, *PRUNE_FAST, "--gguf", existing)
        assert code == 2 and "--gguf" in stderr and "pass overwrite=True" in stderr, stderr
        assert not out.exists() and existing.read_bytes() == b"keep"
        code, _, stderr = run_cli(capsys, command, bpe_dir, "--out", out, *flags, *PRUNE_FAST, "--gguf", "x.bin")
        assert code == 2 and "must end in .gguf" in stderr and not out.exists()


def test_adapters_are_merged_into_a_copy_before_writing(tmp_path):
    peft = pytest.importorskip("peft")
    from wanda_lightning.cli.gguf import write_gguf

    base = tiny_llama()
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        expected = logits_of(model, IDS % 128)
    summary = write_gguf(model, str(tmp_path / "m.gguf"), "f32", "placeholder", overwrite=False)
    assert summary.architecture == "llama"
    assert any("lora_A" in name for name, _ in model.named_parameters())  # the caller's model keeps its adapters
    assert (logits_of(read_back(tmp_path / "m.gguf"), IDS % 128) - expected).abs().max() <= 1e-4
