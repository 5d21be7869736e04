"""Philox4x32-10 in JAX with 32-bit unsigned arithmetic only (SPEC.md section 4.1).

JAX disables 64-bit integers unless ``jax_enable_x64`` is set, and forcing that on users changes
the default dtype of every array they create. The 32x32 -> 64-bit product of the round function is
therefore split into 16-bit halves, each partial product fitting a ``uint32`` exactly; the result
is bit-identical to the specification's exact 64-bit ``mulhilo`` on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from randlora_spec.errors import ConfigError

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF
_LOW16 = 0xFFFF


def mulhilo(a: int, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """High and low 32-bit words of the exact product ``a * b`` for a constant ``a`` and ``uint32`` words ``b``."""
    a_lo, a_hi = jnp.uint32(a & _LOW16), jnp.uint32(a >> 16)
    b_lo, b_hi = b & jnp.uint32(_LOW16), b >> 16
    lo_lo, lo_hi, hi_lo = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo  # each < 2**32: exact
    # Carry out of the low 32 bits: the three partial sums that reach bit 32, each below 2**17.
    middle = (lo_lo >> 16) + (lo_hi & _LOW16) + (hi_lo & _LOW16)
    hi = a_hi * b_hi + (lo_hi >> 16) + (hi_lo >> 16) + (middle >> 16)
    return hi, jnp.uint32(a) * b  # uint32 multiplication wraps modulo 2**32: the low word


def philox4x32(
    c0: jax.Array, c1: jax.Array, c2: jax.Array, c3: jax.Array, k0: jax.Array, k1: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Philox4x32-10 on broadcastable ``uint32`` counter words ``c0..c3`` with key words ``k0, k1``.

    Returns the four ``uint32`` output words. Traceable: call it under :func:`jax.jit`.
    """
    for round_index in range(ROUNDS):
        if round_index > 0:  # the key is bumped before every round but the first
            k0 = k0 + jnp.uint32(PHILOX_W0)
            k1 = k1 + jnp.uint32(PHILOX_W1)
        hi0, lo0 = mulhilo(PHILOX_M0, c0)
        hi1, lo1 = mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


philox4x32_jit = jax.jit(philox4x32)
""":func:`philox4x32` compiled once per input shape."""


def seed_to_key(seed: int) -> tuple[int, int]:
    """The Philox key words ``(low 32 bits, high 32 bits)`` of a 64-bit seed.

    Raises:
        ConfigError: ``seed`` is not an integer in ``[0, 2**64)``.

    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError(f"projection_prng_key (seed) must be an integer in [0, 2**64), got {seed!r}")
    return seed & MASK32, seed >> 32
