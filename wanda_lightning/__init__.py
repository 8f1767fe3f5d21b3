"""wanda-lightning: Wanda pruning for Hugging Face LLMs and any ``nn.Linear`` model, from PyTorch Lightning.

Example::

    from wanda_lightning import prune
    report = prune(model, calibration_batches, sparsity=0.5, structure="unstructured", method="wanda")
    print(report)
"""

from .allocation import OWL
from .callback import WandaPruningCallback
from .export import (
    CorruptExportError,
    ExportSummary,
    compress_state_dict,
    decompress_state_dict,
    load_pruned,
    save_pruned,
)
from .masks import keep_mask, n_m_keep_mask, unstructured_keep_mask, variant_keep_mask
from .methods import RIA, Magnitude, PruningMethod, SparseGPT, Wanda, available_methods, get_method, register_method
from .pruner import prune
from .refinement import DSnoT
from .report import LayerReport, PruningReport, SkippedLayer
from .statistics import GramStatistics, InputNormStatistics, LayerStatistics, MomentStatistics
from .structure import SparsityStructure, parse_structure
from .targets import TargetLayer, find_targets

__version__ = "0.1.0"

__all__ = [
    "OWL",
    "RIA",
    "CorruptExportError",
    "DSnoT",
    "ExportSummary",
    "GramStatistics",
    "InputNormStatistics",
    "LayerReport",
    "LayerStatistics",
    "Magnitude",
    "MomentStatistics",
    "PruningMethod",
    "PruningReport",
    "SkippedLayer",
    "SparseGPT",
    "SparsityStructure",
    "TargetLayer",
    "Wanda",
    "WandaPruningCallback",
    "__version__",
    "available_methods",
    "compress_state_dict",
    "decompress_state_dict",
    "find_targets",
    "get_method",
    "keep_mask",
    "load_pruned",
    "n_m_keep_mask",
    "parse_structure",
    "prune",
    "register_method",
    "save_pruned",
    "unstructured_keep_mask",
    "variant_keep_mask",
]
