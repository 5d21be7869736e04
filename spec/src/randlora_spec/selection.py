"""Module selection by name (SPEC.md 2.3): the rules every implementation applies to dotted names.

Frameworks differ in how they walk a model and which modules they can adapt; what a config's
``target_modules``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform`` and
``layers_pattern`` mean for a module's dotted name (``model.layers.3.q_proj``) is defined here once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeVar

from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import TargetModuleError

T = TypeVar("T")


def name_matches(patterns: list[str] | str, name: str) -> bool:
    """A list matches a name equal to one entry or ending in ``.`` + entry; a string is a full-match regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == t or name.endswith("." + t) for t in patterns)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index in ``name``: the component after the first ``<pattern>.``, or the first numeric one.

    Only components that are not the last one count (a layer index names a block, not a leaf).
    """
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        match = re.match(r"(?:^|.*?\.)(?P<idx>\d+)\.", name)
        return int(match["idx"]) if match else None
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){re.escape(pattern)}\.(?P<idx>\d+)\.", name)
        if match:
            return int(match["idx"])
    return None


def in_modules_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    """True for a module named by ``modules_to_save`` or nested inside one."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save or [])


def restrict(matched: Sequence[tuple[str, T]], config: RandLoraConfig) -> tuple[list[tuple[str, T]], str]:
    """Drop what ``modules_to_save``, ``exclude_modules`` and ``layers_to_transform`` rule out.

    ``matched`` pairs each name with whatever the caller keeps for it (a module). Returns the kept
    pairs and a description of the selection (``target_modules=... minus exclude_modules=...``)
    for error messages.
    """
    kept = [(n, m) for n, m in matched if not in_modules_to_save(n, config.modules_to_save)]
    described = f"target_modules={config.target_modules!r}"
    if config.exclude_modules:
        kept = [(n, m) for n, m in kept if not name_matches(config.exclude_modules, n)]
        described += f" minus exclude_modules={config.exclude_modules!r}"
    indices = config.layers_to_transform
    if indices is not None and indices != []:
        wanted = {indices} if isinstance(indices, int) else set(indices)
        kept = [(n, m) for n, m in kept if layer_index(n, config.layers_pattern) in wanted]
        described += f" restricted to layers_to_transform={indices!r}"
        if config.layers_pattern:
            described += f" with layers_pattern={config.layers_pattern!r}"
    return kept, described


def nothing_matched(described: str, candidates: Sequence[str], listed: int = 10) -> TargetModuleError:
    """The error for a selection that matched no module, naming up to ``listed`` candidates."""
    listing = ", ".join(candidates[:listed]) + (", ..." if len(candidates) > listed else "")
    return TargetModuleError(f"{described} matched no module of the model; adaptable modules include: [{listing}]")
