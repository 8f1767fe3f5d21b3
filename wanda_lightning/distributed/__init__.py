"""Models spread over processes or too large for memory: FSDP1/FSDP2 shard-local pruning (:mod:`.sharding`),
meta-device models read block by block from safetensors (:mod:`.streaming`), and the helpers that run and count
multi-process jobs in tests and benchmarks (:mod:`.testing`).

Torch-level helpers that know nothing of targets or statistics: this package imports nothing else from
wanda_lightning, and the engine (:mod:`wanda_lightning.core`) builds on it.
"""
