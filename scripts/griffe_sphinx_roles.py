"""A griffe extension for the docs site: the Sphinx roles of the package's docstrings become mkdocs cross-references.

The docstrings are written for Sphinx and doctest (``:class:`~.pipeline.CalibrationPipeline```, ``:func:`prune```,
``:mod:`~wanda_lightning.core```). mkdocstrings renders Markdown, where those roles would show as raw text. This
extension, loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``), rewrites each role
into an autorefs link, ``[`CalibrationPipeline`][wanda_lightning.core.pipeline.CalibrationPipeline]``, after
resolving the target the way Sphinx does: a leading dot searches from the docstring's module outwards, a bare name
is looked up in the docstring's class, its module, the packages above it and finally the top-level package. A ``~``
shows only the last part of the name; functions and methods get ``()``.

Targets outside this package (``torch.nn.Linear``, ``lightning.pytorch.Trainer``) become plain code: the site has no
inventory of other projects to link to. A target that names this package but resolves to nothing is kept as a link
to the path as written, so that autorefs reports it and ``mkdocs build --strict`` fails: a broken reference in a
docstring breaks the build, as it would in Sphinx with ``nitpicky``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")
_CALLABLE_ROLES = {"func", "meth"}
_PACKAGE = "wanda_lightning"


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`target``` in every docstring of the loaded package into an autorefs cross-reference."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != _PACKAGE:
            return
        for obj in _walk(pkg):
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = _ROLE.sub(lambda match, obj=obj: _link(match, obj, pkg), obj.docstring.value)


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    """``obj`` and every object defined under it (aliases, i.e. re-exports, are documented where they are defined)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_walk(member))  # type: ignore[arg-type]
    return found


def _link(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module) -> str:
    role, short, target = match.group(1), match.group(2) == "~", match.group(3).strip()
    shown = target.lstrip(".").rsplit(".", 1)[-1] if short else target.lstrip(".")
    if role in _CALLABLE_ROLES:
        shown += "()"
    path = _resolve(target, obj, pkg)
    if path is not None and path.split(".")[0] != _PACKAGE:
        return f"`{shown}`"  # resolved to another project's object, imported here
    if path is None:
        if target.startswith(".") or target.split(".")[0] == _PACKAGE:
            return f"[`{shown}`][{target.lstrip('.')}]"  # unresolved: autorefs reports it, --strict fails
        if "." in target:
            return f"`{shown}`"  # another project's object: no inventory to link to
        return f"[`{shown}`][{target}]"  # a bare name that is nowhere: reported as well
    return f"[`{shown}`][{path}]"


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The full path of ``target`` as seen from ``obj``'s docstring, or ``None`` when nothing of that name exists."""
    name = target.lstrip(".")
    if target.split(".")[0] == _PACKAGE:
        return _canonical(pkg, target)
    scopes: list[griffe.Object] = []
    scope: griffe.Object | None = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:
        scopes.append(scope)
        scope = scope.parent
    for scope in scopes:
        found = _canonical(pkg, f"{scope.path}.{name}")
        if found is not None:
            return found
    return None


def _canonical(pkg: griffe.Module, path: str) -> str | None:
    """Where the object at ``path`` is defined (autorefs anchors objects there), or ``None`` when there is none.

    A name imported from another project (``ast`` in a module that imports it) comes back as that project's path.
    """
    if path == pkg.path:
        return path
    try:
        found = pkg[path.removeprefix(f"{pkg.path}.")]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    try:
        return found.canonical_path  # type: ignore[no-any-return]
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return found.target_path  # type: ignore[no-any-return]  # an import from a project griffe did not load
