"""``RandLoraModel``: a Flax NNX module with RandLoRA adapters, and ``get_randlora_model``.

The wrapped module keeps its structure; each targeted layer is replaced in place by a
:class:`~randlora_jax.layer.RandLoraLinear` around it, every one referencing the single shared
:class:`~randlora_jax.shared.RandLoraBases` node. Several adapters may live on one model
(``add_adapter`` / ``set_adapter`` / ``delete_adapter``); every operation validates its input
before it changes the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
from flax import nnx

from randlora_jax import base_layers, targeting
from randlora_jax.layer import RandLoraLinear
from randlora_jax.modules_to_save import ModulesToSaveWrapper, parameters
from randlora_jax.shared import BasesIdentity, RandLoraBases, union_shape
from randlora_jax.state import build_checkpoint
from randlora_jax.variables import is_trainable, set_trainable, trainable
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import AdapterNotFoundError, ConfigError, MergeError
from randlora_spec.selection import name_matches


class BiasOwner(Protocol):
    """A module whose ``bias`` is an ``nnx.Param`` (what :meth:`RandLoraModel.bias_owners` finds)."""

    bias: nnx.Param[jax.Array]


def _adaptable(module: Any) -> bool:
    return isinstance(module, RandLoraLinear) or base_layers.is_adaptable(module)


def _opaque(module: Any) -> bool:
    return isinstance(module, (RandLoraLinear, ModulesToSaveWrapper, RandLoraBases))


def check_adapter_name(name: Any) -> str:
    """An adapter name is a non-empty string without ``.`` (it appears in checkpoint metadata, SPEC 6.2)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ConfigError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    return name


class RandLoraModel(nnx.Module):
    """A model with RandLoRA adapters; calling it calls the wrapped model.

    Build one with :func:`get_randlora_model` or :func:`randlora_jax.load_adapter`. Train with
    ``nnx.Optimizer(model, tx, wrt=randlora_jax.trainable)``.
    """

    def __init__(self, model: nnx.Module, bases: RandLoraBases) -> None:
        self.model = model
        self.randlora_bases = bases
        self.configs: tuple[tuple[str, RandLoraConfig], ...] = ()
        self.targets: tuple[tuple[str, tuple[str, ...]], ...] = ()
        self.active: tuple[str, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self.model(*args, **kwargs)

    # -- introspection ----------------------------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, RandLoraConfig]:
        """Each adapter's config, by name (PEFT's attribute name)."""
        return dict(self.configs)

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters, in the order their updates are summed."""
        return list(self.active)

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter, or None."""
        return self.active[0] if self.active else None

    def adapter_layers(self, name: str) -> list[str]:
        """Dotted paths of the layers adapter ``name`` adapts."""
        self._require(name)
        return list(dict(self.targets)[name])

    def randlora_layers(self) -> dict[str, RandLoraLinear]:
        """Every RandLoRA layer by dotted path."""
        return {n: m for n, _, m in targeting.modules(self.model, _opaque) if isinstance(m, RandLoraLinear)}

    def saved_modules(self) -> dict[str, ModulesToSaveWrapper]:
        """Every ``modules_to_save`` wrapper by dotted path."""
        return {n: m for n, _, m in targeting.modules(self.model, _opaque) if isinstance(m, ModulesToSaveWrapper)}

    def bias_owners(self) -> dict[str, BiasOwner]:
        """Modules with a ``bias`` parameter by dotted path (for a RandLoRA layer: its base layer)."""
        owners: dict[str, BiasOwner] = {}
        for name, _, module in targeting.modules(self.model, _opaque):
            inner: Any = module.base_layer if isinstance(module, RandLoraLinear) else module  # a BiasOwner when kept
            if isinstance(getattr(inner, "bias", None), nnx.Param):
                owners[name] = inner
        return owners

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; the frozen bases are not parameters."""

        def count(state: nnx.State[Any, Any]) -> int:
            return sum(leaf.size for leaf in jax.tree.leaves(state))

        return count(nnx.state(self, trainable)), count(nnx.state(self, nnx.Param))

    def print_trainable_parameters(self) -> None:
        """Print trainable / total parameter counts."""
        done, total = self.trainable_parameters()
        print(f"trainable params: {done:,} || all params: {total:,} || trainable%: {100 * done / max(total, 1):.4f}")

    def _require(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterNotFoundError(f"adapter {name!r} not found; the model has {list(self.peft_config)}")

    # -- adapters ---------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: RandLoraConfig, rngs: nnx.Rngs | None = None) -> None:
        """Add an adapter (not activated, as in PEFT); targets are selected by ``config`` (SPEC 2.3).

        Raises:
            ConfigError: bad name, a duplicate, or a config that cannot share the model's bases.
            TargetModuleError: the selection matches nothing or something unadaptable.
            ShapeError: the bases would have to grow but cannot be regenerated.

        """
        paths = targeting.select(self.model, config, _adaptable, _opaque)
        self._insert(adapter_name, config, paths, {}, rngs)

    def _insert(
        self,
        name: str,
        config: RandLoraConfig,
        paths: list[str],
        layouts: dict[str, bool],
        rngs: nnx.Rngs | None,
        bases_shape: BasesShape | None = None,
    ) -> None:
        """Validate, then add adapter ``name`` on ``paths`` (``layouts``: recorded fan_in_fan_out per path)."""
        check_adapter_name(name)
        if name in self.peft_config:
            raise ConfigError(f"adapter_name: an adapter named {name!r} already exists")
        if not isinstance(config, RandLoraConfig):
            raise ConfigError(f"config must be a RandLoraConfig, got {type(config).__name__}")
        self.randlora_bases.check_identity(BasesIdentity.of(config), f"adapter {name!r}")
        found = {n: m for n, _, m in targeting.modules(self.model, _opaque)}
        views = {p: base_layers.view_of(found[p].base_layer if isinstance(found[p], RandLoraLinear) else found[p]) for p in paths}
        # A loaded adapter brings its own allocation (for very_sparse it fixes m_max); it covers its layers.
        need = bases_shape or union_shape(None, config.r, [(v.in_features, v.out_features) for v in views.values()])
        grown = self.randlora_bases.plan_growth(need)
        saved = self._resolve_saved(config)
        # Validated: from here on nothing raises for a bad input.
        if grown is not None:
            self.randlora_bases.grow(grown)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        for path in paths:
            layer = found[path]
            if not isinstance(layer, RandLoraLinear):
                layer = RandLoraLinear(layer, self.randlora_bases, layouts.get(path, config.fan_in_fan_out))
                targeting.replace(self.model, path, layer)
            layer.add(name, config.r, config.randlora_alpha, config.randlora_dropout, config.init_weights, config.compute, rngs)
        for path in saved:
            wrapper = found.get(path)
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(found[path])
                targeting.replace(self.model, path, wrapper)
            wrapper.add(name)
        self.configs = (*self.configs, (name, config))
        self.targets = (*self.targets, (name, tuple(paths)))
        self._apply_active(self.active)

    def _resolve_saved(self, config: RandLoraConfig) -> list[str]:
        """Paths of the modules ``config.modules_to_save`` names (a wrapper counts as its module)."""
        if not config.modules_to_save:
            return []
        found = [(n, m) for n, _, m in targeting.modules(self.model, _opaque) if not isinstance(m, RandLoraLinear)]
        paths = [n for n, _ in found if name_matches(list(config.modules_to_save), n)]
        if not paths:
            raise ConfigError(f"modules_to_save: {config.modules_to_save!r} matched no module of the model")
        return paths

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter or several (their updates are summed in list order).

        Raises:
            AdapterNotFoundError: a name the model does not hold.

        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._require(name)
        self._apply_active(tuple(names))

    def _apply_active(self, names: tuple[str, ...]) -> None:
        self.active = tuple(names)
        for layer in self.randlora_layers().values():
            layer.set_active(self.active)
        for wrapper in self.saved_modules().values():
            wrapper.set_active(self.active)
        self._mark_biases()

    def _mark_biases(self) -> None:
        configs = self.peft_config
        wanted: set[str] = set()
        owners = self.bias_owners()
        for name in self.active:
            if configs[name].bias == "all":
                wanted |= set(owners)
            elif configs[name].bias == "randlora_only":
                wanted |= set(dict(self.targets)[name])
        for path, module in owners.items():
            set_trainable(module.bias, path in wanted)

    def trained_biases(self, adapter_name: str) -> list[str]:
        """Paths whose bias adapter ``adapter_name`` trains and saves (its config's ``bias``)."""
        config = self.peft_config[adapter_name]
        owners = self.bias_owners()
        if config.bias == "all":
            return sorted(owners)
        if config.bias == "randlora_only":
            return sorted(p for p in dict(self.targets)[adapter_name] if p in owners)
        return []

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its parameters; the bases stay (other adapters may use them).

        Raises:
            AdapterNotFoundError: unknown name.
            MergeError: the adapter is merged.

        """
        self._require(adapter_name)
        layers = self.randlora_layers()
        if any(adapter_name in layer.merged_adapters for layer in layers.values()):
            raise MergeError(f"adapter {adapter_name!r} is merged; unmerge it before deleting it")
        for layer in layers.values():
            layer.delete(adapter_name)
        for wrapper in self.saved_modules().values():
            wrapper.delete(adapter_name)
        self.configs = tuple((n, c) for n, c in self.configs if n != adapter_name)
        self.targets = tuple((n, t) for n, t in self.targets if n != adapter_name)
        self._apply_active(tuple(n for n in self.active if n != adapter_name))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes without any adapter (base model only).

        Raises:
            MergeError: an adapter is merged (its update is inside the base weights).

        """
        layers = self.randlora_layers()
        if any(layer.merged_adapters for layer in layers.values()):
            raise MergeError("cannot disable adapters while one is merged; unmerge first")
        active = self.active
        for layer in layers.values():
            layer.disabled = True
        for wrapper in self.saved_modules().values():
            wrapper.set_active(())
        try:
            yield
        finally:
            for layer in layers.values():
                layer.disabled = False
            self._apply_active(active)

    # -- merging ----------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base kernels (SPEC 3.7).

        Raises:
            AdapterNotFoundError: unknown name.
            MergeError: an adapter is already merged.

        """
        names = list(self.active) if adapter_names is None else list(adapter_names)
        for name in names:
            self._require(name)
        layers = self.randlora_layers().values()
        for name in names:
            if any(name in layer.merged_adapters for layer in layers):
                raise MergeError(f"adapter {name!r} is already merged")
        for layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base kernels, in reverse order.

        Raises:
            MergeError: nothing is merged.

        """
        layers = self.randlora_layers().values()
        if not any(layer.merged_adapters for layer in layers):
            raise MergeError("no adapter is merged")
        for layer in layers:
            layer.unmerge()

    def merge_and_unload(self) -> nnx.Module:
        """Merge the active adapters and return the plain wrapped model (RandLoRA layers removed)."""
        already = any(layer.merged_adapters for layer in self.randlora_layers().values())
        if not already and self.active:
            self.merge_adapter()
        return self.unload()

    def unload(self) -> nnx.Module:
        """Return the wrapped model with every RandLoRA layer replaced by its base layer (nothing merged)."""
        for path, layer in self.randlora_layers().items():
            targeting.replace(self.model, path, layer.base_layer)
        for path, wrapper in self.saved_modules().items():
            targeting.replace(self.model, path, wrapper.current())
        for _, var in nnx.iter_graph(self.model):
            if isinstance(var, nnx.Variable) and is_trainable(var):
                set_trainable(var, False)
        return self.model

    def save_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Write one adapter (default: the first active one) to ``path`` in checkpoint format v1, atomically."""
        spec_ckpt.save(path, build_checkpoint(self, adapter_name))

    def saved_parameters(self, adapter_name: str) -> dict[str, dict[str, nnx.Variable[Any]]]:
        """Adapter ``adapter_name``'s ``modules_to_save`` copies: path -> parameter name -> variable."""
        return {p: parameters(w.copies[adapter_name]) for p, w in self.saved_modules().items() if adapter_name in w.copies}


def get_randlora_model(
    module: nnx.Module, config: RandLoraConfig, adapter_name: str = "default", rngs: nnx.Rngs | None = None
) -> RandLoraModel:
    """Add a RandLoRA adapter to ``module`` and return the :class:`RandLoraModel` (the adapter active).

    The shared bases are generated with the portable rule (bit-identical to every other
    implementation) for the targeted layers. ``rngs`` feeds dropout and ``init_weights=False``
    (default ``nnx.Rngs(0)``). ``module`` is modified in place: its targeted layers are wrapped.

    Raises:
        ConfigError: invalid config or adapter name.
        TargetModuleError: the selection matches nothing or something unadaptable.

    """
    if not isinstance(config, RandLoraConfig):
        raise ConfigError(f"config must be a RandLoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if isinstance(module, RandLoraModel):
        raise ConfigError("module is already a RandLoraModel; use its add_adapter()")
    paths = targeting.select(module, config, _adaptable, _opaque)
    found = {n: m for n, _, m in targeting.modules(module, _opaque)}
    sizes = [(base_layers.view_of(found[p]).in_features, base_layers.view_of(found[p]).out_features) for p in paths]
    bases = RandLoraBases.generate(BasesIdentity.of(config), union_shape(None, config.r, sizes))
    model = RandLoraModel(module, bases)
    model._insert(adapter_name, config, paths, {}, rngs)
    model.set_adapter(adapter_name)
    return model
