import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from randlora_spec.bases import (
    DENSE_SCALE,
    PEFT_RULE,
    TAG_A,
    TAG_B,
    BasesShape,
    bases_shape_for_layers,
    dense_from_words,
    generate_bases,
    generate_basis,
    num_bases,
    sparse_scale,
    sparse_threshold,
    ternary_from_words,
)
from randlora_spec.errors import BasisRuleError, ShapeError


def test_dense_scale_is_the_rounded_constant():
    assert DENSE_SCALE == np.float32(math.sqrt(3.0) / 2**24)
    assert DENSE_SCALE.dtype == np.float32


def test_dense_mapping_extremes_and_symmetry():
    words = np.array([0, 0xFF, 0x100, 0xFFFFFFFF, 0x80000000], dtype=np.uint32)
    values = dense_from_words(words)
    n = np.array([1 - 2**24, 1 - 2**24, 3 - 2**24, 2**24 - 1, 1], dtype=np.float32)
    assert np.array_equal(values, n * DENSE_SCALE)
    assert values[0] == -values[3]  # the mapping is symmetric around zero
    assert np.all(np.abs(values) < np.float32(math.sqrt(3)))


def test_dense_bases_have_unit_variance():
    a = generate_basis(3, TAG_A, (64, 1, 512))
    assert a.dtype == np.float32
    assert abs(float(a.mean())) < 0.02
    assert abs(float(a.var()) - 1.0) < 0.02


@pytest.mark.parametrize("m_max", [1, 2, 3, 4, 10, 100, 4096, 12345, 2**31])
def test_very_sparse_threshold_is_exact(m_max):
    t = sparse_threshold("very_sparse", m_max)
    # T = floor(2**31 / sqrt(m_max))  <=>  T^2 * m_max <= 2**62 < (T + 1)^2 * m_max
    assert t * t * m_max <= 2**62 < (t + 1) * (t + 1) * m_max


def test_sparse_threshold_and_values():
    t = sparse_threshold("sparse", 0)
    assert t == 715827882 == 2**31 // 3
    words = np.array([0, t - 1, t, 2 * t - 1, 2 * t, 2**32 - 1], dtype=np.uint32)
    c = sparse_scale(t)
    assert np.array_equal(ternary_from_words(words, t), np.array([-c, -c, c, c, 0, 0], dtype=np.float32))


@pytest.mark.parametrize(("kind", "s"), [("sparse", 3.0), ("very_sparse", math.sqrt(400))])
def test_ternary_frequencies_and_variance(kind, s):
    shape = BasesShape(r=16, m_max=400, M_max=400, nb_max=25)
    _, b = generate_bases(9, shape, kind)
    c = sparse_scale(sparse_threshold(kind, 400))
    assert set(np.unique(b).tolist()) == {-float(c), 0.0, float(c)}
    assert abs(float((b > 0).mean()) - 1 / (2 * s)) < 0.01
    assert abs(float((b < 0).mean()) - 1 / (2 * s)) < 0.01
    assert abs(float(b.var()) - 1.0) < 0.05


def test_tags_give_different_streams():
    a = generate_basis(1, TAG_A, (4, 1, 8))
    b = generate_basis(1, TAG_B, (4, 1, 8))
    assert not np.array_equal(a, b)


def test_seed_changes_values():
    assert not np.array_equal(generate_basis(1, TAG_A, (4, 1, 8)), generate_basis(2, TAG_A, (4, 1, 8)))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    r=st.integers(1, 6),
    m=st.integers(1, 12),
    big_m=st.integers(1, 12),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    kind=st.sampled_from(["dense", "sparse"]),
)
def test_slice_property(seed, r, m, big_m, extra, kind):
    """A basis allocated for a larger shape, sliced, equals the basis allocated for the smaller one."""
    m, big_m = min(m, big_m), max(m, big_m)
    small = BasesShape(r, m, big_m, num_bases(m, r))
    large = BasesShape(r + extra[0], m + extra[1], big_m + extra[1] + extra[2], num_bases(m, r) + extra[3])
    sa, sb = generate_bases(seed, small, kind)
    la, lb = generate_bases(seed, large, kind)
    assert np.array_equal(la[: small.r, :, : small.m_max], sa)
    assert np.array_equal(lb[: small.M_max, : small.nb_max, : small.r], sb)


def test_very_sparse_slice_property_at_equal_m_max():
    small, large = BasesShape(4, 16, 24, 4), BasesShape(8, 16, 40, 4)
    sa, sb = generate_bases(5, small, "very_sparse")
    la, lb = generate_bases(5, large, "very_sparse")
    assert np.array_equal(la[:4, :, :16], sa)
    assert np.array_equal(lb[:24, :4, :4], sb)


def test_bases_shape_follows_peft():
    # largest in and largest out are taken separately: (64 -> 128) and (128 -> 32) give 128 x 128.
    shape = bases_shape_for_layers([(64, 128), (128, 32)], 8)
    assert shape == BasesShape(r=8, m_max=128, M_max=128, nb_max=16)
    assert shape.a_shape == (8, 1, 128) and shape.b_shape == (128, 16, 8)
    assert bases_shape_for_layers([(10, 14)], 4) == BasesShape(4, 10, 14, 3)


def test_errors():
    with pytest.raises(ShapeError, match="at least one layer"):
        bases_shape_for_layers([], 4)
    with pytest.raises(ShapeError, match="r >= 1"):
        num_bases(10, 0)
    with pytest.raises(BasisRuleError, match="not implemented"):
        generate_bases(0, BasesShape(1, 1, 1, 1), basis_rule=PEFT_RULE)
    with pytest.raises(BasisRuleError, match="tag"):
        generate_basis(0, 0x43, (1, 1, 1))
    with pytest.raises(ShapeError, match="m_max"):
        generate_basis(0, TAG_A, (1, 1, 1), "very_sparse")
