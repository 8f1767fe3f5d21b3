"""wanda-lightning: Wanda pruning for Hugging Face LLMs and any ``nn.Linear`` model, from PyTorch Lightning.

The package is laid out by what each part does, each layer importing only the ones listed before it:

- :mod:`~wanda_lightning.distributed`: sharded (FSDP) and larger-than-memory models;
- :mod:`~wanda_lightning.core`: the calibration engine (options, targets, blocks, batches, statistics, the pipeline);
- :mod:`~wanda_lightning.methods`: mask methods, allocations and refinements, one module each;
- :mod:`~wanda_lightning.pruning`: :func:`prune`, the mask action and its report;
- :mod:`~wanda_lightning.depth`: depth pruning, the blocks :func:`shrink` removes with ``layers=``;
- :mod:`~wanda_lightning.width`: :func:`shrink`, width pruning (whole units and heads), the speed target and the report;
- :mod:`~wanda_lightning.export`: the compact export format and the 2:4 runtime;
- :mod:`~wanda_lightning.lightning`: the two callbacks on their common base, their parts and torchmetrics metrics;
- :mod:`~wanda_lightning.data`: the bundled model, corpus and evaluation;
- :mod:`~wanda_lightning.cli`: the ``wanda-lightning`` command line.

Example::

    from wanda_lightning import prune
    report = prune(model, calibration_batches, sparsity=0.5, structure="unstructured", method="wanda")
    print(report)
"""

from .core.masks import keep_mask, n_m_keep_mask, unstructured_keep_mask, variant_keep_mask
from .core.options import CalibrationOptions
from .core.reconstruction import Reconstruction
from .core.statistics import GramStatistics, InputNormStatistics, LayerStatistics, MomentStatistics
from .core.structure import SparsityStructure, parse_structure
from .core.target_layer import TargetLayer
from .core.targets import find_targets
from .distributed.streaming import BlockSaver
from .export import (
    CorruptExportError,
    ExportSummary,
    compress_state_dict,
    decompress_state_dict,
    load_pruned,
    merge_adapters,
    save_pruned,
    to_semi_structured,
)
from .gguf import GGUFExport, GGUFSummary, save_gguf
from .lightning import (
    AfterEpoch,
    AfterStep,
    CalibratedCallback,
    CausalLMModule,
    Distillation,
    Distiller,
    Perplexity,
    Schedule,
    Sparsity,
    Trigger,
    WandaPruningCallback,
    WandaShrinkCallback,
    load_shrunk_checkpoint,
)
from .methods import (
    ADMM,
    OWL,
    RIA,
    ADMMUpdate,
    DSnoT,
    Magnitude,
    PruningMethod,
    PruningWarning,
    Refinement,
    SparseGPT,
    Wanda,
    available_methods,
    get_method,
    register_method,
)
from .pruning import LayerReport, PruneConfig, PruneResult, PruningReport, SkippedLayer, prune, prune_with
from .width import FLAP, MagnitudeSP, ShrinkConfig, ShrinkReport, SpeedTarget, WandaSP, WidthMethod, shrink
from .width.saving import save_plain_pretrained

__version__ = "0.2.0"

__all__ = [
    "ADMM",
    "FLAP",
    "OWL",
    "RIA",
    "ADMMUpdate",
    "AfterEpoch",
    "AfterStep",
    "BlockSaver",
    "CalibratedCallback",
    "CalibrationOptions",
    "CausalLMModule",
    "CorruptExportError",
    "DSnoT",
    "Distillation",
    "Distiller",
    "ExportSummary",
    "GGUFExport",
    "GGUFSummary",
    "GramStatistics",
    "InputNormStatistics",
    "LayerReport",
    "LayerStatistics",
    "Magnitude",
    "MagnitudeSP",
    "MomentStatistics",
    "Perplexity",
    "PruneConfig",
    "PruneResult",
    "PruningMethod",
    "PruningReport",
    "PruningWarning",
    "Reconstruction",
    "Refinement",
    "Schedule",
    "ShrinkConfig",
    "ShrinkReport",
    "SkippedLayer",
    "SparseGPT",
    "Sparsity",
    "SparsityStructure",
    "SpeedTarget",
    "TargetLayer",
    "Trigger",
    "Wanda",
    "WandaPruningCallback",
    "WandaSP",
    "WandaShrinkCallback",
    "WidthMethod",
    "__version__",
    "available_methods",
    "compress_state_dict",
    "decompress_state_dict",
    "find_targets",
    "get_method",
    "keep_mask",
    "load_pruned",
    "load_shrunk_checkpoint",
    "merge_adapters",
    "n_m_keep_mask",
    "parse_structure",
    "prune",
    "prune_with",
    "register_method",
    "save_gguf",
    "save_plain_pretrained",
    "save_pruned",
    "shrink",
    "to_semi_structured",
    "unstructured_keep_mask",
    "variant_keep_mask",
]
