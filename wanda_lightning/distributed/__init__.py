"""Models spread over processes or too large for memory: FSDP1/FSDP2 shard-local pruning (:mod:`.sharding`),
and meta-device models read block by block from safetensors (:mod:`.streaming`).

Torch-level helpers that know nothing of targets or statistics: this package imports nothing else from
wanda_lightning, and the engine (:mod:`wanda_lightning.core`) builds on it. What the Lightning callbacks use is
exported here.
"""

from .readback import kept_from_nonzeros
from .sharding import holds_shards, is_fsdp1, same_count_on_every_rank

__all__ = ["holds_shards", "is_fsdp1", "kept_from_nonzeros", "same_count_on_every_rank"]
