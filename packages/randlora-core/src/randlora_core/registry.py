"""Which RandLoRA wrapper adapts which base-layer type.

A *wrapper* replaces a targeted base layer in the model and adds the adapters to it. Built in:
``nn.Linear`` and Conv1D-like layers, both handled by :class:`randlora_core.layer.RandLoraLinear`;
``nn.Conv1d/2d/3d`` (:class:`randlora_core.conv.RandLoraConv`) and ``nn.Embedding``
(:class:`randlora_core.embedding.RandLoraEmbedding`), the other layer kinds of SPEC 3.10.
Other packages add layer types with :func:`register_layer_wrapper`, usually from an entry point in
the group ``randlora.layers`` (a no-argument callable that registers its wrappers), which core
loads lazily, once, the first time a model is adapted. Later registrations take precedence, so a
plugin can claim a subclass of ``nn.Linear`` (bitsandbytes' ``Linear8bitLt`` is one).

Wrapper protocol (what :class:`~randlora_core.model.RandLoraModel` relies on); subclassing
:class:`~randlora_core.layer.RandLoraLinear` provides all of it:

- ``Wrapper(base_layer, fan_in_fan_out: bool)`` constructs a wrapper without modifying the base layer
  (it may raise :class:`~randlora_spec.errors.ShapeError` if it cannot read the layer's sizes);
- attributes ``in_features`` and ``out_features`` (logical sizes), ``fan_in_fan_out``, and a
  writable ``layer_name`` (the module path, set by the model, used in messages);
- ``update_layer(adapter_name, config, bases_module, autocast_adapter_dtype=True, low_cpu_mem_usage=False)``
  adds an adapter (bases_module is the model's :class:`~randlora_core.bases.RandLoraBases`);
- ``forward(x, *args, **kwargs)``; ``merge(adapter_names, safe_merge)``; ``unmerge()``;
  ``check_merge(adapter_names)`` (raise ``MergeError`` if merging would give non-finite weights,
  changing nothing); ``get_delta_weight(name)`` (storage layout); ``get_base_layer()``;
- ``set_adapter(names)``, ``active_adapters`` (list), ``delete_adapter(name)``, ``merged_adapters`` (list), ``merged`` (bool),
  ``disable_adapters`` (bool), ``r`` (dict), ``randlora_lambda`` / ``randlora_gamma`` /
  ``randlora_magnitude`` (``nn.ParameterDict`` by adapter name; the magnitude for DoRA adapters only);
- writable ``mixed_adapters`` (``None``, or a mixed-adapter call's adapter name per batch row) and
  ``inference_cache`` (``None``, or the model's :class:`~randlora_core.inference_cache.InferenceCache`),
  both set by the model;
- ``_param_dtype()`` and ``_param_device()``: dtype and device of a new adapter's lambda/gamma
  (loading a checkpoint converts its values to them before the model changes), and
  ``adapter_dtype(autocast_adapter_dtype)``, that dtype after ``autocast_adapter_dtype``.

:class:`RandLoraLayer` states this protocol for the type checker.

Conv1D-like rule (GPT-2's ``transformers.pytorch_utils.Conv1D`` without importing transformers): a
module that is not an ``nn.Linear``, has no ``in_features`` attribute, has an integer attribute
``nf`` and a 2-D ``weight`` parameter of shape ``(in_features, nf)``. Its weight is stored
``(in, out)``, so adapters on it use ``fan_in_fan_out=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from randlora_spec.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from randlora_core.bases import RandLoraBases
    from randlora_core.inference_cache import InferenceCache
    from randlora_spec.config import RandLoraConfig

ENTRY_POINT_GROUP = "randlora.layers"

Predicate = Callable[[nn.Module], bool]


class RandLoraLayer(Protocol):
    """The wrapper protocol (module docstring) as the type checker sees it; forward is left to ``nn.Module``."""

    in_features: int
    out_features: int
    fan_in_fan_out: bool
    layer_name: str
    r: dict[str, int]
    active_adapters: list[str]
    merged_adapters: list[str]
    disable_adapters: bool
    randlora_lambda: nn.ParameterDict
    randlora_gamma: nn.ParameterDict
    randlora_magnitude: nn.ParameterDict
    mixed_adapters: list[str] | None
    inference_cache: InferenceCache | None

    @property
    def merged(self) -> bool:
        """True while any adapter is merged into the base weight."""
        ...

    def update_layer(
        self,
        adapter_name: str,
        config: RandLoraConfig,
        bases_module: RandLoraBases,
        autocast_adapter_dtype: bool,
        low_cpu_mem_usage: bool,
    ) -> None:
        """Add an adapter (the model passes every argument; wrappers default the last two to ``True``, ``False``)."""
        ...

    def set_adapter(self, adapter_names: list[str]) -> None:
        """Make ``adapter_names`` the active adapters."""
        ...

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an (unmerged) adapter."""
        ...

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters' delta-W to the base weight."""
        ...

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta-W."""
        ...

    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise ``MergeError`` if merging would give non-finite weights, changing nothing."""
        ...

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """delta-W in the weight's storage layout."""
        ...

    def get_base_layer(self) -> nn.Module:
        """The wrapped base layer."""
        ...

    def _param_dtype(self) -> torch.dtype: ...

    def _param_device(self) -> torch.device: ...

    def adapter_dtype(self, autocast_adapter_dtype: bool = True) -> torch.dtype:
        """Dtype of a new adapter's lambda/gamma."""
        ...


if TYPE_CHECKING:

    class LayerModule(nn.Module, RandLoraLayer):
        """An ``nn.Module`` following :class:`RandLoraLayer`, what :func:`is_randlora_layer` establishes.

        Python's typing has no intersection types, so this names one for annotations; it exists for the type
        checker only (wrappers do not derive from it).
        """


_builtin: list[tuple[type[nn.Module] | Predicate, type[nn.Module]]] = []
_registered: list[tuple[type[nn.Module] | Predicate, type[nn.Module]]] = []
_plugins_loaded = False


def is_conv1d_like(module: nn.Module) -> bool:
    """True for a GPT-2-style Conv1D: 2-D ``weight`` of shape (in, out) with ``out == nf``, no ``in_features``."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (
        not isinstance(module, nn.Linear)
        and not hasattr(module, "in_features")
        and isinstance(nf, int)
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[1] == nf
    )


def is_randlora_layer(module: nn.Module) -> TypeIs[LayerModule]:
    """True for a wrapper following the protocol above (core's, a plugin's, or PEFT's own RandLoRA layers)."""
    return hasattr(module, "update_layer") and hasattr(module, "randlora_lambda")


def build_wrapper(wrapper_cls: type[nn.Module], module: nn.Module, fan_in_fan_out: bool) -> LayerModule:
    """``wrapper_cls(module, fan_in_fan_out)``, checked to follow the wrapper protocol."""
    wrapper = wrapper_cls(module, fan_in_fan_out)
    if not is_randlora_layer(wrapper):
        raise ConfigError(
            f"wrapper class {wrapper_cls.__name__} registered for {type(module).__name__} does not follow the wrapper "
            "protocol (it needs update_layer and randlora_lambda; see randlora_core.registry)"
        )
    return wrapper


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (attributes, or a Conv1D's weight), else ``None``."""
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f
    if is_conv1d_like(module):
        weight = module.get_parameter("weight")
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def layout_of(module: nn.Module) -> bool | None:
    """Storage layout a base layer dictates: True for (in, out) (Conv1D), False for (out, in) (``nn.Linear``), None if unknown."""
    if is_conv1d_like(module):
        return True
    if isinstance(module, nn.Linear):
        return False
    return None


def plain_linear_operands(base: nn.Module, weight_in_out: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight, bias)`` of a base layer whose forward is exactly ``x @ W^T + b`` (``x @ W + b`` for Conv1D), else Nones.

    That is an ``nn.Linear`` with ``nn.Linear.forward``, or a Conv1D known to compute
    ``addmm(bias, x, weight)`` (transformers' own, or a class marked ``_randlora_plain_conv1d``),
    with a floating weight, a bias of the same dtype, and no forward hooks on it or globally (they
    expect the base layer's own call).
    """
    if base._forward_hooks or base._forward_pre_hooks or _global_module_hooks():
        return None, None
    if isinstance(base, nn.Linear):
        plain = type(base).forward is nn.Linear.forward and not weight_in_out
    else:
        cls = type(base)
        known = getattr(cls, "_randlora_plain_conv1d", False) or (
            cls.__name__ == "Conv1D" and cls.__module__ == "transformers.pytorch_utils"
        )
        plain = weight_in_out and bool(known) and isinstance(getattr(base, "nf", None), int)
    weight, bias = getattr(base, "weight", None), getattr(base, "bias", None)
    if not plain or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return None, None
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != weight.dtype):
        return None, None
    return weight, bias


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks, or any global module hook is registered."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _global_module_hooks())


def is_linear_target(module: nn.Module) -> bool:
    """A module of kind ``linear`` (SPEC 3.10) that can be adapted: what ``all-linear`` selects.

    A RandLoRA layer by its ``layer_kind``; any other module by its wrapper's (plugins' wrappers of
    quantized linear layers are linear; convolutions and embeddings are not).
    """
    if is_randlora_layer(module):
        return getattr(module, "layer_kind", "linear") == "linear"
    wrapper_cls = wrapper_for(module)
    return wrapper_cls is not None and getattr(wrapper_cls, "layer_kind", "linear") == "linear"


def _global_module_hooks() -> bool:
    """Whether any global module forward hook is registered."""
    from torch.nn.modules import module as _m

    return bool(
        getattr(_m, "_global_forward_hooks", None)
        or getattr(_m, "_global_forward_pre_hooks", None)
        or getattr(_m, "_global_forward_hooks_always_called", None)
    )


def register_layer_wrapper(base_type_or_predicate: type[nn.Module] | Predicate, wrapper_cls: type[nn.Module]) -> None:
    """Adapt modules of ``base_type_or_predicate`` (an ``nn.Module`` subclass, or a predicate) with ``wrapper_cls``.

    Registrations made later win over earlier ones, and all of them over the built-in wrappers.
    """
    if not isinstance(wrapper_cls, type) or not issubclass(wrapper_cls, nn.Module):
        raise ConfigError(f"wrapper_cls: must be an nn.Module subclass, got {wrapper_cls!r}")
    if not (isinstance(base_type_or_predicate, type) or callable(base_type_or_predicate)):
        raise ConfigError(f"base_type_or_predicate: must be a type or a callable, got {base_type_or_predicate!r}")
    load_plugins()  # so plugins discovered later cannot override a user's explicit registration
    _registered.insert(0, (base_type_or_predicate, wrapper_cls))


def _register_builtin(base_type_or_predicate: type[nn.Module] | Predicate, wrapper_cls: type[nn.Module]) -> None:
    _builtin.append((base_type_or_predicate, wrapper_cls))


def load_plugins() -> None:
    """Run every ``randlora.layers`` entry point once; a failing plugin is reported as a warning."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # set first: plugins call register_layer_wrapper, which calls us again
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            ep.load()()
        except Exception as exc:  # a broken optional plugin must not break plain nn.Linear adaptation
            warnings.warn(f"randlora.layers plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}", stacklevel=2)


def wrapper_for(module: nn.Module) -> type[nn.Module] | None:
    """The wrapper class for ``module``, or ``None`` when no registered wrapper adapts it."""
    load_plugins()
    for key, wrapper_cls in (*_registered, *_builtin):
        if isinstance(key, type):
            if isinstance(module, key):
                return wrapper_cls
        elif key(module):
            return wrapper_cls
    return None


def registered_types() -> list[str]:
    """Readable names of what can be adapted (for error messages)."""
    return [getattr(key, "__name__", repr(key)) for key, _ in (*_registered, *_builtin)]
