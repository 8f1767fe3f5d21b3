"""wanda-lightning: Wanda pruning for Hugging Face LLMs and any ``nn.Linear`` model, from PyTorch Lightning.

Example::

    from wanda_lightning import prune
    report = prune(model, calibration_batches, sparsity=0.5, structure="unstructured", method="wanda")
    print(report)
"""

from .masks import keep_mask, n_m_keep_mask, unstructured_keep_mask, variant_keep_mask
from .methods import Magnitude, PruningMethod, Wanda, available_methods, get_method, register_method
from .pruner import prune
from .report import LayerReport, PruningReport, SkippedLayer
from .statistics import InputNormStatistics, LayerStatistics
from .structure import SparsityStructure, parse_structure
from .targets import TargetLayer, find_targets

__version__ = "0.1.0"

__all__ = [
    "InputNormStatistics",
    "LayerReport",
    "LayerStatistics",
    "Magnitude",
    "PruningMethod",
    "PruningReport",
    "SkippedLayer",
    "SparsityStructure",
    "TargetLayer",
    "Wanda",
    "__version__",
    "available_methods",
    "find_targets",
    "get_method",
    "keep_mask",
    "n_m_keep_mask",
    "parse_structure",
    "prune",
    "register_method",
    "unstructured_keep_mask",
    "variant_keep_mask",
]
