"""Lightning integration: :class:`WandaPruningCallback` (:mod:`.callback`) and its parts, one concern each —
when to act (:mod:`.triggers`), calibration batches and forward (:mod:`.calibration`), dense/pruned metrics
(:mod:`.evaluation`), keeping masks through training (:mod:`.masks`), ``prune_on="checkpoint"``
(:mod:`.checkpointing`), ``export_dir`` (:mod:`.exporting`), strategies (:mod:`.strategies`), logging and the summary
(:mod:`.summary`), progress bars (:mod:`.progress`) — plus torchmetrics metrics (:mod:`.metrics`) and the demo's
:class:`CausalLMModule` (:mod:`.module`)."""

from .callback import WandaPruningCallback
from .distillation import Distiller, distillation_loss
from .metrics import Perplexity, Sparsity
from .module import CausalLMModule
from .shrink_callback import WandaShrinkCallback
from .shrinking import load_shrunk_checkpoint

__all__ = [
    "CausalLMModule",
    "Distiller",
    "Perplexity",
    "Sparsity",
    "WandaPruningCallback",
    "WandaShrinkCallback",
    "distillation_loss",
    "load_shrunk_checkpoint",
]
