"""Lightning integration: two callbacks on one base, :class:`CalibratedCallback` (:mod:`.calibrated_callback`), which
owns the hooks and the state — :class:`WandaPruningCallback` (:mod:`.pruning_callback`: masks) and
:class:`WandaShrinkCallback` (:mod:`.shrinking_callback`: whole units removed) say only what their action is. The
parts the base orchestrates, one concern each: when to act (:mod:`.triggers`), calibration batches and forward
(:mod:`.calibration`), metrics before and after (:mod:`.evaluation`), recovery by distillation (:mod:`.distillation`),
strategies (:mod:`.strategies`), logging and the summary (:mod:`.summary`), progress bars (:mod:`.progress`); and the
actions' own: keeping masks through training (:mod:`.masks`), ``prune_on="checkpoint"`` (:mod:`.checkpointing`),
``export_dir`` (:mod:`.exporting`), checkpoints of shrunk models (:mod:`.shrunk_checkpoints`). Plus torchmetrics
metrics (:mod:`.metrics`) and the demo's :class:`CausalLMModule` (:mod:`.module`)."""

from .calibrated_callback import CalibratedCallback
from .distillation import Distillation, Distiller, distillation_loss
from .metrics import Perplexity, Sparsity
from .module import CausalLMModule
from .pruning_callback import WandaPruningCallback
from .shrinking_callback import WandaShrinkCallback
from .shrunk_checkpoints import load_shrunk_checkpoint
from .triggers import AfterEpoch, AfterStep, AtCheckpoints, AtFitEnd, AtFitStart, OnValidate, Schedule, Trigger

__all__ = [
    "AfterEpoch",
    "AfterStep",
    "AtCheckpoints",
    "AtFitEnd",
    "AtFitStart",
    "CalibratedCallback",
    "CausalLMModule",
    "Distillation",
    "Distiller",
    "OnValidate",
    "Perplexity",
    "Schedule",
    "Sparsity",
    "Trigger",
    "WandaPruningCallback",
    "WandaShrinkCallback",
    "distillation_loss",
    "load_shrunk_checkpoint",
]
