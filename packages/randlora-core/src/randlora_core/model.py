"""``RandLoraModel``: injects RandLoRA layers into any ``nn.Module`` and manages adapters.

One model holds one shared pair of bases (:class:`~randlora_core.bases.RandLoraBases`, registered
once as ``randlora_bases``) sized for every adapter on it (SPEC 3.9): ``m_max`` / ``M_max`` over
all adapted layers, the largest rank, and enough bases for the smallest rank. Adding an adapter
that needs a larger allocation regenerates the bases at the larger size, which under the portable
rule leaves every existing window bit-identical (the slice property). Regrowing is impossible, and
raises :class:`ShapeError`, when the bases were injected or loaded from a file without provenance
(``regenerable`` false), or for ``very_sparse`` bases whose ``m_max`` would change (their values
depend on ``m_max``).

Every method validates completely before modifying anything, so a call that raises leaves the
model as it was. Error catalogue of the model-level API: unknown adapter names raise
:class:`AdapterNotFoundError`; incompatible or invalid configs :class:`ConfigError`; bad targets
:class:`TargetModuleError`; merging an already-merged adapter, unmerging when nothing is merged,
deleting or disabling while merged, and non-finite safe merges :class:`MergeError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randlora_core.bases import RandLoraBases, generate_bases
from randlora_core.layer import RandLoraLinear
from randlora_core.modules_to_save import ModulesToSaveWrapper
from randlora_core.registry import is_conv1d_like, load_plugins, wrapper_for
from randlora_core.targeting import name_matches, select_targets, visible_modules
from randlora_spec.bases import PORTABLE_RULE, BasesShape, basis_kind, num_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import AdapterNotFoundError, CheckpointError, ConfigError, MergeError, ShapeError

SHARED_CONFIG_FIELDS = ("projection_prng_key", "save_projection", "sparse", "very_sparse", "basis_rule")
"""Config fields every adapter on one model must agree on (one shared pair of bases, SPEC 3.9)."""


def is_randlora_layer(module: nn.Module) -> bool:
    """True for a wrapper following the protocol of :mod:`randlora_core.registry`."""
    return isinstance(module, RandLoraLinear) or (hasattr(module, "update_layer") and hasattr(module, "randlora_lambda"))


def _opaque(module: nn.Module) -> bool:
    return is_randlora_layer(module) or isinstance(module, ModulesToSaveWrapper)


def _adaptable(module: nn.Module) -> bool:
    return is_randlora_layer(module) or wrapper_for(module) is not None


def _layout(module: nn.Module) -> bool | None:
    """Storage layout a base layer dictates: True for (in, out), False for (out, in), None if unknown."""
    if is_conv1d_like(module):
        return True
    if isinstance(module, nn.Linear):
        return False
    return None


def _windows_fit(shape: BasesShape, dims: list[tuple[int, int]], ranks: list[int]) -> bool:
    """Whether every layer's window, for every rank, lies inside an allocation ``shape``."""
    for in_f, out_f in dims:
        m, big_m = min(in_f, out_f), max(in_f, out_f)
        for r in ranks:
            if r > shape.r or m > shape.m_max or big_m > shape.M_max or num_bases(m, r) > shape.nb_max:
                return False
    return True


def allocation(dims: list[tuple[int, int]], ranks: list[int]) -> BasesShape:
    """SPEC 3.9 allocation: maxima of in/out taken separately, largest r, most bases (smallest r)."""
    largest_in, largest_out = max(i for i, _ in dims), max(o for _, o in dims)
    m_max = min(largest_in, largest_out)
    return BasesShape(
        r=max(ranks), m_max=m_max, M_max=max(largest_in, largest_out), nb_max=max(num_bases(m_max, r) for r in ranks)
    )


def _logical_numel(param: torch.Tensor) -> int:
    """Number of values ``param`` represents, which for packed quantized storage is not its ``numel()``.

    bitsandbytes' 4-bit weights keep two values per byte; their ``quant_state.shape`` is the real shape.
    """
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


class RandLoraModel(nn.Module):
    """A model with RandLoRA adapters. Calls and unknown attributes go to the wrapped ``model``.

    Args:
        model: the model to adapt (modified in place: targeted layers are replaced by wrappers and
            its parameters frozen), unless this constructor raises.
        config: the first adapter's config; ``None`` creates a wrapper without adapters.
        adapter_name: name of the first adapter.

    """

    def __init__(self, model: nn.Module, config: RandLoraConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.randlora_bases: RandLoraBases | None = None
        self.peft_config: dict[str, RandLoraConfig] = {}
        self._active: list[str] = []
        self._targets: dict[str, list[str]] = {}
        self._saved: dict[str, list[str]] = {}
        if config is not None:
            self._add_adapter(adapter_name, config)

    # -- plumbing -------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model."""
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":  # not yet set: do not recurse
                raise
            return getattr(self.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with RandLoRA layers in it)."""
        return self.model

    def named_randlora_layers(self) -> Iterator[tuple[str, RandLoraLinear]]:
        """``(path, wrapper)`` for every RandLoRA layer, with paths as in the base model."""
        for name, module in visible_modules(self.model, _opaque):
            if is_randlora_layer(module):
                yield name, module  # type: ignore[misc]

    def _modules_to_save(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in visible_modules(self.model, _opaque):
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _names(self, adapter_names: str | list[str] | None) -> list[str]:
        if adapter_names is None:
            return list(self._active)
        return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_name, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, new)

    # -- adding adapters ------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: RandLoraConfig) -> None:
        """Add a new adapter (not made active; use :meth:`set_adapter`).

        Raises:
            ConfigError: the name is taken or invalid, or the config disagrees with the model's
                other adapters on a shared field (``projection_prng_key``, ``save_projection``,
                ``sparse``, ``very_sparse``, ``basis_rule``).
            TargetModuleError: the targets match nothing or something unadaptable.
            ShapeError: the shared bases cannot grow to cover the new adapter (see module docstring).

        """
        self._add_adapter(adapter_name, config)

    def _check_new(self, adapter_name: str, config: RandLoraConfig) -> None:
        if not isinstance(config, RandLoraConfig):
            raise ConfigError(f"config must be a randlora RandLoraConfig, got {type(config).__name__}")
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ConfigError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists; delete it first or pick another name")
        for other_name, other in self.peft_config.items():
            for field in SHARED_CONFIG_FIELDS:
                if getattr(other, field) != getattr(config, field):
                    raise ConfigError(
                        f"{field}: all adapters on one model share the bases and must agree on {field}; "
                        f"adapter {other_name!r} has {getattr(other, field)!r}, the new one {getattr(config, field)!r}"
                    )

    def _plan_layers(self, paths: list[str], config: RandLoraConfig, warn: bool) -> list[tuple[str, nn.Module, bool]]:
        """``(path, layer, is_new)`` for each target; new wrappers are built but not yet inserted."""
        plan = []
        for path in paths:
            module = self.model.get_submodule(path)
            if is_randlora_layer(module):
                plan.append((path, module, False))
                continue
            wrapper_cls = wrapper_for(module)
            if wrapper_cls is None:
                raise ShapeError(f"module {path!r} ({type(module).__name__}) cannot be adapted by any registered wrapper")
            layout = _layout(module)
            fan_in_fan_out = config.fan_in_fan_out if layout is None else layout
            if warn and layout is not None and layout != config.fan_in_fan_out:
                kind = "Conv1D" if layout else "torch.nn.Linear"
                warnings.warn(
                    f"fan_in_fan_out is set to {config.fan_in_fan_out} but the target module {path!r} is `{kind}`. "
                    f"Setting fan_in_fan_out to {layout} for this layer.",
                    stacklevel=5,
                )
            wrapper = wrapper_cls(module, fan_in_fan_out)
            wrapper.layer_name = path
            plan.append((path, wrapper, True))
        return plan

    def _resolve_saved(self, config: RandLoraConfig) -> list[str]:
        names = config.modules_to_save or []
        modules = visible_modules(self.model, _opaque)
        found = [n for n, m in modules if name_matches(names, n) and not is_randlora_layer(m)] if names else []
        missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in found)]
        if missing:
            raise ConfigError(f"modules_to_save: {missing} match no module of the model (or only RandLoRA layers)")
        return found

    def _plan_bases(
        self,
        config: RandLoraConfig,
        dims: list[tuple[int, int]],
        ranks: list[int],
        device: torch.device,
        stored: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """New ``(A, B, regenerable)`` for the shared bases, or ``None`` to keep the current pair."""
        kind = basis_kind(config.sparse, config.very_sparse)
        needed = allocation(dims, ranks)
        current = self.randlora_bases
        if current is None:
            if stored is not None:
                a, b = stored
                have = BasesShape(r=min(a.shape[0], b.shape[2]), m_max=a.shape[2], M_max=b.shape[0], nb_max=b.shape[1])
                if not _windows_fit(have, dims, ranks):
                    raise ShapeError(f"the given bases {have} are too small for the adapted layers (need {needed})")
                return a, b, config.basis_rule == PORTABLE_RULE
            return (*generate_bases(config.projection_prng_key, needed, kind, device, config.basis_rule), True)
        have = current.shape
        result = None
        if not _windows_fit(have, dims, ranks):
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
            grown = BasesShape(
                r=max(have.r, needed.r),
                m_max=max(have.m_max, needed.m_max),
                M_max=max(have.M_max, needed.M_max),
                nb_max=max(have.nb_max, needed.nb_max),
            )
            a, b = generate_bases(current.seed, grown, current.kind, current.randlora_A.device)
            if not _same_on_overlap((a, b), (current.randlora_A, current.randlora_B)):
                raise ShapeError("the shared bases do not match the portable rule's values, so they cannot be regrown")
            result = (a, b, True)
        if stored is not None:
            mine = (result[0], result[1]) if result is not None else (current.randlora_A, current.randlora_B)
            if not _same_on_overlap(stored, mine):
                raise CheckpointError(
                    "the checkpoint's stored bases differ from the model's shared bases; one model holds one pair of "
                    "bases, so adapters with different bases cannot be combined"
                )
        return result

    def _add_adapter(
        self,
        adapter_name: str,
        config: RandLoraConfig,
        paths: list[str] | None = None,
        stored_bases: tuple[torch.Tensor, torch.Tensor] | None = None,
        warn: bool = True,
    ) -> None:
        load_plugins()
        self._check_new(adapter_name, config)
        saved = self._resolve_saved(config)
        if paths is None:
            paths = select_targets(self.model, config, _adaptable, _opaque)
        plan = self._plan_layers(paths, config, warn)
        new_paths = {p for p, _, _ in plan}
        dims = [(layer.in_features, layer.out_features) for _, layer, _ in plan]
        dims += [(layer.in_features, layer.out_features) for p, layer in self.named_randlora_layers() if p not in new_paths]
        ranks = [c.r for c in self.peft_config.values()] + [config.r]
        device = next((layer._param_device() for _, layer, _ in plan if hasattr(layer, "_param_device")), torch.device("cpu"))
        new_bases = self._plan_bases(config, dims, ranks, device, stored_bases)

        # Everything is validated; from here on the model changes.
        if new_bases is not None:
            a, b, regenerable = new_bases
            if self.randlora_bases is None:
                kind = basis_kind(config.sparse, config.very_sparse)
                self.randlora_bases = RandLoraBases(a.to(device), b.to(device), config.projection_prng_key, kind, regenerable)
            else:
                self.randlora_bases.replace(a, b, regenerable)
        if not self.peft_config:
            self.model.requires_grad_(False)
        for path, layer, is_new in plan:
            if is_new:
                self._replace(path, layer)
            layer.update_layer(adapter_name, config, self.randlora_bases)
        for path in saved:
            module = self.model.get_submodule(path)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                self._replace(path, module)
            module.add_adapter(adapter_name)
        self.peft_config[adapter_name] = config.model_copy(deep=True)
        self._targets[adapter_name] = list(paths)
        self._saved[adapter_name] = saved
        if not self._active:
            self._active = [adapter_name]
        self._apply_active()
        for param in self._bias_params(adapter_name).values():
            param.requires_grad_(True)

    def set_shared_bases(self, randlora_A: torch.Tensor, randlora_B: torch.Tensor, regenerable: bool = False) -> None:
        """Replace the shared bases (float32, any allocation covering every layer's windows).

        ``regenerable`` declares that the values follow the portable rule for the model's seed and kind
        (so the model may regrow them later).
        """
        if self.randlora_bases is None:
            raise ShapeError("the model has no adapters yet; add one before setting its bases")
        a, b = randlora_A.detach().to(torch.float32), randlora_B.detach().to(torch.float32)
        if a.dim() != 3 or b.dim() != 3:
            raise ShapeError(f"bases must be 3-D: A (r, 1, m_max), B (M_max, nb_max, r); got {tuple(a.shape)}, {tuple(b.shape)}")
        have = BasesShape(r=min(a.shape[0], b.shape[2]), m_max=a.shape[2], M_max=b.shape[0], nb_max=b.shape[1])
        dims = [(layer.in_features, layer.out_features) for _, layer in self.named_randlora_layers()]
        if not _windows_fit(have, dims, [c.r for c in self.peft_config.values()]):
            raise ShapeError(f"bases of allocation {have} are too small for the model's layers and ranks")
        self.randlora_bases.replace(a, b, regenerable)

    # -- active adapters ------------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters, in application order."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list when several (or none) are active (as PEFT)."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def _apply_active(self) -> None:
        for _, layer in self.named_randlora_layers():
            layer.set_adapter(self._active)
            for name in layer.randlora_lambda:
                layer.randlora_lambda[name].requires_grad_(name in self._active)
                layer.randlora_gamma[name].requires_grad_(name in self._active)
        for _, wrapper in self._modules_to_save():
            wrapper.set_adapter(self._active)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter or a list (applied in list order); only active adapters are trainable."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise AdapterNotFoundError(f"adapter(s) {missing} not found; the model has {list(self.peft_config)}")
        self._active = names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the remaining active ones (or the first adapter left) become active."""
        if adapter_name not in self.peft_config:
            raise AdapterNotFoundError(f"adapter {adapter_name!r} not found; the model has {list(self.peft_config)}")
        if adapter_name in self.merged_adapters:
            raise MergeError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        for _, layer in self.named_randlora_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self._modules_to_save():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name], self._targets[adapter_name], self._saved[adapter_name]
        if adapter_name in self._active:
            self._active = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
        self._apply_active()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model runs as the base model (adapters and modules_to_save copies off)."""
        if self.merged_adapters:
            raise MergeError(f"adapters {self.merged_adapters} are merged into the base weights; call unmerge_adapter() first")
        layers = [layer for _, layer in self.named_randlora_layers()]
        saved = [w for _, w in self._modules_to_save()]
        for module in layers:
            module.disable_adapters = True
        for wrapper in saved:
            wrapper.disabled = True
        try:
            yield
        finally:
            for module in layers:
                module.disable_adapters = False
            for wrapper in saved:
                wrapper.disabled = False

    # -- trainable parameters -------------------------------------------------------------------

    def _bias_params(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Trainable biases of an adapter, by module path, per its config's ``bias``."""
        mode = self.peft_config[adapter_name].bias
        out: dict[str, nn.Parameter] = {}
        if mode == "none":
            return out
        wanted = set(self._targets[adapter_name])
        for path, module in visible_modules(self.model, _opaque):
            if isinstance(module, ModulesToSaveWrapper) or (mode == "randlora_only" and path not in wanted):
                continue
            base = module.get_base_layer() if is_randlora_layer(module) else module
            bias = base._parameters.get("bias") if isinstance(base, nn.Module) else None
            if isinstance(bias, nn.Parameter) and (mode == "all" or is_randlora_layer(module)):
                out[path] = bias
        return out

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the whole model, adapters included."""
        params = list(self.parameters())
        return sum(_logical_numel(p) for p in params if p.requires_grad), sum(_logical_numel(p) for p in params)

    get_nb_trainable_parameters = trainable_parameters

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's format."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- merging --------------------------------------------------------------------------------

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters currently merged into base weights, in merge order."""
        out: list[str] = []
        for _, layer in self.named_randlora_layers():
            out += [n for n in layer.merged_adapters if n not in out]
        return out

    def merge_adapter(self, adapter_names: str | list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters (default: the active ones) into the base weights, in order.

        With ``safe_merge`` every layer's result is first computed on a copy and checked to be finite;
        on failure :class:`MergeError` is raised and no layer has changed.
        """
        names = self._names(adapter_names)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise AdapterNotFoundError(f"adapter(s) {missing} not found; the model has {list(self.peft_config)}")
        if not names:
            raise MergeError("no adapter to merge: none is active and none was named")
        already = [n for n in names if n in self.merged_adapters]
        if already:
            raise MergeError(f"adapter(s) {already} are already merged; unmerge_adapter() first to merge again")
        layers = [layer for _, layer in self.named_randlora_layers()]
        if safe_merge:
            for layer in layers:
                layer.check_merge([n for n in names if n in layer.randlora_lambda])
        for layer in layers:
            layer.merge([n for n in names if n in layer.randlora_lambda], safe_merge=False)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights (reverse order); MergeError if none is merged."""
        if not self.merged_adapters:
            raise MergeError("no adapter is merged, so there is nothing to unmerge")
        for _, layer in self.named_randlora_layers():
            if layer.merged:
                layer.unmerge()

    def _unload(self, keep_saved_copy: bool) -> nn.Module:
        for path, layer in list(self.named_randlora_layers()):
            self._replace(path, layer.get_base_layer())
        for path, wrapper in list(self._modules_to_save()):
            self._replace(path, wrapper.active_module() if keep_saved_copy else wrapper.original_module)
        return self.model

    def merge_and_unload(self, adapter_names: str | list[str] | None = None, safe_merge: bool = False) -> nn.Module:
        """Merge adapters (default: active ones not yet merged) and return the plain base model.

        RandLoRA layers are replaced by their (merged) base layers and ``modules_to_save`` wrappers by
        the active adapter's trained copy. The RandLoraModel must not be used afterwards.
        """
        names = self._names(adapter_names)
        pending = [n for n in names if n not in self.merged_adapters]
        if pending:
            self.merge_adapter(pending, safe_merge=safe_merge)
        return self._unload(keep_saved_copy=True)

    def unload(self) -> nn.Module:
        """Return the base model without adapters, unmerging merged adapters first.

        ``modules_to_save`` wrappers give back their original modules. The RandLoraModel must not be used afterwards.
        """
        if self.merged_adapters:
            self.unmerge_adapter()
        return self._unload(keep_saved_copy=False)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Write one adapter (default: the active one) to ``path`` in checkpoint format v1, atomically."""
        from randlora_core.checkpoint import save_adapter

        save_adapter(self, path, adapter_name)


def _same_on_overlap(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether two base pairs hold identical values on their common window."""
    for p, q in zip(x, y, strict=True):
        window = tuple(slice(0, min(a, b)) for a, b in zip(p.shape, q.shape, strict=True))
        if not torch.equal(p[window].to(q.device, torch.float32), q[window].to(torch.float32)):
            return False
    return True


def get_randlora_model(model: nn.Module, config: RandLoraConfig, adapter_name: str = "default") -> RandLoraModel:
    """Inject RandLoRA layers for ``config`` into ``model`` and wrap it.

    ``model`` is modified in place (targeted layers replaced, parameters frozen) only if this
    returns; on any error it is left unchanged.
    """
    if isinstance(model, RandLoraModel):
        raise ConfigError("model is already a RandLoraModel; call its add_adapter() instead")
    return RandLoraModel(model, config, adapter_name)
