"""The callbacks report bad configuration the way Lightning does: the shared checks' ``ValueError`` and ``TypeError``
become ``MisconfigurationException`` with the same message.

Only around checks, which run before anything changes (arguments, the plan of an action, a checkpoint that does not
fit): a failure while acting (the user's forward, I/O, numerics) propagates as itself, with its traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["misconfiguration"]


@contextmanager
def misconfiguration() -> Iterator[None]:
    """Re-raises ``ValueError`` and ``TypeError`` from the ``with`` block as ``MisconfigurationException``.

    Example::

        >>> with misconfiguration():
        ...     raise ValueError("`sparsity` must be in [0, 1), got 1.2")
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: `sparsity` must be in [0, 1), got 1.2
    """
    try:
        yield
    except (ValueError, TypeError) as error:
        raise MisconfigurationException(str(error)) from None
