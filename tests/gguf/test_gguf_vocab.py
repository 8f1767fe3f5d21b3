"""The tokenizer keys save_gguf writes: copied from a GGUF file, built from transformers tokenizers of both BPE kinds,
the timing-only placeholder, the pre-tokenizer name, and the Modelfile's chat template."""

from __future__ import annotations

import json
import warnings

import pytest
from gguf_models import CHATML, byte_fallback_tokenizer, byte_level_tokenizer
from helpers.models import tiny_llama

from wanda_lightning.gguf import save_gguf
from wanda_lightning.gguf.pretokenizer import identify_pre_tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe():
    return byte_level_tokenizer(300)


@pytest.fixture(scope="module")
def spm():
    return byte_fallback_tokenizer(400)


def tokenizer_fields(path) -> dict:
    """Every tokenizer.* key of a GGUF file, strings as bytes."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, entry in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if entry.types[0] == gguf.GGUFValueType.ARRAY and entry.types[-1] == gguf.GGUFValueType.STRING:
            out[key] = [bytes(entry.parts[i]) for i in entry.data]
        else:
            out[key] = entry.contents()
    return out


def test_a_byte_level_bpe_tokenizer_is_written_as_gpt2_and_transformers_reads_it_back(bpe, tmp_path):
    model = tiny_llama(vocab_size=320)  # 20 more rows than tokens: padded with unused tokens
    summary = save_gguf(model, tmp_path / "m.gguf", tokenizer=bpe)
    fields = tokenizer_fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    by_id = {index: text for text, index in bpe.get_vocab().items()}
    assert fields["tokenizer.ggml.tokens"][:300] == [by_id[i].encode() for i in range(300)]
    assert fields["tokenizer.ggml.tokens"][300:] == [f"[PAD{i}]".encode() for i in range(300, 320)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3 and set(types[3:300]) == {int(gguf.TokenType.NORMAL)}
    assert set(types[300:]) == {int(gguf.TokenType.UNUSED)}
    merges = json.loads(bpe.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair).encode() for pair in merges]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is False  # this tokenizer adds no token, like transformers
    assert fields["tokenizer.chat_template"] == CHATML
    assert "byte-level BPE" in summary.tokenizer and "padded with 20" in summary.tokenizer
    read = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "def shrink(model):\n    return 12345  # café"
    assert read(text).input_ids == bpe(text).input_ids


def test_a_folder_gives_the_same_keys_as_the_tokenizer_object(bpe, tmp_path):
    bpe.save_pretrained(tmp_path / "tok")
    save_gguf(tiny_llama(vocab_size=300), tmp_path / "a" / "m.gguf", tokenizer=bpe)
    save_gguf(tiny_llama(vocab_size=300), tmp_path / "b" / "m.gguf", tokenizer=tmp_path / "tok")
    assert tokenizer_fields(tmp_path / "a" / "m.gguf") == tokenizer_fields(tmp_path / "b" / "m.gguf")


def test_a_gguf_file_is_copied_key_for_key(bpe, tmp_path):
    save_gguf(tiny_llama(vocab_size=300), tmp_path / "a" / "source.gguf", tokenizer=bpe)
    summary = save_gguf(tiny_llama(vocab_size=300), tmp_path / "b" / "m.gguf", tokenizer=tmp_path / "a" / "source.gguf")
    assert tokenizer_fields(tmp_path / "b" / "m.gguf") == tokenizer_fields(tmp_path / "a" / "source.gguf")
    assert summary.tokenizer == "copied from source.gguf"


def test_a_vocabulary_larger_than_the_embedding_is_refused(bpe, tmp_path):
    with pytest.raises(ValueError, match=r"has 300 tokens, more than the model's 128 embedding rows"):
        save_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer=bpe)
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_llama_cpp_cannot_read_is_refused_naming_the_argument(tmp_path):
    from helpers.cli import char_tokenizer

    with pytest.raises(ValueError, match=r"`tokenizer` .* is a WordLevel tokenizer.*'placeholder'"):
        save_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer=char_tokenizer())
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"`tokenizer` .* is a file but not a GGUF file"):
        save_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer=tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"`tokenizer` .* does not exist"):
        save_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer=tmp_path / "missing")
    with pytest.raises(TypeError, match=r"`tokenizer` must be"):
        save_gguf(tiny_llama(), tmp_path / "m.gguf", tokenizer=42)
    assert not (tmp_path / "m.gguf").exists()


def test_a_byte_fallback_bpe_tokenizer_is_written_as_llama_with_merge_ranked_scores(spm, tmp_path):
    save_gguf(tiny_llama(vocab_size=400), tmp_path / "m.gguf", tokenizer=spm)
    fields = tokenizer_fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert tokens[3:259] == [f"<0x{b:02X}>".encode() for b in range(256)]
    assert set(types[3:259]) == {int(gguf.TokenType.BYTE)}
    assert types[0] == int(gguf.TokenType.CONTROL)  # added special tokens
    merges = json.loads(spm.backend_tokenizer.to_str())["model"]["merges"]
    ids = {text: index for index, text in enumerate(tokens)}
    for rank, (left, right) in enumerate(merges[:50]):
        assert scores[ids[(left + right).encode()]] == -rank  # llama.cpp merges the highest score first
    assert fields["tokenizer.ggml.add_space_prefix"] is True  # the normalizer prepends "▁"
    assert fields["tokenizer.ggml.add_bos_token"] is True  # the post-processor prepends <s>
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2


def test_placeholder_is_a_vocabulary_of_the_models_size_that_llama_cpp_can_load(tmp_path):
    summary = save_gguf(tiny_llama(vocab_size=300), tmp_path / "m.gguf", tokenizer="placeholder")
    fields = tokenizer_fields(tmp_path / "m.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 300 and len(set(tokens)) == 300  # llama.cpp maps text to ids: every token unique
    assert fields["tokenizer.ggml.model"] == "llama" and b"<0x0A>" in tokens  # the newline byte llama.cpp looks up
    assert len(fields["tokenizer.ggml.scores"]) == len(fields["tokenizer.ggml.token_type"]) == 300
    assert "timing only" in summary.tokenizer


# the Split regexes of Llama 3's and Qwen2's tokenizer.json files, as published
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _REST
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _REST


def _split_then_bytes(regex: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


@pytest.mark.parametrize(
    ("pre_tokenizer", "name"),
    [
        ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
                ],
            },
            "smollm",
        ),
        (_split_then_bytes(_LLAMA3), "llama-bpe"),
        (_split_then_bytes(_QWEN2), "qwen2"),
        (_split_then_bytes(r"\p{N}+"), None),
        ({"type": "Whitespace"}, None),
    ],
)
def test_the_pre_tokenizer_is_recognised_by_its_steps(pre_tokenizer, name):
    assert identify_pre_tokenizer({"pre_tokenizer": pre_tokenizer}, ["a", "b"]) == name


def test_an_unknown_pre_tokenizer_is_written_as_default_with_a_warning(bpe, tmp_path):
    from tokenizers import Regex, pre_tokenizers

    odd = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe.backend_tokenizer.__class__.from_str(bpe.backend_tokenizer.to_str())
    )
    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}+"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    with pytest.warns(UserWarning, match="pre-tokenizer.*not one save_gguf recognises.*'default'"):
        save_gguf(tiny_llama(vocab_size=300), tmp_path / "m.gguf", tokenizer=odd)
    assert tokenizer_fields(tmp_path / "m.gguf")["tokenizer.ggml.pre"] == "default"


def test_the_modelfile_carries_a_chatml_template_and_its_stop_tokens(bpe, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised tokenizer writes without warnings
        save_gguf(tiny_llama(vocab_size=300), tmp_path / "m.gguf", tokenizer=bpe)
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith('FROM ./m.gguf\nTEMPLATE """')
    assert "{{ .Prompt }}<|im_end|>" in text
    assert text.endswith('PARAMETER stop "<|im_start|>"\nPARAMETER stop "<|im_end|>"\n')


# -- SmolLM2, the bundled model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2s_transformers_tokenizer_is_written_like_its_own_gguf(smollm2_gguf, smollm2_tokenizer, tmp_path):
    tokenizer = smollm2_tokenizer
    model = tiny_llama(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    ours, theirs = tokenizer_fields(tmp_path / "m.gguf"), tokenizer_fields(smollm2_gguf)
    # transformers rebuilds this tokenizer from the GGUF file with a plain byte-level pre-tokenizer; the vocabulary
    # identifies it, so the name llama.cpp needs is still SmolLM's
    assert ours["tokenizer.ggml.pre"] == "smollm"
    for key in (
        "model",
        "tokens",
        "merges",
        "token_type",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
    ):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
