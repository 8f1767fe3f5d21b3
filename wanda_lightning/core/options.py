"""How a model is calibrated, validated and documented once: :class:`CalibrationOptions`, shared by
:func:`~wanda_lightning.prune`, :func:`~wanda_lightning.shrink`, both Lightning callbacks and the CLI.

The functions also take each option as a keyword (``prune(model, batches, num_samples=64)``); they go through
:meth:`CalibrationOptions.resolve`, so a bad value is refused with the same message wherever it is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypedDict

import torch

from .batches import ForwardFn
from .validation import as_device, check_bool, check_positive

__all__ = ["CalibrationFields", "CalibrationOptions", "options_or_default"]


class CalibrationFields(TypedDict, total=False):
    """The fields of :class:`CalibrationOptions` as keyword arguments (for ``**options: Unpack[CalibrationFields]``)."""

    num_samples: int | None
    batch_size: int | None
    sequential: bool
    blocks: str | None
    device: str | torch.device | None
    offload_device: str | torch.device | None
    forward_fn: ForwardFn | None


@dataclass(frozen=True)
class CalibrationOptions:
    """How calibration runs: how many sequences, in which batches, block by block or in one pass, on which device.

    Frozen and checked when made: a bad value raises ``ValueError``/``TypeError`` naming the option, the value and
    what is allowed. In LightningCLI YAML it is a nested mapping (``calibration_options: {num_samples: 64}``).

    Args:
        num_samples: Most calibration sequences used (default 128, as the Wanda reference); ``None`` for all. In a
            Lightning run, the most over all processes (each of ``W`` DDP processes takes about ``num_samples / W``
            from its shard).
        batch_size: Sequences per calibration forward pass; ``None`` keeps the batches as they come.
        sequential: Block-sequential calibration when a stack of repeated blocks is found (the Wanda reference: each
            block's statistics come from the inputs the already-changed blocks before it produce); ``False`` for one
            forward pass over the whole model.
        blocks: Module name of the block stack (``"model.layers"``; ``"model.model.layers"`` inside a
            LightningModule); found automatically when ``None``.
        device: Compute device for blocks: a block living elsewhere is moved there while it is calibrated and moved
            back. ``None`` runs each block where it is.
        offload_device: Where captured block inputs wait between blocks (say ``"cpu"`` to save accelerator memory);
            ``None`` keeps them where they were computed.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one calibration batch, for models whose forward
            does not take the batch as is (default: ``model(**batch)`` for a mapping, ``model(batch[0])`` for a tuple
            or list, ``model(batch)`` for a tensor). In a callback ``model`` is the LightningModule.

    Example::

        >>> options = CalibrationOptions(num_samples=64, offload_device="cpu")
        >>> options.num_samples, options.offload_device
        (64, device(type='cpu'))
        >>> CalibrationOptions.resolve(options, batch_size=8).batch_size
        8
        >>> CalibrationOptions(num_samples=0)
        Traceback (most recent call last):
        ...
        ValueError: `num_samples` must be a positive integer or None, got 0
    """

    num_samples: int | None = 128
    batch_size: int | None = None
    sequential: bool = True
    blocks: str | None = None
    device: str | torch.device | None = None
    offload_device: str | torch.device | None = None
    forward_fn: ForwardFn | None = None

    def __post_init__(self) -> None:
        check_positive(self.num_samples, "num_samples")
        check_positive(self.batch_size, "batch_size")
        check_bool(self.sequential, "sequential")
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks):
            raise TypeError(f"`blocks` must be a module name such as 'model.layers' or None, got {self.blocks!r}")
        if self.forward_fn is not None and not callable(self.forward_fn):
            raise TypeError(
                f"`forward_fn` must be callable as forward_fn(model, batch), or None, got {self.forward_fn!r}"
            )
        # Frozen: normalise the devices once, so that every user of the options sees a torch.device.
        object.__setattr__(self, "device", as_device(self.device, "device"))
        object.__setattr__(self, "offload_device", as_device(self.offload_device, "offload_device"))

    @classmethod
    def resolve(cls, options: CalibrationOptions | None = None, **overrides: Any) -> CalibrationOptions:
        """``options`` (default: the defaults) with ``overrides`` replaced, checked.

        Raises:
            TypeError: For ``options`` that are not :class:`CalibrationOptions`, or an override that is no option.
            ValueError: For a bad value (naming it).
        """
        options = options_or_default(options, "calibration_options")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the calibration options are {sorted(known)}")
        return replace(options, **overrides) if overrides else options

    def with_batches_as_given(self) -> CalibrationOptions:
        """A copy that uses calibration batches as they come (no ``num_samples`` bound, no re-batching): for callers
        that prepared the batches themselves."""
        return replace(self, num_samples=None, batch_size=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (devices as strings; ``forward_fn`` left out).

        Example::

            >>> CalibrationOptions(device="cpu").to_dict()["device"]
            'cpu'
        """
        values = asdict(self)
        values.pop("forward_fn")
        for key in ("device", "offload_device"):
            values[key] = str(values[key]) if values[key] is not None else None
        return values


def options_or_default(options: CalibrationOptions | None, argument: str = "options") -> CalibrationOptions:
    """``options``, or the defaults for ``None``; anything else is refused naming ``argument``.

    Example::

        >>> options_or_default(None).num_samples
        128
        >>> options_or_default({"num_samples": 8})
        Traceback (most recent call last):
        ...
        TypeError: `options` must be a CalibrationOptions (or None), got dict
    """
    if options is None:
        return CalibrationOptions()
    if not isinstance(options, CalibrationOptions):
        raise TypeError(f"`{argument}` must be a CalibrationOptions (or None), got {type(options).__name__}")
    return options
