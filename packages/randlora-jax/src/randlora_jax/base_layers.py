"""Which Flax NNX layers RandLoRA adapts, and how it reads, writes and reuses their kernels.

A layer is adaptable when it is a plain linear map ``y = x @ K + bias`` over the last axis of ``x``:
``nnx.Linear`` (kernel ``(I, O)``) and ``nnx.Einsum`` whose equation has that form, such as
``"...i,io->...o"`` or ``"bti,oi->bto"`` (kernel ``(I, O)`` or ``(O, I)``), with no bias or a bias
of shape ``(O,)``. Anything else is rejected by name, never adapted approximately.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from randlora_spec.errors import TargetModuleError

BaseLinear = nnx.Linear | nnx.Einsum
"""The layer types :func:`describe` can accept (an ``nnx.Einsum`` only with a plain-linear equation)."""


@dataclass(frozen=True)
class LinearView:
    """A base layer seen as a linear map: logical sizes and how its kernel is stored."""

    in_features: int
    out_features: int
    kernel_in_out: bool
    """The kernel is stored ``(I, O)`` (Flax's convention); False for an einsum kernel stored ``(O, I)``."""


def _einsum_view(layer: nnx.Einsum) -> LinearView | None:
    """The view of an ``nnx.Einsum`` whose equation is ``<lead>a,<ab or ba>-><lead>b``, else None."""
    equation = (layer.einsum_str or "").replace(" ", "")
    if equation.count("->") != 1 or equation.count(",") != 1:
        return None
    operands, out = equation.split("->")
    x_spec, k_spec = operands.split(",")
    kernel = layer.kernel.get_value()
    if len(k_spec) != 2 or k_spec[0] == k_spec[1] or "." in k_spec or kernel.ndim != 2 or not x_spec:
        return None
    lead, contracted = x_spec[:-1], x_spec[-1]
    if contracted not in k_spec or any(c in k_spec for c in lead):
        return None
    produced = k_spec.replace(contracted, "")
    if out != lead + produced or len(set(lead.replace(".", ""))) != len(lead.replace(".", "")):
        return None
    in_out = k_spec == contracted + produced
    size_in, size_out = (kernel.shape[0], kernel.shape[1]) if in_out else (kernel.shape[1], kernel.shape[0])
    bias = layer.bias.get_value() if layer.bias is not None else None
    if bias is not None and tuple(bias.shape) != (size_out,):
        return None
    return LinearView(int(size_in), int(size_out), in_out)


def describe(layer: Any) -> LinearView | None:
    """The linear view of an adaptable layer, or None when RandLoRA cannot adapt it."""
    if isinstance(layer, nnx.Linear):
        return LinearView(int(layer.in_features), int(layer.out_features), True)
    if isinstance(layer, nnx.Einsum):
        return _einsum_view(layer)
    return None


def view_of(layer: Any) -> LinearView:
    """The linear view of a layer selected as adaptable.

    Raises:
        TargetModuleError: ``layer`` is not a linear map RandLoRA can adapt.

    """
    view = describe(layer)
    if view is None:
        raise TargetModuleError(f"{type(layer).__name__} is not a linear layer RandLoRA can adapt")
    return view


def is_adaptable(layer: Any) -> bool:
    """Whether ``layer`` is a linear map RandLoRA can wrap."""
    return describe(layer) is not None


def dense_forward_possible(layer: Any) -> bool:
    """Whether the base forward may be re-run with a replaced kernel: exactly Linear or Einsum, no subclass."""
    return type(layer) in (nnx.Linear, nnx.Einsum)


def call_with_kernel(layer: BaseLinear, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """The layer's own forward on ``x`` with ``kernel`` (storage layout) in place of its kernel.

    The layer is not modified: a copy of its graph is built around the new kernel, so promotion,
    precision, the dot product and the bias are exactly the layer's.
    """
    graphdef, kernel_state, *rest = nnx.split(layer, nnx.PathContains("kernel"), ...)  # rest: the one other state
    kernel_state = jax.tree.map(lambda _: kernel, kernel_state)
    out: jax.Array = nnx.merge(graphdef, kernel_state, *rest)(x)
    return out


def kernel_in_out(layer: BaseLinear, view: LinearView) -> jax.Array:
    """The kernel as an ``(I, O)`` array."""
    kernel: jax.Array = layer.kernel.get_value()
    return kernel if view.kernel_in_out else kernel.T


def add_to_kernel(layer: BaseLinear, view: LinearView, delta_in_out: jax.Array, sign: int = 1) -> None:
    """``kernel += sign * delta`` in the kernel's storage layout and dtype (merging, SPEC 3.7)."""
    layer.kernel.set_value(_added(layer.kernel.get_value(), delta_in_out, float(sign), view.kernel_in_out))


@functools.partial(jax.jit, static_argnames=("in_out",))
def _added(kernel: jax.Array, delta_in_out: jax.Array, sign: float, in_out: bool) -> jax.Array:
    delta = delta_in_out if in_out else delta_in_out.T
    return kernel + (sign * delta).astype(kernel.dtype)


def kernel_dtype(layer: BaseLinear) -> jnp.dtype:
    """The dtype the kernel is stored in."""
    dtype: jnp.dtype = jnp.dtype(layer.kernel.get_value().dtype)
    return dtype


@functools.partial(jax.jit, static_argnames=("view", "dtype"))
def as_stored(delta_in_out: jax.Array, view: LinearView, dtype: jnp.dtype) -> jax.Array:
    """An ``(I, O)`` update in the kernel's storage layout and dtype."""
    return (delta_in_out if view.kernel_in_out else delta_in_out.T).astype(dtype)
