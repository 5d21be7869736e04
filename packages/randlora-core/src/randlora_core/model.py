"""``RandLoraModel``: injects RandLoRA layers into any ``nn.Module`` and manages adapters.

One model holds one shared pair of bases (``randlora_bases``) sized for every adapter (SPEC 3.9).
Every method validates completely before modifying anything, so a call that raises leaves the
model as it was: adding an adapter is planned (:func:`~randlora_core.planning.plan_adapter`) and
then committed in one step. Errors: unknown adapter names :class:`AdapterNotFoundError`; bad
configs :class:`ConfigError`; bad targets :class:`TargetModuleError`; merge-state conflicts and
non-finite safe merges :class:`MergeError` (all in ``docs/errors.md``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from randlora_core.bases import RandLoraBases
from randlora_core.hotswap import hotswap_adapter
from randlora_core.inference_cache import InferenceCache
from randlora_core.mixed import BASE
from randlora_core.modules_to_save import ModulesToSaveWrapper
from randlora_core.peft_api import PeftApiMixin
from randlora_core.planning import AdapterPlan, check_unadapted, opaque, plan_adapter, windows_fit
from randlora_core.registry import is_randlora_layer
from randlora_core.state import FEATURES, build_checkpoint
from randlora_core.targeting import visible_modules
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import basis_kind
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import AdapterNotFoundError, ConfigError, MergeError, ShapeError
from randlora_spec.geometry import shape_of_bases

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from randlora_core.planning import PlanOptions
    from randlora_core.registry import LayerModule


class RandLoraModel(PeftApiMixin, nn.Module):
    """A model with RandLoRA adapters. Calls and unknown attributes go to the wrapped ``model``.

    Args:
        model: the model to adapt (modified in place: targeted layers are replaced by wrappers and
            its parameters frozen), unless this constructor raises.
        config: the first adapter's config; ``None`` creates a wrapper without adapters.
        adapter_name: name of the first adapter.
        autocast_adapter_dtype: lambda/gamma of float16/bfloat16 layers are float32 (PEFT's default).
        low_cpu_mem_usage: lambda/gamma empty on the meta device until :meth:`load_adapter` (PEFT's meaning).

    PEFT's model API (``save_pretrained``, ``from_pretrained``, status, ...) is :class:`~randlora_core.peft_api.PeftApiMixin`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: RandLoraConfig | None = None,
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        if isinstance(model, RandLoraModel):
            raise ConfigError("model is already a RandLoraModel; call its add_adapter() instead")
        check_unadapted(model)
        super().__init__()
        self.model = model
        self.randlora_bases: RandLoraBases | None = None
        self.peft_config: dict[str, RandLoraConfig] = {}
        self._active: list[str] = []
        self._targets: dict[str, list[str]] = {}
        self._saved: dict[str, list[str]] = {}
        self._trainable: set[str] = set()
        """Adapters whose parameters train (PEFT: the active ones, unless changed by ``set_requires_grad``)."""
        self._enabled = True
        if config is not None:
            self._add_adapter(
                adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
            )

    # -- plumbing -------------------------------------------------------------------------------

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Call the wrapped model; with ``adapter_names`` (one per sample) each row uses its own adapter.

        ``adapter_names[i]`` names the adapter for batch row ``i``, or ``"__base__"`` for the base
        model alone (PEFT's mixed-adapter batches). Rows are grouped by adapter, so ``k`` adapters
        cost about ``k`` adapter passes; row ``i`` equals a call with adapter ``adapter_names[i]``
        active. Not while adapters are merged.
        """
        if adapter_names is None:
            return self.model(*args, **kwargs)
        wrappers = self._mixed_wrappers(adapter_names)
        for wrapper in wrappers:
            wrapper.mixed_adapters = list(adapter_names)
        try:
            return self.model(*args, **kwargs)
        finally:
            for wrapper in wrappers:
                wrapper.mixed_adapters = None

    def _mixed_wrappers(self, adapter_names: list[str]) -> list[LayerModule | ModulesToSaveWrapper]:
        """The layers and saved-module wrappers a mixed-adapter call reaches, after checking the names."""
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise ConfigError(
                f"adapter_names must be a list of adapter names (one per sample), got {type(adapter_names).__name__}"
            )
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise AdapterNotFoundError(f"adapter_names: {unknown} not found; the model has {list(self.peft_config)} and {BASE!r}")
        if self.merged_adapters:
            raise MergeError(f"adapter_names cannot be used while adapters {self.merged_adapters} are merged; unmerge them first")
        return [layer for _, layer in self.named_randlora_layers()] + [w for _, w in self._modules_to_save()]

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

    def named_randlora_layers(self) -> Iterator[tuple[str, LayerModule]]:
        """``(path, wrapper)`` for every RandLoRA layer, with paths as in the base model."""
        for name, module in visible_modules(self.model, opaque):
            if is_randlora_layer(module):
                yield name, module

    def _modules_to_save(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in visible_modules(self.model, opaque):
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

    def add_adapter(
        self, adapter_name: str, config: RandLoraConfig, *, autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add a new adapter (not made active nor trainable; use :meth:`set_adapter`).

        ``autocast_adapter_dtype`` and ``low_cpu_mem_usage`` as for the constructor.

        Raises:
            ConfigError: the name is taken or invalid, the config disagrees with the model's
                other adapters on a shared field (``projection_prng_key``, ``save_projection``,
                ``sparse``, ``very_sparse``, ``basis_rule``), or it trains biases (``bias`` not
                ``"none"``) while another adapter does.
            TargetModuleError: the targets match nothing or something unadaptable.
            ShapeError: the shared bases cannot grow to cover the new adapter (see module docstring).

        """
        self._add_adapter(
            adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
        )

    def _add_adapter(self, adapter_name: str, config: RandLoraConfig, **options: Unpack[PlanOptions]) -> None:
        self._commit(plan_adapter(self, adapter_name, config, **options))

    def _commit(self, plan: AdapterPlan) -> None:
        """Apply a validated :class:`~randlora_core.planning.AdapterPlan` (the only place adding an adapter mutates)."""
        adapter_name, config, device = plan.name, plan.config, plan.device
        if plan.bases is not None:
            a, b, regenerable = plan.bases
            if self.randlora_bases is None:
                kind = basis_kind(config.sparse, config.very_sparse)
                self.randlora_bases = RandLoraBases(a.to(device), b.to(device), config.projection_prng_key, kind, regenerable)
            else:
                self.randlora_bases.replace(a, b, regenerable)
        bases = self.randlora_bases
        assert bases is not None, "a plan keeps the model's bases only when it has some"
        if not self.peft_config:
            self.model.requires_grad_(False)
        for path, layer, is_new in plan.layers:
            if is_new:
                self._replace(path, layer)
            layer.update_layer(adapter_name, config, bases, plan.autocast_adapter_dtype, plan.low_cpu_mem_usage)
        for path in plan.saved:
            module = self.model.get_submodule(path)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                self._replace(path, module)
            module.add_adapter(adapter_name)
        self.peft_config[adapter_name] = config.model_copy(deep=True)
        self._targets[adapter_name] = [path for path, _, _ in plan.layers]
        self._saved[adapter_name] = list(plan.saved)
        if not self._active:
            self._active = [adapter_name]
            self._trainable = {adapter_name}
        self._apply_active()

    def set_shared_bases(self, randlora_A: torch.Tensor, randlora_B: torch.Tensor, regenerable: bool = False) -> None:
        """Replace the shared bases (float32, any allocation covering every layer's windows).

        ``regenerable`` declares that the values follow the portable rule for the model's seed and kind
        (so the model may regrow them later).
        """
        if self.randlora_bases is None:
            raise ShapeError("the model has no adapters yet; add one before setting its bases")
        if not isinstance(randlora_A, torch.Tensor) or not isinstance(randlora_B, torch.Tensor):
            raise ShapeError(f"bases must be tensors, got {type(randlora_A).__name__} and {type(randlora_B).__name__}")
        a, b = randlora_A.detach().to(torch.float32), randlora_B.detach().to(torch.float32)
        if a.dim() != 3 or b.dim() != 3:
            raise ShapeError(f"bases must be 3-D: A (r, 1, m_max), B (M_max, nb_max, r); got {tuple(a.shape)}, {tuple(b.shape)}")
        for which, t in (("randlora_A", a), ("randlora_B", b)):
            if not bool(torch.isfinite(t).all()):
                raise ShapeError(f"{which} holds NaN or Inf values (after conversion to float32); bases must be finite")
        have = shape_of_bases(a.shape, b.shape)
        dims = [(layer.in_features, layer.out_features) for _, layer in self.named_randlora_layers()]
        if not windows_fit(have, dims, [c.r for c in self.peft_config.values()]):
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
        """Push the active adapters, the enabled state and trainability to every layer and wrapper."""
        for _, layer in self.named_randlora_layers():
            layer.set_adapter(self._active)
            layer.disable_adapters = not self._enabled
        for _, wrapper in self._modules_to_save():
            wrapper.set_adapter(self._active)
            wrapper.disabled = not self._enabled
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        """``requires_grad`` of every adapter parameter: its adapter is in ``_trainable`` and adapters are enabled.

        That covers lambda/gamma (and DoRA magnitudes), ``modules_to_save`` copies and the biases of the (one)
        adapter that trains them.
        """
        wanted = self._trainable if self._enabled else set()
        for _, layer in self.named_randlora_layers():
            for name in layer.randlora_lambda:
                layer.randlora_lambda[name].requires_grad_(name in wanted)
                layer.randlora_gamma[name].requires_grad_(name in wanted)
                if name in layer.randlora_magnitude:
                    layer.randlora_magnitude[name].requires_grad_(name in wanted)
        for _, wrapper in self._modules_to_save():
            for name, copy in wrapper.modules_to_save.items():
                copy.requires_grad_(name in wanted)
        for name in self.peft_config:
            for param in self._bias_params(name).values():
                param.requires_grad_(name in wanted)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter or a list (applied in list order); they, and only they, become trainable.

        With ``inference_mode`` no adapter is trainable afterwards (PEFT's meaning).

        Raises:
            AdapterNotFoundError: an unknown name.
            ConfigError: two of the adapters hold a ``modules_to_save`` copy of the same module (only
                one copy of a module can run; PEFT refuses the same).

        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise AdapterNotFoundError(f"adapter(s) {missing} not found; the model has {list(self.peft_config)}")
        for path, wrapper in self._modules_to_save():
            holders = [n for n in names if n in wrapper.modules_to_save]
            if len(holders) > 1:
                raise ConfigError(
                    f"adapters {holders} each hold a modules_to_save copy of {path!r}; only one copy of a module can be "
                    "active, so these adapters cannot be active together"
                )
        self._active = names
        self._trainable = set() if inference_mode else set(names)
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the remaining active ones (or the first adapter left) become active."""
        if adapter_name not in self.peft_config:
            raise AdapterNotFoundError(f"adapter {adapter_name!r} not found; the model has {list(self.peft_config)}")
        if adapter_name in self.merged_adapters:
            raise MergeError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        for param in self._bias_params(adapter_name).values():
            param.requires_grad_(False)  # the base model's own biases stay, frozen again
        for _, layer in self.named_randlora_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self._modules_to_save():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name], self._targets[adapter_name], self._saved[adapter_name]
        self._trainable.discard(adapter_name)
        if adapter_name in self._active:
            self._active = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
            self._trainable |= set(self._active)
        self._apply_active()

    # -- trainable parameters -------------------------------------------------------------------

    def _bias_params(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Trainable biases of an adapter, by module path, per its config's ``bias``."""
        mode = self.peft_config[adapter_name].bias
        out: dict[str, nn.Parameter] = {}
        if mode == "none":
            return out
        wanted = set(self._targets[adapter_name])
        for path, module in visible_modules(self.model, opaque):
            if isinstance(module, ModulesToSaveWrapper) or (mode == "randlora_only" and path not in wanted):
                continue
            base = module.get_base_layer() if is_randlora_layer(module) else module
            bias = base._parameters.get("bias") if isinstance(base, nn.Module) else None
            if isinstance(bias, nn.Parameter) and (mode == "all" or is_randlora_layer(module)):
                out[path] = bias
        return out

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

    def enable_inference_cache(self, max_bytes: int | None = None, weights: bool = True) -> InferenceCache:
        """Reuse, in calls without gradients, what each layer rebuilds per call (:mod:`randlora_core.inference_cache`).

        ``weights=True`` keeps ``W + delta_W`` per layer (about one more copy of the adapted
        weights: unmerged inference then costs what merged inference does); ``weights=False``
        keeps the scaled bases. ``max_bytes`` bounds the memory: entries are kept in the order
        layers ask for them, and a layer whose entry no longer fits runs uncached (evicting would
        thrash in a pass over the layers). Returns the cache (``nbytes``, ``hits``, ``misses``).
        """
        cache = InferenceCache(max_bytes, weights)
        for _, layer in self.named_randlora_layers():
            layer.inference_cache = cache
        return cache

    def disable_inference_cache(self) -> None:
        """Stop caching and free what the cache holds."""
        for _, layer in self.named_randlora_layers():
            cache = getattr(layer, "inference_cache", None)
            if cache is not None:
                cache.clear()
                layer.inference_cache = None

    def hotswap_adapter(self, checkpoint: str | Path | spec_ckpt.AdapterCheckpoint, adapter_name: str = "default") -> None:
        """Replace the loaded adapter's values in place (see :func:`randlora_core.hotswap.hotswap_adapter`)."""
        hotswap_adapter(self, checkpoint, adapter_name)

    def save_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Write one adapter (default: the active one) to ``path`` in checkpoint format v1, atomically."""
        spec_ckpt.save(path, build_checkpoint(self, adapter_name), readable_features=FEATURES)


def get_randlora_model(
    model: nn.Module,
    config: RandLoraConfig,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> RandLoraModel:
    """Inject RandLoRA layers for ``config`` into ``model`` and wrap it (PEFT's ``get_peft_model``).

    ``model`` is modified in place (targeted layers replaced, parameters frozen) only if this
    returns; on any error it is left unchanged. ``autocast_adapter_dtype`` and
    ``low_cpu_mem_usage`` as for :class:`RandLoraModel`.
    """
    return RandLoraModel(
        model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
    )
