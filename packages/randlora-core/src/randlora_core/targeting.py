"""Which modules of a model an adapter targets (PEFT's selection rules).

Forms of ``target_modules``:

- a list of names: a module matches a name ``t`` when its full dotted name equals ``t`` or ends
  with ``"." + t``;
- a string: a regular expression that must match the full module name (``re.fullmatch``);
- ``"all-linear"`` (any case): every adaptable module of kind ``linear`` (not convolutions or
  embeddings) except the output head, which is the model's output embedding if it has
  ``get_output_embeddings()``, else any module named ``lm_head``.

``exclude_modules`` removes modules with the same forms (list or regex). Modules named by
``modules_to_save`` and everything inside them are never targets. ``layers_to_transform`` keeps
modules whose layer index is listed; the index is the number after the first ``<pattern>.``
component (``layers_pattern``), or, without a pattern, the first all-digit component that is not
the last one (``model.layers.3.q_proj`` -> 3). Unlike PEFT, ``layers_to_transform`` also applies
to regex and ``all-linear`` targets instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from randlora_spec.config import ALL_LINEAR, RandLoraConfig
from randlora_spec.errors import ConfigError, TargetModuleError
from randlora_spec.selection import name_matches, nothing_matched, restrict

MAX_LISTED = 10


def visible_modules(model: nn.Module, opaque: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """Named modules of ``model`` (root excluded), not descending into modules for which ``opaque`` holds."""
    out: list[tuple[str, nn.Module]] = []
    hidden: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(h + ".") for h in hidden):
            continue
        out.append((name, module))
        if opaque(module):
            hidden.append(name)
    return out


def output_head_names(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> set[str]:
    """Names of the output head(s) that ``all-linear`` leaves out."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if isinstance(head, nn.Module):
            return {name for name, module in modules if module is head}
    return {name for name, _ in modules if name == "lm_head" or name.endswith(".lm_head")}


def select_targets(
    model: nn.Module,
    config: RandLoraConfig,
    adaptable: Callable[[nn.Module], bool],
    opaque: Callable[[nn.Module], bool],
    linear: Callable[[nn.Module], bool] | None = None,
) -> list[str]:
    """Names of the modules ``config`` targets in ``model``, in model order; validates without modifying.

    ``linear`` picks the modules ``all-linear`` may select (default: every adaptable one).

    Raises:
        ConfigError: ``target_modules`` is not set (planning resolves ``None`` to the model's
            defaults first, :mod:`randlora_core.defaults`), or a
            ``target_modules`` / ``exclude_modules`` string is not a valid regular expression.
        TargetModuleError: nothing matches, or a match cannot be adapted (the message lists names).

    """
    targets = config.target_modules
    if targets is None:
        raise ConfigError(
            "target_modules: must be set (names, a regex, or 'all-linear'); resolve None with randlora_core.defaults first"
        )
    config.check_patterns()
    modules = visible_modules(model, opaque)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model, modules)
        is_linear = linear or adaptable
        matched = [(n, m) for n, m in modules if adaptable(m) and is_linear(m) and n not in heads]
    else:
        matched = [(n, m) for n, m in modules if name_matches(targets, n)]
    matched, described = restrict(matched, config)
    if not matched:
        raise nothing_matched(described, [n for n, m in modules if adaptable(m)] or [n for n, _ in modules], MAX_LISTED)
    unadaptable = [(n, m) for n, m in matched if not adaptable(m)]
    if unadaptable:
        listing = ", ".join(f"{n} ({type(m).__name__})" for n, m in unadaptable[:MAX_LISTED])
        more = ", ..." if len(unadaptable) > MAX_LISTED else ""
        raise TargetModuleError(
            f"{described} matched modules that RandLoRA cannot adapt: {listing}{more}; "
            "supported are nn.Linear, Conv1D-like layers, nn.Conv1d/2d/3d, nn.Embedding and types registered with "
            "register_layer_wrapper"
        )
    return [n for n, _ in matched]
