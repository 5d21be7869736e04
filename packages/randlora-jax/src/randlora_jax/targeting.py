"""Module selection for Flax NNX models (SPEC.md 2.3).

A module's name is its dotted path from the root: attribute names and ``nnx.List`` / ``nnx.Dict``
keys joined with ``.`` (``blocks.0.attn.q_proj``), the same names a PyTorch model of the same
structure has, so adapters carry over between frameworks. The rules are those of SPEC 2.3.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from flax import nnx

from randlora_spec.config import ALL_LINEAR, RandLoraConfig
from randlora_spec.errors import ConfigError, TargetModuleError

OUTPUT_HEAD = "lm_head"
LISTED = 10


def dotted(path: tuple[Any, ...]) -> str:
    """The dotted name of an NNX path (``('blocks', 0, 'q')`` -> ``blocks.0.q``)."""
    return ".".join(str(part) for part in path)


def modules(root: nnx.Module, opaque: Callable[[Any], bool]) -> Iterator[tuple[str, tuple[Any, ...], Any]]:
    """``(name, path, module)`` for every module below ``root``, not looking inside ``opaque`` ones."""
    hidden: list[tuple[Any, ...]] = []
    for path, module in sorted(nnx.iter_modules(root), key=lambda item: tuple(str(p) for p in item[0])):
        if not path or any(path[: len(h)] == h for h in hidden):
            continue
        if isinstance(module, (nnx.List, nnx.Dict)):
            continue  # containers have no identity of their own in a path: their children do
        if opaque(module):
            hidden.append(path)
        yield dotted(path), path, module


def matches(pattern: list[str] | str, name: str) -> bool:
    """A list matches a name equal to one entry or ending in ``.`` + entry; a string is a full-match regex."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith(f".{entry}") for entry in pattern)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in ``name`` (SPEC 2.3): the component after the first ``<pattern>``, or the first numeric one.

    Only components that are not the last one count (a layer index names a block, not a leaf).
    """
    inner = name.split(".")[:-1]
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or ())
    if not patterns:
        return next((int(part) for part in inner if part.isdecimal()), None)
    for pattern in patterns:
        words = pattern.split(".")
        for start in range(len(inner) - len(words)):
            after = inner[start + len(words)]
            if inner[start : start + len(words)] == words and after.isdecimal():
                return int(after)
    return None


def saved_or_inside(name: str, modules_to_save: list[str] | None) -> bool:
    """Whether ``name`` is a ``modules_to_save`` module or lies inside one."""
    parts = name.split(".")
    return any(
        parts[i : i + len(entry.split("."))] == entry.split(".")
        for entry in modules_to_save or ()
        for i in range(len(parts) - len(entry.split(".")) + 1)
    )


def select(
    root: nnx.Module, config: RandLoraConfig, adaptable: Callable[[Any], bool], opaque: Callable[[Any], bool]
) -> list[str]:
    """Dotted names of the modules ``config`` targets below ``root``; the model is not changed.

    Raises:
        ConfigError: ``target_modules`` unset, or an invalid regular expression.
        TargetModuleError: nothing matches, or a match is not a layer RandLoRA can adapt.

    """
    if config.target_modules is None:
        raise ConfigError("target_modules: must be set (names, a regex, or 'all-linear'); randlora-jax has no defaults")
    config.check_patterns()
    found = list(modules(root, opaque))
    target = config.target_modules
    what = f"target_modules={target!r}"
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        chosen = [(n, m) for n, _, m in found if adaptable(m) and n.split(".")[-1] != OUTPUT_HEAD]
    else:
        chosen = [(n, m) for n, _, m in found if matches(target, n)]
    chosen = [(n, m) for n, m in chosen if not saved_or_inside(n, config.modules_to_save)]
    if config.exclude_modules:
        chosen = [(n, m) for n, m in chosen if not matches(config.exclude_modules, n)]
        what += f" minus exclude_modules={config.exclude_modules!r}"
    wanted = config.layers_to_transform
    if wanted is not None and wanted != []:
        keep = {wanted} if isinstance(wanted, int) else set(wanted)
        chosen = [(n, m) for n, m in chosen if layer_index(n, config.layers_pattern) in keep]
        what += f" restricted to layers_to_transform={wanted!r}"
    if not chosen:
        names = [n for n, _, m in found if adaptable(m)] or [n for n, _, _ in found]
        shown = ", ".join(names[:LISTED]) + (", ..." if len(names) > LISTED else "")
        raise TargetModuleError(f"{what} matched no module of the model; adaptable modules include: [{shown}]")
    bad = [f"{n} ({type(m).__name__})" for n, m in chosen if not adaptable(m)]
    if bad:
        raise TargetModuleError(
            f"{what} matched modules that RandLoRA cannot adapt: {', '.join(bad[:LISTED])}"
            f"{', ...' if len(bad) > LISTED else ''}; supported are nnx.Linear and plain-linear nnx.Einsum"
        )
    return [n for n, _ in chosen]


def resolve(root: nnx.Module, path: str) -> tuple[Any, Any, Any]:
    """``(parent, key, module)`` for the dotted ``path`` below ``root``.

    Raises:
        KeyError: no module at ``path``.

    """
    node: Any = root
    parent: Any = None
    key: str | int | None = None
    for part in path.split("."):
        parent, key = node, part
        if isinstance(node, (nnx.List, list, tuple)) and part.isdigit() and int(part) < len(node):
            key = int(part)
            node = node[key]
        elif isinstance(node, (nnx.Dict, dict)) and part in node:
            node = node[part]
        elif not isinstance(node, (nnx.List, nnx.Dict)) and isinstance(node, nnx.Module) and hasattr(node, part):
            node = getattr(node, part)
        else:
            raise KeyError(path)
    return parent, key, node


def replace(root: nnx.Module, path: str, new: Any) -> None:
    """Put ``new`` at the dotted ``path`` below ``root`` (attribute, list index or dict key)."""
    parent, key, _ = resolve(root, path)
    if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
        parent[key] = new
    else:
        setattr(parent, key, new)
