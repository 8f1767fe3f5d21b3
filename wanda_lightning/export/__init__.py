"""Compressed export of pruned models: kept values + packed masks in safetensors, a JSON manifest, exact round trip.

Two moves, as in gpt-fast: make the compressed state (:func:`compress_state_dict`, :func:`save_compressed`,
:func:`save_pruned`), then load it back for runtime (:func:`decompress_state_dict`, :func:`load_compressed`,
:func:`load_pruned`). Format ``"wanda-lightning-sparse"`` version 1:

* Every pruned 2-D floating-point weight (at least ``min_sparsity`` = 25 % zeros) is stored as its kept values (1-D,
  row-major) plus either a 1-bit mask (``uint8``, little bit order: element ``i`` is bit ``i % 8`` of byte ``i // 8``)
  or, when smaller, N:M combination codes (2:4: the rank of the 2 kept positions among the 6 possible, packed in base
  6, 24 groups per ``int64`` word = 0.67 bit per weight). A 50 % bf16 weight takes 0.5625x its dense bytes with a
  bitmask and 0.542x with 2:4 codes; in fp32, 0.531x and 0.521x.
* Everything else is stored as is; tied tensors once (an ``"alias"`` entry). Kept values are stored bit for bit; pruned
  positions come back as ``+0.0`` (a pruned ``-0.0`` too: equal as a number).
* ``sparse_manifest.json`` records per tensor the layout, shape, dtype, structure (``"unstructured"``, ``"2:4"``...),
  sparsity, kept count (mask popcount) and the SHA-256 of each stored tensor's bytes, plus its own checksum. Loading
  verifies all of them and raises :class:`CorruptExportError` naming the tensor on any mismatch.
* Only safetensors and JSON: no pickle. Writes go to a temporary directory renamed into place.

Modules: :mod:`.packing` (bit encodings), :mod:`.format` (tensors to stored parts and back), :mod:`.manifest` (the
JSON manifest), :mod:`.shards` (safetensors files), :mod:`.paths` (safe directory writes), :mod:`.directory`
(:func:`save_compressed` / :func:`load_compressed`), :mod:`.checkpoints` (Lightning checkpoints), :mod:`.hf`
(transformers models), :mod:`.adapters` (merging PEFT adapters into pruned weights) and
:mod:`.runtime` (2:4 semi-structured kernels on a GPU).

Example::

    from wanda_lightning.export import load_pruned, save_pruned
    save_pruned(model, "pruned/", tokenizer, dtype=torch.bfloat16)
    model = load_pruned("pruned/")
"""

from .adapters import merge_adapters, merged_state_dict
from .checkpoints import compress_checkpoint, read_checkpoint
from .directory import load_compressed, save_compressed
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CorruptExportError,
    compress_state_dict,
    compress_tensor,
    decompress_state_dict,
    decompress_tensor,
)
from .hf import load_pruned, save_pruned
from .manifest import MANIFEST_NAME, ExportSummary, Manifest, is_export, read_manifest, summarize_export
from .packing import pack_bits, unpack_bits
from .runtime import SemiStructuredSummary, is_2_4_sparse, to_semi_structured
from .shards import INDEX_NAME, WEIGHTS_NAME

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "CorruptExportError",
    "ExportSummary",
    "Manifest",
    "SemiStructuredSummary",
    "compress_checkpoint",
    "compress_state_dict",
    "compress_tensor",
    "decompress_state_dict",
    "decompress_tensor",
    "is_2_4_sparse",
    "is_export",
    "load_compressed",
    "load_pruned",
    "merge_adapters",
    "merged_state_dict",
    "pack_bits",
    "read_checkpoint",
    "read_manifest",
    "save_compressed",
    "save_pruned",
    "summarize_export",
    "to_semi_structured",
    "unpack_bits",
]
