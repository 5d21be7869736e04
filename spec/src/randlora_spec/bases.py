"""The portable basis-generation rule ``randlora-philox4x32-10-v1`` (SPEC.md section 4).

Every basis element is a pure function of (seed, tensor tag, coordinates): Philox4x32-10 is keyed
with the 64-bit seed and fed the counter ``(i0, i1, i2, tag)`` where ``(i0, i1, i2)`` are the
element's coordinates in the 3-D basis tensor. Output word 0 is mapped to a float32 value with
integer-only steps plus one correctly rounded float32 multiply, so every IEEE-754 implementation
produces the same bits. Slicing a basis generated for a large shape therefore gives exactly the
basis generated for the smaller shape.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from randlora_spec.errors import BasisRuleError, ShapeError
from randlora_spec.geometry import BasesShape, bases_shape_for_layers, num_bases
from randlora_spec.philox import philox4x32, seed_to_key

PORTABLE_RULE = "randlora-philox4x32-10-v1"
"""Identifier of the portable rule defined here (the default ``basis_rule``)."""

PEFT_RULE = "peft-torch-v1"
"""Identifier of PEFT's machine-dependent rule; only an implementation that runs PEFT can use it."""

TAG_A = 0x41  # ASCII "A"
TAG_B = 0x42  # ASCII "B"

DENSE_SCALE = np.float32(math.sqrt(3.0) / 2**24)
"""fl32(sqrt(3) / 2**24): maps the odd integers in (-2**24, 2**24) to unit variance."""

SPARSE_S = 3
"""Sparsity parameter s of the ``sparse`` kind: P(+1) = P(-1) = 1/(2s)."""

BasisKind = Literal["dense", "sparse", "very_sparse"]


def _words(seed: int, tag: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Philox output word 0 for every coordinate of a 3-D tensor of ``shape`` with ``tag``."""
    grids = np.meshgrid(*(np.arange(n, dtype=np.uint64) for n in shape), indexing="ij")
    counter = np.stack([*grids, np.full(shape, tag, dtype=np.uint64)], axis=-1)
    words: np.ndarray = philox4x32(counter, seed_to_key(seed))[..., 0]
    return words


def dense_from_words(words: np.ndarray) -> np.ndarray:
    """Map 32-bit words to zero-mean, unit-variance uniform float32 values, bit-exactly."""
    n = 2 * (words.astype(np.int64) >> 8) + 1 - 2**24  # odd integer, |n| < 2**24: exact in float32
    values: np.ndarray = n.astype(np.float32) * DENSE_SCALE
    return values


def sparse_threshold(kind: BasisKind, m_max: int) -> int:
    """Integer threshold T: a word w maps to -1 if w < T, +1 if T <= w < 2T, else 0.

    T = floor(2**31 / s) so that P(-1) = P(+1) = T / 2**32 ~= 1/(2s). For ``very_sparse``,
    s = sqrt(m_max) and T = isqrt(2**62 // m_max), which equals floor(2**31 / sqrt(m_max)) exactly.
    """
    if kind == "sparse":
        return 2**31 // SPARSE_S
    if kind == "very_sparse":
        if m_max < 1:
            raise ShapeError(f"very_sparse needs m_max >= 1, got {m_max}")
        return math.isqrt(2**62 // m_max)
    raise BasisRuleError(f"sparse_threshold: kind must be 'sparse' or 'very_sparse', got {kind!r}")


def sparse_scale(threshold: int) -> np.float32:
    """fl32(sqrt(fl64(2**31 / T))): makes the ternary values unit variance (P(nonzero) = T / 2**31)."""
    scale: np.float32 = np.float32(math.sqrt(2**31 / threshold))
    return scale


def ternary_from_words(words: np.ndarray, threshold: int) -> np.ndarray:
    """Map 32-bit words to {-c, 0, +c} float32 values with the exact integer threshold T."""
    w = words.astype(np.int64)
    sign = np.where(w < threshold, -1, np.where(w < 2 * threshold, 1, 0)).astype(np.float32)
    return sign * sparse_scale(threshold)


def generate_basis(
    seed: int, tag: int, shape: tuple[int, int, int], kind: BasisKind = "dense", m_max: int | None = None
) -> np.ndarray:
    """One basis tensor (float32) of ``shape`` under the portable rule.

    Args:
        seed: 64-bit seed (``projection_prng_key``).
        tag: ``TAG_A`` or ``TAG_B``.
        shape: 3-D shape to allocate; any window of a larger allocation holds the same values.
        kind: ``dense``, ``sparse`` or ``very_sparse``.
        m_max: the model's m_max, required for ``very_sparse`` (it sets the sparsity).

    """
    if tag not in (TAG_A, TAG_B):
        raise BasisRuleError(f"tag must be TAG_A (0x41) or TAG_B (0x42), got {tag:#x}")
    if len(shape) != 3 or any(int(n) < 0 or int(n) >= 2**32 for n in shape):
        raise ShapeError(f"basis shape must be 3 sizes in [0, 2**32), got {shape}")
    words = _words(seed, tag, (int(shape[0]), int(shape[1]), int(shape[2])))
    if kind == "dense":
        return dense_from_words(words)
    if kind == "very_sparse" and m_max is None:
        raise ShapeError("very_sparse bases need m_max (the sparsity is s = sqrt(m_max))")
    return ternary_from_words(words, sparse_threshold(kind, m_max or 0))


def basis_kind(sparse: bool, very_sparse: bool) -> BasisKind:
    """The basis kind selected by the config flags (they are mutually exclusive)."""
    if sparse and very_sparse:
        raise BasisRuleError("sparse and very_sparse are mutually exclusive")
    return "very_sparse" if very_sparse else "sparse" if sparse else "dense"


def require_portable(basis_rule: str, implementation: str) -> None:
    """Raise :class:`BasisRuleError` unless ``basis_rule`` is the portable rule, the only one ``implementation`` generates."""
    if basis_rule != PORTABLE_RULE:
        raise BasisRuleError(
            f"basis_rule {basis_rule!r} cannot be generated by {implementation}; it implements only {PORTABLE_RULE!r}"
        )


def generate_bases(
    seed: int, shape: BasesShape, kind: BasisKind = "dense", basis_rule: str = PORTABLE_RULE
) -> tuple[np.ndarray, np.ndarray]:
    """The shared pair (A, B) for an allocation, as float32 arrays.

    Raises:
        BasisRuleError: if ``basis_rule`` is not the portable rule (the reference implements no other).

    """
    require_portable(basis_rule, "the reference")
    a = generate_basis(seed, TAG_A, shape.a_shape, kind, shape.m_max)
    b = generate_basis(seed, TAG_B, shape.b_shape, kind, shape.m_max)
    return a, b


__all__ = [
    "DENSE_SCALE",
    "PEFT_RULE",
    "PORTABLE_RULE",
    "SPARSE_S",
    "TAG_A",
    "TAG_B",
    "BasesShape",
    "BasisKind",
    "bases_shape_for_layers",
    "basis_kind",
    "dense_from_words",
    "generate_bases",
    "generate_basis",
    "num_bases",
    "sparse_scale",
    "sparse_threshold",
    "ternary_from_words",
]
