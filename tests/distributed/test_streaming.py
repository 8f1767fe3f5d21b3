"""Models larger than memory: a meta-device model pruned block by block from a safetensors checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import make_batches, tiny_llama

from wanda_lightning import prune
from wanda_lightning.distributed.streaming import BlockSaver, SafetensorsCheckpoint, meta_tensor_names

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")


def _meta_copy(model):
    with accelerate.init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(model.config).eval()


@pytest.fixture
def saved(tmp_path, llama):
    folder = tmp_path / "dense"
    llama.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_meta_model_pruned_from_checkpoint_equals_in_memory(saved, llama, structure):
    batches = make_batches(num_batches=2, batch=2, seed=5)
    sparsity = None if ":" in structure else 0.5
    expected = prune(copy.deepcopy(llama), batches, structure=structure, sparsity=sparsity)
    reference = copy.deepcopy(llama)
    prune(reference, batches, structure=structure, sparsity=sparsity)

    meta = _meta_copy(llama)
    assert meta_tensor_names(meta)
    seen: list[str] = []
    report = prune(
        meta,
        batches,
        structure=structure,
        sparsity=sparsity,
        checkpoint=saved,
        on_block_pruned=lambda n, b: seen.append(n),
    )
    assert not meta_tensor_names(meta)
    assert seen == ["model.layers.0", "model.layers.1"]
    assert report.global_sparsity == expected.global_sparsity
    state = reference.state_dict()
    for name, tensor in meta.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_block_saver_keeps_one_block_and_writes_a_loadable_folder(saved, llama, tmp_path):
    batches = make_batches(num_batches=2, batch=2, seed=5)
    reference = copy.deepcopy(llama)
    prune(reference, batches, sparsity=0.5)

    meta = _meta_copy(llama)
    saver = BlockSaver(tmp_path / "pruned", meta)
    resident: list[int] = []

    def on_block_pruned(name, block):
        resident.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in meta.model.layers))
        saver(name, block)

    prune(meta, batches, sparsity=0.5, checkpoint=saved, on_block_pruned=on_block_pruned)
    assert resident == [1, 1]  # each block is released once written: one block in memory at a time
    assert not any(not p.is_meta for p in meta.model.layers.parameters())
    folder = saver.finish()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    state = reference.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_checkpoint_errors_are_clear_and_leave_the_model_alone(saved, llama, tmp_path):
    batches = make_batches(num_batches=1, batch=2)
    meta = _meta_copy(llama)
    with pytest.raises(ValueError, match="pass `checkpoint`"):
        prune(meta, batches, sparsity=0.5)
    with pytest.raises(FileNotFoundError, match=r"neither a \.safetensors file nor a directory"):
        prune(meta, batches, sparsity=0.5, checkpoint=tmp_path / "nowhere")
    partial = tmp_path / "partial.safetensors"
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": llama.model.embed_tokens.weight.detach().clone()}, str(partial))
    with pytest.raises(ValueError, match=r"has no tensor \['model.layers.0"):
        prune(meta, batches, sparsity=0.5, checkpoint=partial)
    with pytest.raises(ValueError, match="`allocation`='owl' scores every block"):
        prune(meta, batches, sparsity=0.5, checkpoint=saved, allocation="owl")
    assert meta_tensor_names(meta) == meta_tensor_names(_meta_copy(llama))  # still all on meta


def test_safetensors_checkpoint_reads_only_what_is_asked(saved, llama):
    source = SafetensorsCheckpoint(saved)
    meta = _meta_copy(llama)
    read = source.materialize(meta.model.layers[1], "model.layers.1.")
    block_bytes = sum(p.numel() * p.element_size() for p in llama.model.layers[1].parameters())
    assert read == block_bytes
    assert not meta_tensor_names(meta.model.layers[1]) and meta_tensor_names(meta.model.layers[0])
    assert torch.equal(meta.model.layers[1].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight)


def test_tied_head_is_read_once_like_from_pretrained(tmp_path):
    dense = tiny_llama(tie_word_embeddings=True)
    dense.save_pretrained(tmp_path / "tied")
    batches = make_batches(num_batches=1, batch=2, seed=5)
    meta = _meta_copy(dense)
    prune(meta, batches, sparsity=0.5, checkpoint=tmp_path / "tied")
    prune(dense, batches, sparsity=0.5)
    assert meta.lm_head.weight is meta.model.embed_tokens.weight
    assert all(torch.equal(t, dense.state_dict()[n]) for n, t in meta.state_dict().items())
