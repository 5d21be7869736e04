"""Validate, then mutate: everything adding an adapter will change, computed without changing anything.

:func:`plan_adapter` checks a new adapter against a :class:`~randlora_core.model.RandLoraModel`
(name, shared config fields, targets, ``modules_to_save``, the shared bases) and returns an
:class:`AdapterPlan`: the wrappers to insert (built, not inserted), the ``modules_to_save`` paths
and the shared bases to install. The model commits a plan in one step
(``RandLoraModel._commit``), so an adapter that cannot be added leaves the model as it was.

Shared bases (SPEC 3.9): one pair per model, sized for every adapter on it. A new adapter that
needs a larger allocation regenerates the bases at the larger size, which under the portable rule
leaves every existing window bit-identical (the slice property). That is impossible, and raises
:class:`ShapeError`, when the bases were injected or loaded from a file without provenance
(``regenerable`` false), or for ``very_sparse`` bases whose ``m_max`` would change.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import nn

from randlora_core.bases import generate_bases
from randlora_core.defaults import with_default_targets
from randlora_core.modules_to_save import ModulesToSaveWrapper
from randlora_core.registry import build_wrapper, is_linear_target, is_randlora_layer, layout_of, load_plugins, wrapper_for
from randlora_core.targeting import select_targets, visible_modules
from randlora_spec.bases import PORTABLE_RULE, basis_kind
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError, ConfigError, ShapeError, TargetModuleError
from randlora_spec.geometry import RANK_CEILING, BasesShape, LayerGeometry, allocation, rank_is_bounded, shape_of_bases
from randlora_spec.selection import name_matches

if TYPE_CHECKING:
    from randlora_core.bases import RandLoraBases
    from randlora_core.model import RandLoraModel
    from randlora_core.registry import LayerModule
    from randlora_spec.bases import BasisKind

SHARED_CONFIG_FIELDS = ("projection_prng_key", "save_projection", "sparse", "very_sparse", "basis_rule")
"""Config fields every adapter on one model must agree on (one shared pair of bases, SPEC 3.9)."""

Bases = tuple[torch.Tensor, torch.Tensor]


@dataclass
class AdapterPlan:
    """What adding one adapter changes, fully validated.

    Attributes:
        name: the adapter's name.
        config: its config.
        layers: ``(path, wrapper, is_new)`` per target; new wrappers are built but not inserted.
        saved: paths of its ``modules_to_save`` modules.
        bases: the shared pair to install ``(A, B, regenerable)``, or ``None`` to keep the model's.
        device: where new bases go (the first target's weight device).
        autocast_adapter_dtype: lambda/gamma of float16/bfloat16 layers are float32 (PEFT's default).
        low_cpu_mem_usage: lambda/gamma are created empty on the meta device (a load fills them).

    """

    name: str
    config: RandLoraConfig
    layers: list[tuple[str, LayerModule, bool]]
    saved: list[str]
    bases: tuple[torch.Tensor, torch.Tensor, bool] | None
    device: torch.device
    autocast_adapter_dtype: bool = True
    low_cpu_mem_usage: bool = False


def opaque(module: nn.Module) -> bool:
    """Modules whose insides targeting does not look into: RandLoRA layers and ``modules_to_save`` wrappers."""
    return is_randlora_layer(module) or isinstance(module, ModulesToSaveWrapper)


def adaptable(module: nn.Module) -> bool:
    """Modules a wrapper exists for (or that already are RandLoRA layers)."""
    return is_randlora_layer(module) or wrapper_for(module) is not None


def check_unadapted(module: nn.Module) -> None:
    """Refuse a module that already holds RandLoRA layers outside a :class:`RandLoraModel` given to us.

    That is the inner model of a live RandLoraModel (``rl.get_base_model()``) or PeftModel: adapting
    it again would repoint the live model's layers at new bases and freeze its parameters behind
    its back.
    """
    for name, sub in module.named_modules():
        if is_randlora_layer(sub) or isinstance(sub, ModulesToSaveWrapper):
            kind = "a RandLoRA layer" if is_randlora_layer(sub) else "a modules_to_save wrapper"
            raise ConfigError(
                f"the model already holds {kind} at {name or '<root>'!r}: it is (inside) an adapted model; add or load "
                "adapters through the RandLoraModel that owns it, or unload() that first"
            )


def check_path(root: nn.Module, path: str) -> str | None:
    """The first proper prefix of ``path`` that is a RandLoRA or ``modules_to_save`` wrapper, else ``None``.

    Paths are addressed as in the base model; one that runs through a wrapper (``q.base_layer``,
    ``head.modules_to_save.default``) names a wrapper's internals.
    """
    parts = path.split(".")
    module = root
    for i, part in enumerate(parts[:-1]):
        child = module._modules.get(part)
        if child is None:
            return None
        if opaque(child):
            return ".".join(parts[: i + 1])
        module = child
    return None


def windows_fit(shape: BasesShape, dims: list[tuple[int, int]], ranks: list[int]) -> bool:
    """Whether every layer's window, for every rank, lies inside an allocation ``shape``."""
    return all(shape.holds(LayerGeometry(i, o, r)) for i, o in dims for r in ranks)


def same_on_overlap(x: Bases, y: Bases) -> bool:
    """Whether two base pairs hold identical values on their common window."""
    for p, q in zip(x, y, strict=True):
        window = tuple(slice(0, min(a, b)) for a, b in zip(p.shape, q.shape, strict=True))
        if not torch.equal(p[window].to(q.device, torch.float32), q[window].to(torch.float32)):
            return False
    return True


def check_new(model: RandLoraModel, name: str, config: RandLoraConfig) -> None:
    """The name is free, the config agrees with the other adapters on the shared fields, at most one trains biases.

    Biases are the base layers' own parameters, shared by every adapter: two adapters training them
    would each change the other's output and saved file (PEFT refuses the same).
    """
    if not isinstance(config, RandLoraConfig):
        raise ConfigError(f"config must be a randlora RandLoraConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter name must be a non-empty string without '.', got {name!r}")
    if name in model.peft_config:
        raise ConfigError(f"an adapter named {name!r} already exists; delete it first or pick another name")
    for other_name, other in model.peft_config.items():
        for field in SHARED_CONFIG_FIELDS:
            if getattr(other, field) != getattr(config, field):
                raise ConfigError(
                    f"{field}: all adapters on one model share the bases and must agree on {field}; "
                    f"adapter {other_name!r} has {getattr(other, field)!r}, the new one {getattr(config, field)!r}"
                )
    with_bias = [(n, c.bias) for n, c in model.peft_config.items() if c.bias != "none"]
    if config.bias != "none" and with_bias:
        raise ConfigError(
            f"bias: only one adapter per model may train biases (they are the base layers' own, shared by all "
            f"adapters); adapter {with_bias[0][0]!r} has bias={with_bias[0][1]!r}, so the new one needs bias='none'"
        )


def resolve_saved(root: nn.Module, config: RandLoraConfig) -> list[str]:
    """Paths of the modules ``config.modules_to_save`` names (every name must match one)."""
    names = config.modules_to_save or []
    modules = visible_modules(root, opaque)
    found = [n for n, m in modules if name_matches(names, n) and not is_randlora_layer(m)] if names else []
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        raise ConfigError(f"modules_to_save: {missing} match no module of the model (or only RandLoRA layers)")
    return found


def plan_layers(root: nn.Module, paths: list[str], config: RandLoraConfig, warn: bool) -> list[tuple[str, LayerModule, bool]]:
    """``(path, layer, is_new)`` for each target; new wrappers are built but not yet inserted."""
    plan: list[tuple[str, LayerModule, bool]] = []
    for path in paths:
        outer = check_path(root, path)
        if outer is not None:
            raise TargetModuleError(f"module {path!r} lies inside the RandLoRA wrapper {outer!r}; name modules by their path")
        module = root.get_submodule(path)
        if is_randlora_layer(module):
            plan.append((path, module, False))
            continue
        wrapper_cls = wrapper_for(module)
        if wrapper_cls is None:
            raise ShapeError(f"module {path!r} ({type(module).__name__}) cannot be adapted by any registered wrapper")
        layout = layout_of(module)
        fan_in_fan_out = config.fan_in_fan_out if layout is None else layout
        if warn and layout is not None and layout != config.fan_in_fan_out:
            kind = "Conv1D" if layout else "torch.nn.Linear"
            warnings.warn(
                f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module {path!r} is `{kind}`. "
                f"Setting fan_in_fan_out to {layout} for this layer.",
                stacklevel=5,
            )
        wrapper = build_wrapper(wrapper_cls, module, fan_in_fan_out)
        wrapper.layer_name = path
        plan.append((path, wrapper, True))
    return plan


def _regrown(current: RandLoraBases, needed: BasesShape, kind: BasisKind) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The model's bases regenerated to cover ``needed`` too, when the portable rule keeps every existing window."""
    have = current.shape
    if not current.regenerable:
        raise ShapeError(
            f"the shared bases {have} are too small for the new adapter (needs {needed}) and cannot be "
            "regenerated (they were injected or loaded); add the adapter with the larger layers/rank first"
        )
    if kind == "very_sparse" and needed.m_max != have.m_max:
        raise ShapeError(
            f"very_sparse bases depend on m_max: the new adapter needs m_max={needed.m_max} but the model's "
            f"bases have m_max={have.m_max}, so their values would change"
        )
    a, b = generate_bases(current.seed, have.union(needed), current.kind, current.randlora_A.device)
    if not same_on_overlap((a, b), (current.randlora_A, current.randlora_B)):
        raise ShapeError("the shared bases do not match the portable rule's values, so they cannot be regrown")
    return a, b, True


def check_dora(layers: list[tuple[str, LayerModule, bool]], config: RandLoraConfig) -> None:
    """With ``use_dora``, every target must read and write its plain weight (SPEC 3.11): not a quantized one."""
    if not config.use_dora:
        return
    for path, layer, _ in layers:
        if not getattr(layer, "supports_dora", False):
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            raise TargetModuleError(
                f"use_dora: layer {path!r} ({type(base).__name__}) does not support DoRA adapters: DoRA rescales the "
                "rows of the plain weight, which this layer does not hold (e.g. a quantized one)"
            )


def _first_bases(
    config: RandLoraConfig, dims: list[tuple[int, int]], ranks: list[int], device: torch.device, stored: Bases | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The model's first shared bases: the ``stored`` pair if given (it must be large enough), else generated."""
    needed = allocation(dims, ranks)
    if stored is not None:
        a, b = stored
        have = shape_of_bases(a.shape, b.shape)
        if not windows_fit(have, dims, ranks):
            raise ShapeError(f"the given bases {have} are too small for the adapted layers (need {needed})")
        return a, b, config.basis_rule == PORTABLE_RULE
    kind = basis_kind(config.sparse, config.very_sparse)
    return (*generate_bases(config.projection_prng_key, needed, kind, device, config.basis_rule), True)


def plan_bases(
    model: RandLoraModel,
    config: RandLoraConfig,
    dims: list[tuple[int, int]],
    ranks: list[int],
    device: torch.device,
    stored: Bases | None,
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """New ``(A, B, regenerable)`` for the shared bases, or ``None`` to keep the current pair."""
    kind = basis_kind(config.sparse, config.very_sparse)
    needed = allocation(dims, ranks)
    if not rank_is_bounded(config.r, needed.M_max):
        raise ShapeError(
            f"r={config.r} is larger than every adapted layer's larger side (at most {needed.M_max}) and than "
            f"{RANK_CEILING}: such a rank adds bases but no rank to the update, at a cost of r x M values"
        )
    current = model.randlora_bases
    if current is None:
        return _first_bases(config, dims, ranks, device, stored)
    result = None if windows_fit(current.shape, dims, ranks) else _regrown(current, needed, kind)
    if stored is not None:
        mine = (result[0], result[1]) if result is not None else (current.randlora_A, current.randlora_B)
        if not same_on_overlap(stored, mine):
            raise CheckpointError(
                "the checkpoint's stored bases differ from the model's shared bases; one model holds one pair of "
                "bases, so adapters with different bases cannot be combined"
            )
    return result


class PlanOptions(TypedDict, total=False):
    """The optional arguments of :func:`plan_adapter`, by name (what ``RandLoraModel._add_adapter`` passes on)."""

    paths: list[str] | None
    stored_bases: Bases | None
    warn: bool
    autocast_adapter_dtype: bool
    low_cpu_mem_usage: bool


def plan_adapter(
    model: RandLoraModel,
    name: str,
    config: RandLoraConfig,
    paths: list[str] | None = None,
    stored_bases: Bases | None = None,
    warn: bool = True,
    *,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> AdapterPlan:
    """Validate adding adapter ``name`` to ``model`` and return what the addition changes (nothing is changed).

    Args:
        model: the model receiving the adapter.
        name: the adapter's name.
        config: its config; ``target_modules=None`` takes the architecture's defaults
            (:mod:`randlora_core.defaults`), recorded in the plan's config.
        paths: the layers to adapt (a checkpoint's), instead of selecting them by ``config``.
        stored_bases: bases a checkpoint brings; they must agree with the model's on the overlap.
        warn: warn when a target's layout overrides ``config.fan_in_fan_out``.
        autocast_adapter_dtype: see :class:`AdapterPlan`.
        low_cpu_mem_usage: see :class:`AdapterPlan`.

    """
    load_plugins()
    check_new(model, name, config)
    if paths is None:
        config = with_default_targets(model.model, config)
    saved = resolve_saved(model.model, config)
    if paths is None:
        paths = select_targets(model.model, config, adaptable, opaque, linear=is_linear_target)
    layers = plan_layers(model.model, paths, config, warn)
    check_dora(layers, config)
    new_paths = {p for p, _, _ in layers}
    dims = [(layer.in_features, layer.out_features) for _, layer, _ in layers]
    dims += [(layer.in_features, layer.out_features) for p, layer in model.named_randlora_layers() if p not in new_paths]
    ranks = [c.r for c in model.peft_config.values()] + [config.r]
    device = next((layer._param_device() for _, layer, _ in layers if hasattr(layer, "_param_device")), torch.device("cpu"))
    bases = plan_bases(model, config, dims, ranks, device, stored_bases)
    return AdapterPlan(name, config, layers, saved, bases, device, autocast_adapter_dtype, low_cpu_mem_usage)
