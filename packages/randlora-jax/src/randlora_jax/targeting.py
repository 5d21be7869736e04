"""Module selection for Flax NNX models (SPEC.md 2.3).

A module's name is its dotted path from the root: attribute names and ``nnx.List`` / ``nnx.Dict``
keys joined with ``.`` (``blocks.0.attn.q_proj``), the same names a PyTorch model of the same
structure has, so adapters carry over between frameworks. The rules are those of SPEC 2.3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flax import nnx

from randlora_spec.config import ALL_LINEAR, RandLoraConfig
from randlora_spec.errors import ConfigError, TargetModuleError
from randlora_spec.selection import name_matches, nothing_matched, restrict

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
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        chosen = [(n, m) for n, _, m in found if adaptable(m) and n.split(".")[-1] != OUTPUT_HEAD]
    else:
        chosen = [(n, m) for n, _, m in found if name_matches(target, n)]
    chosen, what = restrict(chosen, config)
    if not chosen:
        raise nothing_matched(what, [n for n, _, m in found if adaptable(m)] or [n for n, _, _ in found], LISTED)
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
