"""The RandLoRA wrapper of one linear layer (SPEC.md sections 3.5 to 3.8).

:class:`RandLoraLinear` holds the base layer (``nnx.Linear`` or a plain-linear ``nnx.Einsum``), a
reference to the model's shared :class:`~randlora_jax.shared.RandLoraBases`, and per adapter a
trainable ``lambda`` ``(r, nb)`` and ``gamma`` ``(nb, m)`` (:class:`RandLoraParam`) and an optional
``nnx.Dropout`` on the adapter input. Per call it adds the active adapters factored, or folds their
``delta_W`` into the base matmul (the dense path), as :mod:`randlora_jax.compute` decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from randlora_jax import base_layers
from randlora_jax.arrays import to_device
from randlora_jax.compute import choose_path
from randlora_jax.functional import AdapterMath, compute_dtype, delta_kernel_of, factored_output, summed_delta_kernel
from randlora_jax.shared import RandLoraBases
from randlora_jax.variables import RandLoraParam, set_trainable
from randlora_spec.bases import num_bases
from randlora_spec.errors import AdapterNotFoundError, DtypeError, MergeError, ShapeError, TargetModuleError


@dataclass(frozen=True)
class AdapterSpec:
    """The static part of one adapter on one layer."""

    r: int
    scaling: float
    compute: str


class RandLoraLinear(nnx.Module):
    """RandLoRA around a linear base layer; behaves like the base layer plus the active adapters.

    Args:
        base_layer: an ``nnx.Linear`` or an ``nnx.Einsum`` computing ``x @ K (+ bias)``.
        bases: the model's shared bases (the same object for every layer).
        fan_in_fan_out: the layout bit recorded in checkpoints for this layer (SPEC 6.2): False for
            a layer that is PyTorch's ``nn.Linear`` counterpart, True for GPT-2 ``Conv1D``-style
            layers. Flax kernels are ``(I, O)`` either way; the bit changes no computation.

    Raises:
        TargetModuleError: ``base_layer`` is not a linear map RandLoRA can adapt.

    """

    def __init__(self, base_layer: nnx.Module, bases: RandLoraBases, fan_in_fan_out: bool = False) -> None:
        view = base_layers.describe(base_layer)
        if view is None or not isinstance(base_layer, base_layers.BaseLinear):  # describe() accepts only these
            raise TargetModuleError(f"{type(base_layer).__name__} is not a linear layer RandLoRA can adapt")
        self.base_layer: base_layers.BaseLinear = base_layer
        self.randlora_bases = bases
        self.view = view
        self.in_features, self.out_features = view.in_features, view.out_features
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.randlora_lambda: nnx.Dict[RandLoraParam] = nnx.Dict()
        self.randlora_gamma: nnx.Dict[RandLoraParam] = nnx.Dict()
        self.randlora_dropout: nnx.Dict[nnx.Dropout] = nnx.Dict()
        self.specs: tuple[tuple[str, AdapterSpec], ...] = ()
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: tuple[str, ...] = ()
        self.disabled = False

    # -- adapters ---------------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, AdapterSpec]:
        """The adapters this layer holds, in insertion order."""
        return dict(self.specs)

    def geometry(self, r: int) -> tuple[int, int]:
        """``(nb, m)`` of a rank-``r`` adapter on this layer."""
        m = min(self.in_features, self.out_features)
        return num_bases(m, r), m

    def add(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float,
        init_weights: bool,
        compute: str,
        rngs: nnx.Rngs,
    ) -> None:
        """Create adapter ``name``: lambda, gamma (SPEC 3.8) in the kernel's dtype, and its dropout."""
        nb, m = self.geometry(r)
        dtype = base_layers.kernel_dtype(self.base_layer)
        # Constants are built on the host: device-side fills would compile one program per shape.
        if init_weights:
            lam = to_device(np.zeros((r, nb), dtype))
            gamma = to_device(np.full((nb, m), 1.0 / max(nb, m), dtype))
        else:
            lam = jax.random.normal(rngs.params(), (r, nb), dtype)
            gamma = to_device(np.full((nb, m), 1.0 / max(self.in_features, self.out_features), dtype))
        self.randlora_lambda[name] = RandLoraParam(lam, adapter=name)
        self.randlora_gamma[name] = RandLoraParam(gamma, adapter=name)
        if dropout > 0:
            self.randlora_dropout[name] = nnx.Dropout(dropout, rngs=rngs)
        self.specs = (*self.specs, (name, AdapterSpec(r, float(alpha) / r, compute)))
        self._mark_trainable()

    def set_parameters(self, name: str, lam: jax.Array | np.ndarray, gamma: jax.Array | np.ndarray) -> None:
        """Replace adapter ``name``'s lambda and gamma (cast to their current dtype); shapes must match."""
        for store, value, what in ((self.randlora_lambda, lam, "lambda"), (self.randlora_gamma, gamma, "gamma")):
            current = store[name].get_value()
            if tuple(value.shape) != tuple(current.shape):
                raise ShapeError(f"{what} of adapter {name!r} must have shape {current.shape}, got {value.shape}")
            store[name].set_value(to_device(value, current.dtype))

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` (not merged)."""
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged; unmerge it before deleting it")
        for store in (self.randlora_lambda, self.randlora_gamma, self.randlora_dropout):
            if name in store:
                del store[name]
        self.specs = tuple((n, s) for n, s in self.specs if n != name)
        self.active_adapters = tuple(n for n in self.active_adapters if n != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        """Activate ``names`` (list order is the order of summation); names this layer lacks are skipped."""
        self.active_adapters = tuple(names)
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        active = set(self.active_adapters)
        for name in self.adapters:
            set_trainable(self.randlora_lambda[name], name in active)
            set_trainable(self.randlora_gamma[name], name in active)

    def _math(self, name: str) -> AdapterMath:
        spec = self.adapters[name]
        return AdapterMath(spec.r, spec.scaling, self.randlora_lambda[name].get_value(), self.randlora_gamma[name].get_value())

    # -- delta_W and merging ----------------------------------------------------------------------

    def delta_kernel(self, name: str) -> jax.Array:
        """Adapter ``name``'s update in ``(I, O)`` orientation, in the adapter's compute dtype."""
        if name not in self.adapters:
            raise AdapterNotFoundError(f"adapter {name!r} is not on this layer (has {list(self.adapters)})")
        spec = self.adapters[name]
        lam, gamma = self.randlora_lambda[name].get_value(), self.randlora_gamma[name].get_value()
        a, b = self.randlora_bases.randlora_A.get_value(), self.randlora_bases.randlora_B.get_value()
        delta: jax.Array = delta_kernel_of(lam, gamma, a, b, spec.r, spec.scaling, self.in_features, self.out_features)
        return delta

    def get_delta_weight(self, name: str) -> jax.Array:
        """Adapter ``name``'s update in the base kernel's storage layout and dtype (what merging adds)."""
        stored: jax.Array = base_layers.as_stored(self.delta_kernel(name), self.view, base_layers.kernel_dtype(self.base_layer))
        return stored

    def merge(self, names: list[str]) -> None:
        """Add each adapter's update to the base kernel, in list order (SPEC 3.7)."""
        for name in names:
            if name in self.merged_adapters:
                raise MergeError(f"adapter {name!r} is already merged into this layer")
        for name in names:
            if name in self.adapters:
                base_layers.add_to_kernel(self.base_layer, self.view, self.delta_kernel(name), 1)
                self.merged_adapters = (*self.merged_adapters, name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's update, in reverse merge order (SPEC 3.7)."""
        for name in reversed(self.merged_adapters):
            base_layers.add_to_kernel(self.base_layer, self.view, self.delta_kernel(name), -1)
        self.merged_adapters = ()

    # -- forward ----------------------------------------------------------------------------------

    def _contributing(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]

    def _dropout_active(self, names: list[str]) -> bool:
        return any(n in self.randlora_dropout and not self.randlora_dropout[n].deterministic for n in names)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """Base output plus every active, unmerged adapter (SPEC 3.5); the result has ``x``'s dtype."""
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise DtypeError(f"RandLoRA layer input must be a floating-point array, got dtype {jnp.result_type(x)}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ShapeError(f"input of shape {x.shape} does not end in in_features = {self.in_features}")
        names = self._contributing()
        if not names:
            return self.base_layer(x, *args, **kwargs).astype(x.dtype)
        specs = self.adapters
        ranks = [specs[n].r for n in names]
        tokens = math.prod(x.shape[:-1])
        kernel_dtype = base_layers.kernel_dtype(self.base_layer)
        cdtype = compute_dtype(self.randlora_lambda[names[0]].get_value().dtype)
        dense_possible = (
            not args
            and not kwargs
            and base_layers.dense_forward_possible(self.base_layer)
            and cdtype == kernel_dtype
            and not self._dropout_active(names)
        )
        modes = {specs[n].compute for n in names}
        mode = modes.pop() if len(modes) == 1 else "auto"
        path = choose_path(mode, tokens, self.in_features, self.out_features, ranks, dense_possible)
        if path == "dense":
            return self._dense(x, names, cdtype)
        return self._factored(x, names, cdtype, args, kwargs)

    def _factored(
        self, x: jax.Array, names: list[str], cdtype: jnp.dtype, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> jax.Array:
        y = self.base_layer(x, *args, **kwargs)
        a, b = self.randlora_bases.randlora_A.get_value(), self.randlora_bases.randlora_B.get_value()

        def adapter_output(name: str) -> jax.Array:
            x_in = self.randlora_dropout[name](x) if name in self.randlora_dropout else x
            return factored_output(x_in.astype(cdtype), self._math(name), a, b, self.in_features, self.out_features)

        total = adapter_output(names[0])  # never empty: without adapters __call__ runs the base layer alone
        for name in names[1:]:
            total = total + adapter_output(name)
        dtype = jnp.promote_types(y.dtype, total.dtype)
        return (y.astype(dtype) + total.astype(dtype)).astype(x.dtype)

    def _dense(self, x: jax.Array, names: list[str], cdtype: jnp.dtype) -> jax.Array:
        specs = self.adapters
        base, view = self.base_layer, self.view
        sizes = (self.in_features, self.out_features)

        def run(
            x_: jax.Array,
            kernel: jax.Array,
            lams: tuple[jax.Array, ...],
            gammas: tuple[jax.Array, ...],
            a: jax.Array,
            b: jax.Array,
        ) -> jax.Array:
            adapters = [
                AdapterMath(specs[n].r, specs[n].scaling, lam, gam) for n, lam, gam in zip(names, lams, gammas, strict=True)
            ]
            delta = summed_delta_kernel(adapters, a, b, *sizes, cdtype)
            effective = kernel + (delta if view.kernel_in_out else delta.T).astype(kernel.dtype)
            return base_layers.call_with_kernel(base, effective, x_)

        # Under remat the effective kernel is rebuilt in the backward pass instead of being kept.
        y: jax.Array = jax.checkpoint(run)(
            x,
            base.kernel.get_value(),
            tuple(self.randlora_lambda[n].get_value() for n in names),
            tuple(self.randlora_gamma[n].get_value() for n in names),
            self.randlora_bases.randlora_A.get_value(),
            self.randlora_bases.randlora_B.get_value(),
        )
        return y.astype(x.dtype)
