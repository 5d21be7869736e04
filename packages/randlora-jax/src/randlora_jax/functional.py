"""The layer math of SPEC.md sections 3.1 to 3.6 as pure, traceable JAX functions.

Everything here works in the *kernel* orientation of Flax, ``(I, O)`` with ``y = x @ K``: the
specification's ``delta_W`` is ``(O, I)``, so the kernel update is its transpose. Gradients come
from JAX's autodiff; the products are arranged so that autodiff yields exactly SPEC 3.6.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from randlora_spec.bases import num_bases
from randlora_spec.errors import ShapeError


@dataclass(frozen=True)
class AdapterMath:
    """What the math needs of one adapter on one layer: rank, scale and the trainable arrays."""

    r: int
    scaling: float
    lam: jax.Array
    gamma: jax.Array


def compute_dtype(param_dtype: jnp.dtype) -> jnp.dtype:
    """Dtype of the adapter math (SPEC 5.2): the parameters' own, with half precision upcast to float32.

    The specification asks for the upcast on CPU; XLA's CPU and GPU kernels accumulate half
    precision products the same way, so doing it everywhere keeps one code path.
    """
    dtype = jnp.dtype(param_dtype)
    return jnp.dtype(jnp.float32) if dtype in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)) else dtype


def windows(a: jax.Array, b: jax.Array, in_features: int, out_features: int, r: int) -> tuple[jax.Array, jax.Array]:
    """A layer's windows of the shared bases: ``A[:r, 0, :m]`` (r, m) and ``B[:M, :nb, :r]`` (M, nb, r)."""
    m, big_m = min(in_features, out_features), max(in_features, out_features)
    nb = num_bases(m, r)
    if a.ndim != 3 or a.shape[1] != 1 or b.ndim != 3:
        raise ShapeError(f"bases must be A (r, 1, m_max) and B (M_max, nb_max, r); got {a.shape} and {b.shape}")
    if a.shape[0] < r or a.shape[2] < m or b.shape[0] < big_m or b.shape[1] < nb or b.shape[2] < r:
        raise ShapeError(
            f"shared bases A {a.shape}, B {b.shape} are too small for a {in_features}x{out_features} layer with r={r} "
            f"(need A >= ({r}, 1, {m}), B >= ({big_m}, {nb}, {r}))"
        )
    return a[:r, 0, :m], b[:big_m, :nb, :r]


def scaled_basis(a_s: jax.Array, lam: jax.Array, gamma: jax.Array) -> jax.Array:
    """``S_flat`` (r*nb, m): row ``k*nb + b`` is ``lam[k, b] * A_s[k, :] * gamma[b, :]`` (SPEC 3.2)."""
    s = (lam[:, :, None] * a_s[:, None, :]) * gamma[None, :, :]
    return s.reshape(-1, a_s.shape[1])


def flat_b(b_s: jax.Array) -> jax.Array:
    """``B_flat`` (M, nb*r): column ``b*r + k`` is ``B_s[:, b, k]`` (SPEC 3.3)."""
    return b_s.reshape(b_s.shape[0], -1)


def _factors(
    adapter: AdapterMath, a: jax.Array, b: jax.Array, in_features: int, out_features: int, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """``(S_flat, B_flat)`` of one adapter in the compute dtype, with the bases rounded to it (SPEC 5.1)."""
    a_s, b_s = windows(a, b, in_features, out_features, adapter.r)
    lam, gamma = adapter.lam.astype(dtype), adapter.gamma.astype(dtype)
    return scaled_basis(a_s.astype(dtype), lam, gamma), flat_b(b_s.astype(dtype))


def delta_kernel(
    adapter: AdapterMath, a: jax.Array, b: jax.Array, in_features: int, out_features: int, dtype: jnp.dtype
) -> jax.Array:
    """``delta_W^T``, the update in kernel orientation ``(I, O)``, in ``dtype`` (SPEC 3.4).

    ``P = B_flat @ S_flat`` is ``(M, m)``; ``delta_W = s * P`` when ``I <= O``, else ``s * P^T``.
    """
    s_flat, b_flat = _factors(adapter, a, b, in_features, out_features, dtype)
    p = b_flat @ s_flat
    scaled = p * jnp.asarray(adapter.scaling, dtype)
    return scaled.T if in_features <= out_features else scaled


def factored_output(
    x: jax.Array, adapter: AdapterMath, a: jax.Array, b: jax.Array, in_features: int, out_features: int
) -> jax.Array:
    """``x @ delta_W^T`` without forming ``delta_W``: two thin products through ``r*nb`` (SPEC 3.5).

    ``x`` must already be in the compute dtype.
    """
    s_flat, b_flat = _factors(adapter, a, b, in_features, out_features, x.dtype)
    scale = jnp.asarray(adapter.scaling, x.dtype)
    if in_features <= out_features:
        return ((x @ s_flat.T) * scale) @ b_flat.T
    return ((x @ b_flat) * scale) @ s_flat


def summed_delta_kernel(
    adapters: Sequence[AdapterMath], a: jax.Array, b: jax.Array, in_features: int, out_features: int, dtype: jnp.dtype
) -> jax.Array:
    """The sum of the kernel updates of ``adapters``, in list order (SPEC 3.5, dense evaluation)."""
    total = delta_kernel(adapters[0], a, b, in_features, out_features, dtype)
    for adapter in adapters[1:]:
        total = total + delta_kernel(adapter, a, b, in_features, out_features, dtype)
    return total


@functools.partial(jax.jit, static_argnames=("r", "scaling", "in_features", "out_features"))
def delta_kernel_of(
    lam: jax.Array, gamma: jax.Array, a: jax.Array, b: jax.Array, r: int, scaling: float, in_features: int, out_features: int
) -> jax.Array:
    """One adapter's kernel update ``(I, O)`` in its compute dtype, compiled (merging, ``get_delta_weight``)."""
    adapter = AdapterMath(r, scaling, lam, gamma)
    return delta_kernel(adapter, a, b, in_features, out_features, compute_dtype(lam.dtype))
