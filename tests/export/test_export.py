"""The compressed export: exact round trips, sizes, N:M codes, corruption detection, atomic writes, sharding."""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from wanda_lightning import prune
from wanda_lightning.export import (
    INDEX_NAME,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    CorruptExportError,
    compress_checkpoint,
    compress_state_dict,
    compress_tensor,
    decompress_state_dict,
    load_compressed,
    load_pruned,
    read_manifest,
    save_pruned,
    summarize_export,
)
from wanda_lightning.export import shards as export_files
from wanda_lightning.export.packing import (
    codes_per_word,
    nm_group_codes,
    nm_group_masks,
    pack_bits,
    pack_radix,
    unpack_bits,
    unpack_radix,
)

transformers = pytest.importorskip("transformers")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# --- helpers ---------------------------------------------------------------------------------------------------------


def bits_equal(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equality (so -0.0 != 0.0 and NaN == NaN with the same payload)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    integer = _INT[a.element_size()]
    return torch.equal(a.contiguous().view(integer), b.contiguous().view(integer))


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def pruned(kind: str, structure: str, dtype: torch.dtype = torch.float32):
    model = MODELS[kind]()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    prune(model, [{"input_ids": ids}], structure=structure, sparsity=None)
    return model.to(dtype)


def logits(model, seed: int = 2) -> Tensor:
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def tensor_location(file: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of a stored tensor inside a safetensors file."""
    raw = file.read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    begin, end = header[key]["data_offsets"]
    return 8 + header_size + begin, 8 + header_size + end


def edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A tiny Llama (wanda, unstructured 50 %) exported once; tests copy it before corrupting it."""
    folder = tmp_path_factory.mktemp("export") / "llama"
    save_pruned(pruned("llama", "unstructured"), folder)
    return folder


@pytest.fixture
def fresh_export(export_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    return copy


UP = "model.layers.0.mlp.up_proj.weight"
UP_RE = re.escape(UP)


# --- round trips -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_round_trip_is_bit_exact_and_small(kind: str, structure: str, dtype: torch.dtype, tmp_path: Path) -> None:
    model = pruned(kind, structure, dtype)
    summary = save_pruned(model, tmp_path / "out")
    loaded = load_pruned(tmp_path / "out")

    assert torch.equal(logits(model), logits(loaded))
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(bits_equal(original[name], restored[name]) for name in original)
    # Tied embeddings are stored once and tied again.
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    manifest = read_manifest(tmp_path / "out")
    aliases = [n for n, e in manifest["tensors"].items() if e["layout"] == "alias"]
    assert aliases == ["lm_head.weight"]
    # Every pruned layer is compressed, with the structure it was pruned with.
    compressed = {n: e for n, e in manifest["tensors"].items() if e["layout"] in ("bitmask", "nm")}
    assert len(compressed) == 14 if kind == "llama" else 8
    assert {e["structure"] for e in compressed.values()} == {structure}
    if kind == "gpt2" and structure == "2:4":  # Conv1D weights are (in, out): groups run along dim 0
        assert {e["group_dim"] for e in compressed.values()} == {0}
    # Sizes, from bytes: pruned weights <= 0.57x their dense bytes (bitmask: 0.5625x in 16-bit, 0.531x in fp32).
    dense = sum(math.prod(e["shape"]) * torch.empty(0, dtype=dtype).element_size() for e in compressed.values())
    stored = sum(
        math.prod(p["shape"]) * torch.empty(0, dtype=getattr(torch, p["dtype"])).element_size()
        for e in compressed.values()
        for p in e["parts"].values()
    )
    assert stored == summary.compressed_stored_bytes and dense == summary.compressed_dense_bytes
    assert stored / dense <= 0.57
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {MANIFEST_NAME, WEIGHTS_NAME, "config.json", "generation_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".ckpt")) for name in files)  # no pickle


def test_whole_export_is_smaller_than_dense_save_pretrained(tmp_path: Path) -> None:
    model = pruned("llama", "unstructured")
    model.save_pretrained(tmp_path / "dense")
    save_pruned(model, tmp_path / "sparse")
    dense_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    sparse_bytes = (tmp_path / "sparse" / WEIGHTS_NAME).stat().st_size
    assert sparse_bytes <= 0.70 * dense_bytes


def test_dtype_argument_casts_parameters_and_keeps_rotary_tables(tmp_path: Path) -> None:
    model = pruned("llama", "2:4")
    summary = save_pruned(model, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = load_pruned(tmp_path / "bf16")
    for name, tensor in model.state_dict().items():
        assert bits_equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert summary.compressed_ratio <= 0.55  # 2:4 codes: (8 + 0.67) / 16 bits per weight


def test_lightning_module_holding_a_transformers_model_is_exported(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    class Wrapper(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = pruned("llama", "unstructured")

    wrapper = Wrapper()
    save_pruned(wrapper, tmp_path / "out")
    assert torch.equal(logits(wrapper.model), logits(load_pruned(tmp_path / "out")))
    assert read_manifest(tmp_path / "out")["metadata"]["source_module"] == "model"


def test_dense_model_still_exports_and_says_so(tmp_path: Path) -> None:
    model = tiny_llama()
    with pytest.warns(UserWarning, match="no pruned weight found"):
        summary = save_pruned(model, tmp_path / "dense")
    assert summary.num_compressed == 0
    assert torch.equal(logits(model), logits(load_pruned(tmp_path / "dense")))


def test_tokenizer_and_true_masks_are_saved(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{chr(i): i - 31 for i in range(32, 127)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), behavior="isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")

    model = tiny_gpt2()
    masks: dict[str, Tensor] = {}
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    prune(model, [{"input_ids": ids}], on_layer_pruned=lambda name, keep: masks.__setitem__(name, keep.clone()))
    # A kept weight that happens to be exactly 0.0 must stay "kept" when the true mask is given.
    layer = model.transformer.h[0].mlp.c_fc  # Conv1D: weight (in, out), pruner masks (out, in)
    kept_positions = masks["transformer.h.0.mlp.c_fc"].t().nonzero()[:3]
    with torch.no_grad():
        layer.weight[kept_positions[:, 0], kept_positions[:, 1]] = 0.0
    save_pruned(model, tmp_path / "out", tokenizer, masks=masks)

    entry = read_manifest(tmp_path / "out")["tensors"]["transformer.h.0.mlp.c_fc.weight"]
    assert entry["kept"] == int(masks["transformer.h.0.mlp.c_fc"].sum())
    assert torch.equal(logits(model), logits(load_pruned(tmp_path / "out")))
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert reloaded("hello").input_ids == tokenizer("hello").input_ids


def test_mask_that_was_not_applied_is_rejected(tmp_path: Path) -> None:
    model = pruned("llama", "unstructured")
    wrong = {"model.layers.0.mlp.up_proj": torch.ones(128, 64, dtype=torch.bool)}
    wrong["model.layers.0.mlp.up_proj"][0, :] = False
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*not zero"):
        save_pruned(model, tmp_path / "out", masks=wrong)
    assert not (tmp_path / "out").exists()


def test_quantization_config_of_a_gguf_model_is_dropped_and_others_refused(tmp_path: Path) -> None:
    # A GGUF-loaded model carries `quantization_config` (quant_method "gguf") although its tensors are dequantized;
    # the real SmolLM2 GGUF file goes through `prune` in tests/test_cli.py.
    model = pruned("llama", "2:4")
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.gguf"}
    save_pruned(model, tmp_path / "gguf")
    config = json.loads((tmp_path / "gguf" / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert torch.equal(logits(model), logits(load_pruned(tmp_path / "gguf")))
    model.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ValueError, match="quantized with bitsandbytes"):
        save_pruned(model, tmp_path / "bnb")
    assert not (tmp_path / "bnb").exists()


def test_transformers_refuses_the_export_instead_of_loading_random_weights(export_dir: Path) -> None:
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(export_dir)


# --- the framework-free pair -----------------------------------------------------------------------------------------


def test_compress_state_dict_is_exact_for_awkward_tensors() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=generator)
    weight[torch.rand(16, 32, generator=generator) < 0.6] = 0.0
    weight[0, 0], weight[0, 1], weight[1, 3] = -0.0, float("nan"), float("inf")
    base = torch.randn(32, 16, generator=generator)
    base[:, ::2] = 0.0
    state = {
        "sparse": weight,
        "tied": weight,  # same storage: stored once
        "view_of_other": base.t(),  # non-contiguous
        "bias": torch.randn(16, generator=generator),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "ints": torch.randint(0, 5, (8, 8), generator=generator),
        "flags": torch.rand(8, 8, generator=generator) > 0.5,
        "zeros": torch.zeros(8, 8, dtype=torch.bfloat16),
    }
    tensors, entries = compress_state_dict(state)
    restored = decompress_state_dict(tensors, entries)
    assert list(restored) == list(state)
    for name, tensor in state.items():
        if name in ("sparse", "tied"):  # the pruned -0.0 at [0, 0] comes back as +0.0; everything else bit for bit
            tensor = tensor.clone()
            tensor[0, 0] = 0.0
        assert bits_equal(restored[name], tensor), name
    assert restored["tied"] is restored["sparse"]
    assert entries["tied"]["layout"] == "alias"
    assert entries["sparse"]["layout"] == "bitmask"
    assert entries["view_of_other"]["structure"] == "1:2"
    assert entries["ints"]["layout"] == entries["bias"]["layout"] == "dense"
    assert entries["zeros"]["kept"] == 0 and entries["zeros"]["layout"] == "nm"


def test_kept_zeros_and_negative_zeros_with_a_true_mask() -> None:
    weight = torch.tensor([[1.0, -0.0, 0.0, 2.0], [-0.0, 3.0, 0.0, 0.0]]).repeat(4, 8)
    mask = torch.tensor([[True, True, False, True], [True, True, False, False]]).repeat(4, 8)
    tensors, entries = compress_state_dict({"w": weight}, masks={"w": mask})
    assert entries["w"]["kept"] == int(mask.sum())  # the true mask, not the non-zeros
    assert bits_equal(decompress_state_dict(tensors, entries)["w"], weight)  # kept -0.0 stays -0.0
    tensors, entries = compress_state_dict({"w": weight})
    assert entries["w"]["kept"] == int((weight != 0).sum())
    assert torch.equal(decompress_state_dict(tensors, entries)["w"], weight)  # equal as numbers
    with pytest.raises(ValueError, match=r"tensor 'w': .*not zero everywhere its mask is False"):
        compress_state_dict({"w": weight}, masks={"w": ~mask})


def test_compress_state_dict_casts_and_respects_min_sparsity() -> None:
    weight = torch.randn(8, 16)
    weight[:, :4] = 0.0  # 25 % zeros
    tensors, entries = compress_state_dict({"w": weight}, torch.bfloat16, min_sparsity=0.3)
    assert entries["w"]["layout"] == "dense" and entries["w"]["dtype"] == "bfloat16"
    assert bits_equal(decompress_state_dict(tensors, entries)["w"], weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="min_sparsity"):
        compress_state_dict({"w": weight}, min_sparsity=1.5)
    with pytest.raises(TypeError, match="dtype"):
        compress_state_dict({"w": weight}, torch.int8)
    with pytest.raises(ValueError, match="clashes"):
        compress_state_dict({"w": torch.zeros(8, 8), "w:values": torch.ones(1)})


@pytest.mark.parametrize(("n", "m", "group_dim"), [(2, 4, 1), (2, 4, 0), (1, 4, 1), (4, 8, 1), (2, 8, 0), (1, 2, 1)])
def test_n_m_weights_use_codes_tighter_than_a_bitmask(n: int, m: int, group_dim: int) -> None:
    generator = torch.Generator().manual_seed(n * 10 + m)
    rows, cols = 48, 96
    scores = torch.rand(rows * cols // m, m, generator=generator)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(n, dim=1).indices, True)
    weight = torch.where(keep.view(rows, cols), torch.randn(rows, cols, generator=generator), 0.0)
    weight[0, keep.view(rows, cols)[0].nonzero()[0]] = 0.0  # a group with fewer than n non-zeros
    if group_dim == 0:
        weight = weight.t().contiguous()
    parts, entry = compress_tensor(weight)
    assert entry["layout"] == "nm" and entry["structure"] == f"{n}:{m}" and entry["group_dim"] == group_dim
    stored_bits = sum(p.numel() * p.element_size() * 8 for p in parts.values())
    bitmask_bits = n * weight.numel() // m * 32 + weight.numel()
    assert stored_bits < bitmask_bits
    tensors, entries = compress_state_dict({"w": weight})
    assert bits_equal(decompress_state_dict(tensors, entries)["w"], weight)


def test_packing_matches_slow_references() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(1001, generator=generator) > 0.5
    packed = pack_bits(mask)
    assert packed.tolist() == np.packbits(mask.numpy(), bitorder="little").tolist()
    assert torch.equal(unpack_bits(packed, 1001), mask)
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.cat([packed[:-1], torch.tensor([255], dtype=torch.uint8)]), 1001)

    combos = list(itertools.combinations(range(4), 2))
    groups = torch.zeros(len(combos), 4, dtype=torch.bool)
    for rank, kept in enumerate(combos):
        groups[rank, list(kept)] = True
    assert nm_group_codes(groups, 2).tolist() == list(range(6))
    assert torch.equal(nm_group_masks(torch.arange(6), 2, 4), groups)

    codes = torch.randint(0, 6, (1000,), generator=generator)
    words = pack_radix(codes, 6)
    assert codes_per_word(6) == 24 and words.numel() == math.ceil(1000 / 24)
    expected_first = sum(int(codes[j]) * 6**j for j in range(24))
    assert int(words[0]) == expected_first
    assert torch.equal(unpack_radix(words, 6, 1000), codes)


# --- corruption ------------------------------------------------------------------------------------------------------


def test_truncated_file_names_the_tensor(fresh_export: Path) -> None:
    file = fresh_export / WEIGHTS_NAME
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CorruptExportError, match=r"tensor '.*': file .* is truncated"):
        load_pruned(fresh_export)


@pytest.mark.parametrize("role", ["values", "mask"])
def test_flipped_byte_in_a_tensor_names_it(fresh_export: Path, role: str) -> None:
    file = fresh_export / WEIGHTS_NAME
    begin, end = tensor_location(file, f"{UP}:{role}")
    raw = bytearray(file.read_bytes())
    raw[(begin + end) // 2] ^= 0x10
    file.write_bytes(bytes(raw))
    with pytest.raises(CorruptExportError, match=f"tensor '{UP_RE}': checksum mismatch in part '{role}'"):
        load_pruned(fresh_export)


def test_flipped_byte_in_a_header_names_the_file(fresh_export: Path) -> None:
    file = fresh_export / WEIGHTS_NAME
    raw = bytearray(file.read_bytes())
    raw[12] = ord("}")
    file.write_bytes(bytes(raw))
    with pytest.raises(CorruptExportError, match=f"file '{WEIGHTS_NAME}'"):
        load_compressed(fresh_export)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["tensors"][UP].__setitem__("shape", [64, 128]), f"tensor '{UP_RE}'"),
        (lambda m: m["tensors"][UP]["parts"]["values"].__setitem__("sha256", "0" * 64), f"tensor '{UP_RE}': checksum"),
        (lambda m: m["tensors"][UP].__setitem__("sparsity", 0.4), f"tensor '{UP_RE}': manifest sparsity"),
        (lambda m: m["tensors"][UP].__setitem__("structure", "2:4"), f"tensor '{UP_RE}'"),
        (lambda m: m["tensors"][UP].__setitem__("dtype", "float16"), f"tensor '{UP_RE}'"),
        (
            lambda m: m["tensors"]["lm_head.weight"].__setitem__("target", "model.layers.0.mlp.down_proj.weight"),
            "tensor 'lm_head.weight'",
        ),
        (lambda m: m["tensors"].pop(UP), "not described by the manifest"),
        (lambda m: m.__setitem__("version", 99), "format version"),
        (lambda m: m["producer"].__setitem__("torch", "0.0"), "does not match its own checksum"),
    ],
    ids=["shape", "sha256", "sparsity", "structure", "dtype", "alias", "dropped", "version", "other-field"],
)
def test_edited_manifest_is_refused(fresh_export: Path, edit, match: str) -> None:
    edit_manifest(fresh_export, edit)
    with pytest.raises(CorruptExportError, match=match):
        load_pruned(fresh_export)


def test_wrong_popcount_is_refused(fresh_export: Path) -> None:
    # The manifest's kept count is edited...
    edit_manifest(fresh_export, lambda m: m["tensors"][UP].__setitem__("kept", m["tensors"][UP]["kept"] + 1))
    with pytest.raises(CorruptExportError, match=f"tensor '{UP_RE}'"):
        load_pruned(fresh_export)


def test_flipped_mask_bit_with_a_matching_checksum_is_refused(fresh_export: Path) -> None:
    # ... or a mask bit flips and someone "repairs" the checksum: the popcount still disagrees.
    from wanda_lightning.export.format import entry_digest, tensor_sha256

    file = fresh_export / WEIGHTS_NAME
    begin, _ = tensor_location(file, f"{UP}:mask")
    raw = bytearray(file.read_bytes())
    raw[begin] ^= 0x01
    file.write_bytes(bytes(raw))
    from safetensors.torch import load_file

    digest = tensor_sha256(load_file(str(file))[f"{UP}:mask"])

    def forge(manifest: dict) -> None:
        entry = manifest["tensors"][UP]
        entry["parts"]["mask"]["sha256"] = digest
        entry["entry_sha256"] = entry_digest(entry)

    edit_manifest(fresh_export, forge)
    with pytest.raises(CorruptExportError, match=f"tensor '{UP_RE}': mask popcount"):
        load_pruned(fresh_export)


def test_missing_files_are_refused(fresh_export: Path) -> None:
    config = json.loads((fresh_export / "config.json").read_text())
    (fresh_export / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CorruptExportError, match="do not fit LlamaForCausalLM"):
        load_pruned(fresh_export)
    (fresh_export / "config.json").unlink()
    with pytest.raises(CorruptExportError, match=r"config\.json of the export"):
        load_pruned(fresh_export)
    (fresh_export / WEIGHTS_NAME).unlink()
    with pytest.raises(CorruptExportError, match=f"file '{WEIGHTS_NAME}' is missing"):
        load_pruned(fresh_export)


# --- writing safely --------------------------------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


def test_crash_while_writing_leaves_no_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_files, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(pruned("llama", "2:4"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_crash_while_overwriting_keeps_the_old_export(
    export_dir: Path, fresh_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        save_pruned(pruned("gpt2", "2:4"), fresh_export, BrokenTokenizer(), overwrite=True)
    assert leftovers(fresh_export.parent) == []
    assert torch.equal(logits(load_pruned(fresh_export)), logits(load_pruned(export_dir)))


def test_existing_paths(tmp_path: Path, export_dir: Path, fresh_export: Path) -> None:
    model = pruned("llama", "2:4")
    before = sorted(p.name for p in fresh_export.iterdir())
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        save_pruned(model, fresh_export)
    assert sorted(p.name for p in fresh_export.iterdir()) == before
    assert read_manifest(fresh_export)["tensors"][UP]["structure"] == "unstructured"

    save_pruned(model, fresh_export, overwrite=True)
    assert read_manifest(fresh_export)["tensors"][UP]["structure"] == "2:4"
    assert leftovers(fresh_export.parent) == []

    (tmp_path / "empty").mkdir()
    save_pruned(model, tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / MANIFEST_NAME).is_file()

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        save_pruned(model, tmp_path / "file")
    with pytest.raises(ValueError, match="is a file"):
        save_pruned(model, tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "x"


def test_sharded_export_has_an_index(tmp_path: Path) -> None:
    model = pruned("llama", "unstructured")
    save_pruned(model, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("sparse-model-*.safetensors"))
    assert len(shards) > 2 and shards[0].endswith(f"-00001-of-{len(shards):05d}.safetensors")
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == summarize_export(tmp_path / "out").stored_bytes
    assert all(p.stat().st_size < 40_000 + 8_000 for p in (tmp_path / "out").glob("sparse-model-*"))
    assert torch.equal(logits(model), logits(load_pruned(tmp_path / "out")))

    # An index that disagrees with the manifest is refused, naming the tensor.
    index["weight_map"][f"{UP}:mask"] = shards[0] if index["weight_map"][f"{UP}:mask"] != shards[0] else shards[1]
    (tmp_path / "out" / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CorruptExportError, match=f"tensor '{UP_RE}'"):
        load_pruned(tmp_path / "out")


def test_lightning_checkpoint_is_compressed_without_pickle(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    model = pruned("llama", "2:4")
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"lr": 0.1, "name": "tiny"},
        "epoch": 3,
        "global_step": 30,
        "pytorch-lightning_version": pl.__version__,
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    summary = compress_checkpoint(tmp_path / "last.ckpt", tmp_path / "out")
    state, manifest = load_compressed(tmp_path / "out")
    assert all(bits_equal(state[k], v) for k, v in checkpoint["state_dict"].items())
    assert state["model.lm_head.weight"] is state["model.model.embed_tokens.weight"]
    assert manifest["metadata"]["source"]["hyper_parameters"] == {"lr": 0.1, "name": "tiny"}
    assert summary.compressed_ratio <= 0.57
    with pytest.raises(ValueError, match="export of a plain state dict"):
        load_pruned(tmp_path / "out")

    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        compress_checkpoint(tmp_path / "bad.ckpt", tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        compress_checkpoint(tmp_path / "missing.ckpt", tmp_path / "missing")
    assert not (tmp_path / "bad").exists()
