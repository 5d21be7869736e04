"""Griffe extension for the API reference: the packages documented as Python sees them at run time.

* reStructuredText roles in docstrings become code spans. The docstrings write cross-references as
  ``:func:`name``` (read as they are by help() and IDEs); Markdown has no roles, so the site would
  show the role name. ``~a.b.C`` keeps only ``C``, as Sphinx does.
* A name a package exports in ``__all__`` that is also one of its submodules (``randlora_peft``
  exports the function ``accelerate`` from its module ``accelerate``) documents the exported object:
  at run time the import rebinds the name, but griffe keeps the submodule, which hides the function.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`(~?)([\w.]+)(?:\(\))?`")


def _as_code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class RuntimeView(griffe.Extension):
    """Rewrites the roles of every docstring, and re-points exported names shadowed by a submodule."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Replace each role in ``obj``'s docstring by a plain code span."""
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_as_code, obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Bind each exported name that griffe resolved to a same-named submodule to that submodule's object."""
        for name in map(str, pkg.exports or ()):
            member = pkg.members.get(name)
            if member is None or not member.is_module:
                continue
            exported = member.members.get(name)
            if exported is not None and not exported.is_module:
                pkg.set_member(name, griffe.Alias(name, exported, parent=pkg))
