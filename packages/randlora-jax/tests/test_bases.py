"""The portable basis rule in JAX is bit-identical to randlora_spec's for every kind and shape."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from randlora_jax import generate_bases, generate_basis
from randlora_jax.bases import MIN_BUCKET
from randlora_spec.bases import TAG_A, TAG_B, BasesShape
from randlora_spec.bases import generate_basis as spec_basis
from randlora_spec.errors import BasisRuleError, ConfigError, ShapeError


def bits(x) -> np.ndarray:
    a = np.asarray(x)
    assert a.dtype == np.float32
    return a.view(np.uint32)


# SPEC.md 4.3 worked examples: (seed, tag, index, value bits).
DENSE_EXAMPLES = [
    (0, TAG_A, (0, 0, 0), 0xBF2CD28D),
    (0, TAG_B, (0, 0, 0), 0xBFA6ECE7),
    (2**40 + 3, TAG_B, (5, 2, 1), 0x3F8AC6EC),
    (2**64 - 1, TAG_A, (3, 0, 7), 0xBE8DDD0F),
]


@pytest.mark.parametrize(("seed", "tag", "index", "expected"), DENSE_EXAMPLES)
def test_spec_worked_examples(seed, tag, index, expected):
    shape = tuple(i + 1 for i in index)
    assert int(bits(generate_basis(seed, tag, shape))[index]) == expected


def test_sparse_worked_examples():
    values = bits(generate_basis(99, TAG_A, (2, 1, 7), "sparse"))
    assert values[0, 0, 2] == 0x3FDDB3D7 and values[1, 0, 6] == 0xBFDDB3D7 and values[0, 0, 0] == 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    shape=st.tuples(st.integers(0, 9), st.integers(0, 4), st.integers(0, 9)),
    kind=st.sampled_from(["dense", "sparse", "very_sparse"]),
    m_max=st.integers(1, 70),
    tag=st.sampled_from([TAG_A, TAG_B]),
)
def test_bit_identical_to_the_spec(seed, shape, kind, m_max, tag):
    ours = generate_basis(seed, tag, shape, kind, m_max)
    assert ours.shape == shape
    assert np.array_equal(bits(ours), bits(spec_basis(seed, tag, shape, kind, m_max)))


@pytest.mark.parametrize("count", [MIN_BUCKET - 1, MIN_BUCKET, MIN_BUCKET + 1])
def test_bucket_boundaries(count):
    shape = (1, 1, count)
    assert np.array_equal(bits(generate_basis(7, TAG_B, shape)), bits(spec_basis(7, TAG_B, shape)))


def test_very_sparse_with_m_max_one_has_no_zeros():
    values = np.asarray(generate_basis(3, TAG_B, (8, 2, 4), "very_sparse", 1))
    assert set(np.unique(values)) <= {-1.0, 1.0}
    assert np.array_equal(bits(values), bits(spec_basis(3, TAG_B, (8, 2, 4), "very_sparse", 1)))


def test_zeros_are_positive_zero():
    values = bits(generate_basis(0, TAG_B, (16, 4, 4), "sparse"))
    assert (values == 0).any() and not (values == 0x80000000).any()


def test_slice_property():
    big = BasesShape(r=8, m_max=40, M_max=48, nb_max=5)
    small = BasesShape(r=4, m_max=12, M_max=20, nb_max=3)
    a_big, b_big = generate_bases(1234, big)
    a, b = generate_bases(1234, small)
    assert np.array_equal(bits(a_big)[:4, :, :12], bits(a))
    assert np.array_equal(bits(b_big)[:20, :3, :4], bits(b))


def test_rejections():
    with pytest.raises(BasisRuleError, match="peft-torch-v1"):
        generate_bases(0, BasesShape(4, 4, 4, 1), basis_rule="peft-torch-v1")
    with pytest.raises(BasisRuleError, match="tag"):
        generate_basis(0, 0x43, (1, 1, 1))
    with pytest.raises(BasisRuleError, match="kind"):
        generate_basis(0, TAG_A, (1, 1, 1), "gaussian")
    with pytest.raises(ShapeError, match="3 sizes"):
        generate_basis(0, TAG_A, (1, 1))
    with pytest.raises(ShapeError, match="m_max"):
        generate_basis(0, TAG_A, (1, 1, 1), "very_sparse")
    with pytest.raises(ShapeError, match="2\\*\\*32"):
        generate_basis(0, TAG_A, (2**16, 2**8, 2**8))
    with pytest.raises(ConfigError, match="projection_prng_key"):
        generate_basis(-1, TAG_A, (1, 1, 1))
