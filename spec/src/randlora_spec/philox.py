"""Philox4x32-10, the counter-based generator behind the portable basis rule.

Written for clarity and checked against the Random123 known-answer vectors. Everything is
vectorised over counters with ``uint64`` arithmetic, so the 32x32 -> 64 bit products are exact.
"""

from __future__ import annotations

import numpy as np

from randlora_spec.errors import ConfigError, ShapeError

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
ROUNDS = 10
MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    product = np.uint64(a) * b.astype(np.uint64)
    return product >> np.uint64(32), product & np.uint64(MASK32)


def philox4x32(counter: np.ndarray, key: tuple[int, int], rounds: int = ROUNDS) -> np.ndarray:
    """Apply Philox4x32 to a batch of counters.

    Args:
        counter: unsigned integer array of shape ``(..., 4)`` holding 32-bit counter words.
        key: the two 32-bit key words ``(k0, k1)``.
        rounds: number of rounds; 10 is the standard (and the only value the spec uses).

    Returns:
        ``uint32`` array of shape ``(..., 4)``: the four output words per counter.

    """
    c = np.asarray(counter, dtype=np.uint64)
    if c.shape[-1] != 4:
        raise ShapeError(f"counter must have a trailing axis of 4 words, got shape {c.shape}")
    c0, c1, c2, c3 = (c[..., i] & np.uint64(MASK32) for i in range(4))
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    for round_index in range(rounds):
        if round_index > 0:
            # The key schedule bumps the key before every round but the first (Random123).
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def seed_to_key(seed: int) -> tuple[int, int]:
    """Split a 64-bit seed into the Philox key words: ``(low 32 bits, high 32 bits)``."""
    if not 0 <= int(seed) < 2**64:
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {seed}")
    seed = int(seed)
    return seed & MASK32, (seed >> 32) & MASK32
