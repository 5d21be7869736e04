"""The portable basis rule ``randlora-philox4x32-10-v1`` in JAX (SPEC.md sections 4.2 to 4.5).

Every element is a pure function of the seed, the tensor tag and its coordinates: the counter is
``(i0, i1, i2, tag)``, output word 0 of Philox4x32-10 is mapped to float32 with integer steps and
one float32 multiply (dense) or with exact integer thresholds (sparse, very sparse). The generator
is compiled once per shape and kind; the seed is a traced argument, so new seeds do not recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from randlora_jax.arrays import to_device
from randlora_jax.philox import philox4x32, seed_to_key
from randlora_spec import bases as rule
from randlora_spec.bases import BasesShape, BasisKind
from randlora_spec.errors import BasisRuleError, ShapeError

_KINDS = ("dense", "sparse", "very_sparse")
MIN_BUCKET = 1 << 12
"""Smallest flat size compiled for; sizes are rounded up to a power of two so one program serves many shapes."""


@functools.partial(jax.jit, static_argnames=("size", "ternary"))
def _basis_values(
    k0: jax.Array,
    k1: jax.Array,
    dims: jax.Array,
    tag: jax.Array,
    threshold: jax.Array,
    scale: jax.Array,
    size: int,
    ternary: bool,
) -> jax.Array:
    """Values of the first ``size`` elements, in row-major order, of a 3-D basis with sizes ``dims``.

    The coordinates come from the flat index by exact integer division, so the program depends on
    ``size`` only, not on the shape: one compilation per power-of-two bucket.
    """
    flat = jax.lax.iota(jnp.uint32, size)
    inner = dims[1] * dims[2]
    i0, rest = flat // inner, flat % inner
    i1, i2 = rest // dims[2], rest % dims[2]
    words = philox4x32(i0, i1, i2, jnp.broadcast_to(tag, flat.shape), k0, k1)[0]
    return ternary_from_words(words, threshold, scale) if ternary else dense_from_words(words)


def dense_from_words(words: jax.Array) -> jax.Array:
    """Map 32-bit words to float32 values: ``fl32(fl32(2 * (w >> 8) + 1 - 2**24) * DENSE_SCALE)``."""
    n = 2 * (words >> 8).astype(jnp.int32) + (1 - 2**24)  # odd, |n| < 2**24: exact in int32 and float32
    values: jax.Array = n.astype(jnp.float32) * jnp.float32(rule.DENSE_SCALE)
    return values


def ternary_from_words(words: jax.Array, threshold: jax.Array, scale: jax.Array) -> jax.Array:
    """Map words to ``-c`` (``w < T``), ``+c`` (``T <= w < 2T``) or ``+0.0``, comparing integers exactly.

    ``2T`` reaches ``2**32`` when ``T = 2**31`` (``very_sparse`` with ``m_max = 1``), which ``uint32``
    cannot hold, so the upper test is the equivalent ``w - T < T`` on words already ``>= T``.
    """
    negative = words < threshold
    positive = ~negative & (words - threshold < threshold)
    zero = jnp.zeros_like(words, jnp.float32)  # +0.0 by construction, never -0.0
    return jnp.where(negative, -scale, jnp.where(positive, scale, zero))


def _bucket(count: int) -> int:
    return max(MIN_BUCKET, 1 << (count - 1).bit_length())


def generate_basis(
    seed: int, tag: int, shape: tuple[int, int, int], kind: BasisKind = "dense", m_max: int | None = None
) -> jax.Array:
    """One basis tensor (float32) of ``shape``, bit-identical to ``randlora_spec.bases.generate_basis``.

    Args:
        seed: 64-bit seed (``projection_prng_key``).
        tag: ``TAG_A`` (0x41) or ``TAG_B`` (0x42).
        shape: 3-D allocation; any window of a larger allocation holds the same values.
        kind: ``dense``, ``sparse`` or ``very_sparse``.
        m_max: the allocation's m_max; required for ``very_sparse`` (it sets the sparsity).

    Raises:
        BasisRuleError: unknown tag or kind.
        ShapeError: not three sizes in ``[0, 2**32)``, or ``very_sparse`` without a valid ``m_max``.
        ConfigError: ``seed`` outside ``[0, 2**64)``.

    """
    if tag not in (rule.TAG_A, rule.TAG_B):
        raise BasisRuleError(f"tag must be TAG_A (0x41) or TAG_B (0x42), got {tag!r}")
    if kind not in _KINDS:
        raise BasisRuleError(f"basis kind must be one of {_KINDS}, got {kind!r}")
    if len(shape) != 3 or any(isinstance(n, bool) or int(n) != n or not 0 <= int(n) < 2**32 for n in shape):
        raise ShapeError(f"basis shape must be 3 sizes in [0, 2**32), got {shape}")
    k0, k1 = seed_to_key(seed)
    dims = tuple(int(n) for n in shape)
    count = dims[0] * dims[1] * dims[2]
    if kind == "very_sparse" and m_max is None:
        raise ShapeError("very_sparse bases need m_max (the sparsity is s = sqrt(m_max))")
    if count >= 2**32:
        raise ShapeError(f"basis shape {dims} has {count} elements; this generator handles fewer than 2**32")
    if count == 0:
        return jnp.zeros(dims, jnp.float32)
    threshold = rule.sparse_threshold(kind, m_max or 0) if kind != "dense" else 1
    values = _basis_values(
        jnp.uint32(k0),
        jnp.uint32(k1),
        to_device(dims, np.uint32),
        jnp.uint32(tag),
        jnp.uint32(threshold),
        jnp.float32(rule.sparse_scale(threshold)),
        size=_bucket(count),
        ternary=kind != "dense",
    )
    # Cut on the host: slicing on the device would compile one program per shape, the bucket's only once.
    return to_device(np.asarray(values)[:count].reshape(dims))


def generate_bases(
    seed: int, shape: BasesShape, kind: BasisKind = "dense", basis_rule: str = rule.PORTABLE_RULE
) -> tuple[jax.Array, jax.Array]:
    """The shared pair ``(A, B)`` of an allocation: ``A`` is ``(r, 1, m_max)``, ``B`` is ``(M_max, nb_max, r)``.

    Raises:
        BasisRuleError: ``basis_rule`` is not the portable rule (the only one JAX can regenerate).

    """
    rule.require_portable(basis_rule, "randlora-jax")
    a = generate_basis(seed, rule.TAG_A, shape.a_shape, kind, shape.m_max)
    b = generate_basis(seed, rule.TAG_B, shape.b_shape, kind, shape.m_max)
    return a, b
