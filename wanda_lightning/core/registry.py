"""A name -> factory registry, the one shape behind mask methods (:mod:`wanda_lightning.methods.registry`) and width
methods (:mod:`wanda_lightning.width.methods`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Factories of ``kind`` by lower-case name; :meth:`get` resolves a name or passes an instance through.

    Args:
        kind: The class every factory returns; instances of it pass through :meth:`get`.
        argument: The argument the value comes from, named in error messages (``"method"``).
        noun: What a name names, in error messages (``"method"``, ``"width method"``).

    Example::

        >>> registry = Registry(float, "scale", "scale")
        >>> registry.register("Half", lambda: 0.5)
        >>> registry.get("half"), registry.get(2.0), registry.available()
        (0.5, 2.0, ['half'])
        >>> registry.get("double")
        Traceback (most recent call last):
        ...
        ValueError: `scale` must be one of ['half'], got 'double'
    """

    # ``kind`` is a plain ``type``: the registered kinds are abstract base classes, which ``type[T]`` refuses.
    def __init__(self, kind: type, argument: str, noun: str) -> None:
        self.kind = kind
        self.argument = argument
        self.noun = noun
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T]) -> None:
        """Makes ``name`` (case-insensitive) resolve to ``factory(**options)``, replacing any earlier factory."""
        self._factories[name.lower()] = factory

    def available(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._factories)

    def get(self, value: str | T, **options: Any) -> T:
        """Resolves a registered name (with options for its factory) or passes an instance of ``kind`` through.

        Raises:
            ValueError: For an unknown name (the message lists the known ones), or options given with an instance.
            TypeError: For anything that is neither a string nor an instance of ``kind``.
        """
        if isinstance(value, self.kind):
            if options:
                raise ValueError(
                    f"{self.argument} options {sorted(options)} given with a {self.noun} instance {value!r}"
                )
            return cast(T, value)
        if not isinstance(value, str):
            raise TypeError(f"`{self.argument}` must be a {self.noun} name or a {self.kind.__name__}, got {value!r}")
        factory = self._factories.get(value.lower())
        if factory is None:
            raise ValueError(f"`{self.argument}` must be one of {self.available()}, got {value!r}")
        return factory(**options)
