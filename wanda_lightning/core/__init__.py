"""The calibration engine: which layers (:mod:`.targets`, :mod:`.layers`), in which blocks (:mod:`.blocks`), fed
which batches (:mod:`.batches`), summarised how (:mod:`.statistics`, gathered by :mod:`.collector`), and the
:mod:`.pipeline` that runs blocks and hands their statistics to an action, through one run sequence (:mod:`.runner`).
Plus the pure pieces every action uses: sparsity patterns (:mod:`.structure`), mask selection (:mod:`.masks`),
argument checks (:mod:`.validation`), the sparsity and perplexity measures (:mod:`.measures`), a name registry
(:mod:`.registry`) and report layout (:mod:`.tables`).

What the layers above use of the engine without its internals (the Lightning callbacks, the command line) is exported
here: the options, finding layers and blocks, preparing batches, the measures and the argument checks.
"""

from .adapters import has_adapters
from .batches import default_forward, prepare_batches
from .blocks import BlockStack, find_block_stack
from .layers import find_pretrained, local_tensor
from .measures import (
    perplexity,
    perplexity_compute,
    perplexity_update,
    sparsity,
    sparsity_compute,
    sparsity_update,
)
from .options import CalibrationOptions
from .reconstruction import Reconstruction
from .targets import find_targets
from .validation import as_device, check_bool, check_directory, check_number, check_positive

__all__ = [
    "BlockStack",
    "CalibrationOptions",
    "Reconstruction",
    "as_device",
    "check_bool",
    "check_directory",
    "check_number",
    "check_positive",
    "default_forward",
    "find_block_stack",
    "find_pretrained",
    "find_targets",
    "has_adapters",
    "local_tensor",
    "perplexity",
    "perplexity_compute",
    "perplexity_update",
    "prepare_batches",
    "sparsity",
    "sparsity_compute",
    "sparsity_update",
]
