"""Patching a method of the user's module for a while, and undoing it exactly.

The callbacks wrap a few methods of the LightningModule they act on (``training_step`` while distilling,
``on_save_checkpoint`` for weights-only checkpoints, ``on_load_checkpoint`` to resize a shrunk module, ``log`` while
their own validation passes run). Each goes through :func:`patch_method`, which sets an instance attribute in front
of the class's method and returns the function that takes it away again.

Patches of the same method stack: the newest runs first and calls the one beneath it (the class's method at the
bottom, or what the instance itself held before the first patch). Undone in any order, each takes only itself away,
and once none is left the instance's ``__dict__`` is as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

__all__ = ["patch_method", "patched", "remove_patches"]

#: Where a patched method's dispatcher keeps its :class:`_PatchStack`.
_STACK_ATTRIBUTE = "_wanda_patch_stack"


class _Patch:
    """One patch: the wrapper, called as ``wrapper(original, *args, **kwargs)``, and an optional label."""

    __slots__ = ("label", "wrapper")

    def __init__(self, wrapper: Callable[..., Any], label: str | None) -> None:
        self.wrapper = wrapper
        self.label = label


class _PatchStack:
    """The patches of one attribute of one object, oldest first, behind one dispatcher in the instance's ``__dict__``.

    Args:
        owner: The patched object.
        name: The attribute.
    """

    def __init__(self, owner: Any, name: str) -> None:
        self.owner = owner
        self.name = name
        self.had_own = name in vars(owner)  # an instance attribute was there before the first patch
        self.own = vars(owner).get(name)
        self.patches: list[_Patch] = []

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            return self._call(tuple(self.patches), *args, **kwargs)

        with suppress(AttributeError):  # nothing beneath (a new attribute): the dispatcher keeps its own
            functools.update_wrapper(dispatch, self._bottom())  # name, docstring and signature of the method
        vars(dispatch)[_STACK_ATTRIBUTE] = self
        self.dispatch = dispatch

    def _bottom(self) -> Any:
        """What the attribute is without any patch: the instance's own value, else the class's, bound to the
        instance (looked up at call time, as ``getattr`` would)."""
        if self.had_own:
            return self.own
        cls = type(self.owner)
        for klass in cls.__mro__:
            if self.name in vars(klass):
                attribute = vars(klass)[self.name]
                get = getattr(type(attribute), "__get__", None)
                return get(attribute, self.owner, cls) if get is not None else attribute
        raise AttributeError(f"{cls.__name__!r} object has no attribute {self.name!r}")

    def _call(self, patches: tuple[_Patch, ...], *args: Any, **kwargs: Any) -> Any:
        if not patches:
            return self._bottom()(*args, **kwargs)
        *beneath, top = patches
        return top.wrapper(functools.partial(self._call, tuple(beneath)), *args, **kwargs)

    def remove(self, patch: _Patch) -> None:
        """Takes ``patch`` away (nothing if it is gone already); the last one puts the instance back as it was,
        unless something else replaced the dispatcher since (then that stays, and calls through)."""
        if not any(found is patch for found in self.patches):
            return
        self.patches = [found for found in self.patches if found is not patch]
        if self.patches or vars(self.owner).get(self.name) is not self.dispatch:
            return
        if self.had_own:
            vars(self.owner)[self.name] = self.own
        else:
            del vars(self.owner)[self.name]


def _stack_of(owner: Any, name: str) -> _PatchStack | None:
    stack = getattr(vars(owner).get(name), _STACK_ATTRIBUTE, None)
    return stack if isinstance(stack, _PatchStack) else None


def patch_method(owner: Any, name: str, wrapper: Callable[..., Any], *, label: str | None = None) -> Callable[[], None]:
    """Makes ``owner.<name>(*args, **kwargs)`` call ``wrapper(original, *args, **kwargs)``, where ``original`` is
    what ``owner.<name>`` was beneath this patch (at call time); returns the function that undoes exactly this patch.

    The patch is an instance attribute: the class and other instances are untouched. Patches of the same method
    stack, newest first, and can be undone in any order; undoing one twice does nothing.

    Args:
        owner: The object whose method is patched (a LightningModule, say).
        name: The method's name.
        wrapper: Called as ``wrapper(original, *args, **kwargs)``; it may call ``original`` or not.
        label: Names the patch for :func:`remove_patches`.

    Returns:
        The undo: ``undo()`` takes this patch away.

    Example::

        >>> class Greeter:
        ...     def greet(self, name):
        ...         return f"hello {name}"
        >>> greeter = Greeter()
        >>> undo = patch_method(greeter, "greet", lambda original, name: original(name).upper())
        >>> greeter.greet("you")
        'HELLO YOU'
        >>> undo()
        >>> greeter.greet("you"), vars(greeter)
        ('hello you', {})
    """
    if not callable(wrapper):
        raise TypeError(f"`wrapper` must be callable, got {type(wrapper).__name__}")
    stack = _stack_of(owner, name)
    if stack is None:
        stack = _PatchStack(owner, name)
        vars(owner)[name] = stack.dispatch
    patch = _Patch(wrapper, label)
    stack.patches.append(patch)
    return functools.partial(stack.remove, patch)


@contextmanager
def patched(owner: Any, name: str, wrapper: Callable[..., Any], *, label: str | None = None) -> Iterator[None]:
    """:func:`patch_method` for the ``with`` block.

    Example::

        >>> class Counter:
        ...     def step(self):
        ...         return 1
        >>> counter = Counter()
        >>> with patched(counter, "step", lambda original: original() + 1):
        ...     counter.step()
        2
        >>> counter.step()
        1
    """
    undo = patch_method(owner, name, wrapper, label=label)
    try:
        yield
    finally:
        undo()


def remove_patches(owner: Any, name: str, label: str) -> int:
    """Undoes every patch of ``owner.<name>`` made with ``label``; returns how many there were.

    Example::

        >>> class Greeter:
        ...     def greet(self):
        ...         return "hello"
        >>> greeter = Greeter()
        >>> _ = patch_method(greeter, "greet", lambda original: "hi", label="short")
        >>> remove_patches(greeter, "greet", "short"), greeter.greet()
        (1, 'hello')
    """
    stack = _stack_of(owner, name)
    if stack is None:
        return 0
    found = [patch for patch in stack.patches if patch.label == label]
    for patch in found:
        stack.remove(patch)
    return len(found)
