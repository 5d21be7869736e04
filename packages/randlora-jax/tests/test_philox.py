"""Philox4x32-10 in uint32 arithmetic against the Random123 known answers and exact integer products."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from randlora_jax.philox import PHILOX_M0, PHILOX_M1, mulhilo, philox4x32_jit, seed_to_key
from randlora_spec.errors import ConfigError
from randlora_spec.philox import philox4x32 as reference_philox

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter words, key words -> output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_known_answer_vectors(counter, key, expected):
    words = philox4x32_jit(*(jnp.uint32(c) for c in counter), jnp.uint32(key[0]), jnp.uint32(key[1]))
    assert all(w.dtype == jnp.uint32 for w in words)
    assert tuple(int(w) for w in words) == expected


def test_batched_matches_the_spec_generator_for_many_counters():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(257, 4), dtype=np.uint64)
    key = (0x12345678, 0x9ABCDEF0)
    ours = philox4x32_jit(*(jnp.asarray(counters[:, i], jnp.uint32) for i in range(4)), jnp.uint32(key[0]), jnp.uint32(key[1]))
    expected = reference_philox(counters, key)
    assert np.array_equal(np.stack([np.asarray(w) for w in ours], axis=-1), expected)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([PHILOX_M0, PHILOX_M1]), st.integers(0, 2**32 - 1))
def test_mulhilo_is_the_exact_64_bit_product(a, b):
    hi, lo = mulhilo(a, jnp.asarray([b], jnp.uint32))
    assert (int(hi[0]) << 32) | int(lo[0]) == a * b


def test_extreme_operands():
    for b in (0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x80000000):
        hi, lo = mulhilo(PHILOX_M0, jnp.asarray([b], jnp.uint32))
        assert (int(hi[0]) << 32) | int(lo[0]) == PHILOX_M0 * b


def test_seed_to_key_splits_low_high():
    assert seed_to_key(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)
    assert seed_to_key(2**64 - 1) == (0xFFFFFFFF, 0xFFFFFFFF)
    for bad in (2**64, -1, True, 1.0):
        with pytest.raises(ConfigError, match="projection_prng_key"):
            seed_to_key(bad)
