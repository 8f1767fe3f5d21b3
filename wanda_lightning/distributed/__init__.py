"""Models spread over processes or too large for memory: FSDP1/FSDP2 shard-local pruning (:mod:`.sharding`),
and meta-device models read block by block from safetensors (:mod:`.streaming`).

Torch-level helpers that know nothing of targets or statistics: this package imports nothing else from
wanda_lightning, and the engine (:mod:`wanda_lightning.core`) builds on it.
"""
