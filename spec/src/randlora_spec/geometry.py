"""Layer geometry and the allocation of the shared bases (SPEC.md 3.1 and 3.9), defined once.

Every implementation asks the same four questions, and answers them here:

- what a layer of ``(in, out)`` needs from the bases for an adapter of rank ``r``
  (:class:`LayerGeometry`: ``m``, ``M``, ``nb`` and the window ``A[:r, 0, :m]``, ``B[:M, :nb, :r]``);
- whether an allocation holds that window (:meth:`BasesShape.holds`) or another allocation
  (:meth:`BasesShape.covers`);
- which allocation a set of layers and ranks needs (:func:`allocation`, SPEC 3.9);
- which allocation a pair of basis tensors is (:func:`shape_of_bases`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from randlora_spec.errors import ShapeError

RANK_CEILING = 4096
"""The largest ``r`` accepted above every adapted layer's larger side.

Such a rank adds no rank to the update; PEFT accepts it and small test models use it. Each unit of
``r`` still costs ``in + out`` basis values per layer, so an unbounded ``r`` in a config or a file
would ask for memory that no model needs.
"""


def rank_is_bounded(r: int, largest_side: int) -> bool:
    """Whether rank ``r`` is within :data:`RANK_CEILING` or the largest adapted side, whichever is larger."""
    return r <= max(largest_side, RANK_CEILING)


def num_bases(m: int, r: int) -> int:
    """Number of rank-r bases needed for full rank on the smaller side: ``ceil(m / r)``."""
    if r < 1 or m < 1:
        raise ShapeError(f"num_bases needs m >= 1 and r >= 1, got m={m}, r={r}")
    return -(-m // r)


@dataclass(frozen=True)
class Sides:
    """A layer's two sides, ``in_features`` and ``out_features``, and the spec's names for them (SPEC 3.1)."""

    in_features: int
    out_features: int

    @property
    def m(self) -> int:
        """The smaller side, on which the trainable scaling acts."""
        return min(self.in_features, self.out_features)

    @property
    def M(self) -> int:  # noqa: N802 - the spec's symbol
        """The larger side."""
        return max(self.in_features, self.out_features)


@dataclass(frozen=True)
class LayerGeometry(Sides):
    """Sizes derived from a layer's (in_features, out_features) and the adapter rank r (SPEC 3.1)."""

    r: int

    @property
    def nb(self) -> int:
        """Number of bases: ``ceil(m / r)``."""
        return num_bases(self.m, self.r)

    @property
    def in_le_out(self) -> bool:
        """True when the update is ``s * P`` (not transposed)."""
        return self.in_features <= self.out_features

    @property
    def lambda_shape(self) -> tuple[int, int]:
        """Shape of the trainable ``lambda``: ``(r, nb)``."""
        return (self.r, self.nb)

    @property
    def gamma_shape(self) -> tuple[int, int]:
        """Shape of the trainable ``gamma``: ``(nb, m)``."""
        return (self.nb, self.m)

    @property
    def window(self) -> BasesShape:
        """The smallest allocation holding this layer's windows ``A[:r, 0, :m]`` and ``B[:M, :nb, :r]``."""
        return BasesShape(r=self.r, m_max=self.m, M_max=self.M, nb_max=self.nb)


@dataclass(frozen=True)
class BasesShape:
    """The allocation of the shared bases: A is (r, 1, m_max), B is (M_max, nb_max, r)."""

    r: int
    m_max: int
    M_max: int
    nb_max: int

    @property
    def a_shape(self) -> tuple[int, int, int]:
        """Shape of the shared A basis."""
        return (self.r, 1, self.m_max)

    @property
    def b_shape(self) -> tuple[int, int, int]:
        """Shape of the shared B basis."""
        return (self.M_max, self.nb_max, self.r)

    @property
    def elements(self) -> int:
        """Number of basis values in the allocation (A and B together)."""
        return self.r * self.m_max + self.M_max * self.nb_max * self.r

    def covers(self, other: BasesShape) -> bool:
        """True when every window of ``other`` lies inside this allocation."""
        return self.r >= other.r and self.m_max >= other.m_max and self.M_max >= other.M_max and self.nb_max >= other.nb_max

    def holds(self, geom: LayerGeometry) -> bool:
        """True when this allocation holds the windows ``geom`` reads (SPEC 3.1)."""
        return self.covers(geom.window)

    def union(self, other: BasesShape) -> BasesShape:
        """The smallest allocation covering both (elementwise maximum)."""
        return BasesShape(
            r=max(self.r, other.r),
            m_max=max(self.m_max, other.m_max),
            M_max=max(self.M_max, other.M_max),
            nb_max=max(self.nb_max, other.nb_max),
        )

    def check_holds(self, geom: LayerGeometry, what: str = "the shared bases") -> None:
        """Raise :class:`ShapeError` naming the window unless this allocation holds ``geom``'s windows."""
        if not self.holds(geom):
            raise ShapeError(
                f"{what} {self} are too small for a layer {geom.in_features}x{geom.out_features} with r={geom.r}: "
                f"it needs windows A[:{geom.r}, 0, :{geom.m}] and B[:{geom.M}, :{geom.nb}, :{geom.r}]"
            )


def shape_of_bases(a_shape: Sequence[int], b_shape: Sequence[int]) -> BasesShape:
    """The allocation a pair of basis tensors of these shapes provides (A ``(r, 1, m_max)``, B ``(M_max, nb_max, r)``).

    A's and B's rank axes may differ in a hand-made pair; the usable rank is the smaller one.
    """
    if len(a_shape) != 3 or a_shape[1] != 1 or len(b_shape) != 3:
        raise ShapeError(f"bases must be A (r, 1, m_max) and B (M_max, nb_max, r); got {tuple(a_shape)} and {tuple(b_shape)}")
    return BasesShape(r=int(min(a_shape[0], b_shape[2])), m_max=int(a_shape[2]), M_max=int(b_shape[0]), nb_max=int(b_shape[1]))


def allocation(layers: Iterable[tuple[int, int]], ranks: Iterable[int]) -> BasesShape:
    """The allocation for targeted layers ``(in_features, out_features)`` and adapter ranks (SPEC 3.1, 3.9).

    The largest input and the largest output are taken separately over all layers, then
    ``M_max = max(largest_in, largest_out)``, ``m_max = min(largest_in, largest_out)``; the rank axis
    is the largest rank and ``nb_max`` the most bases any rank needs on ``m_max`` (the smallest rank's).
    """
    sizes = [(int(i), int(o)) for i, o in layers]
    rs = [int(r) for r in ranks]
    if not sizes or not rs:
        raise ShapeError("an allocation needs at least one layer shape and one rank")
    largest_in, largest_out = max(i for i, _ in sizes), max(o for _, o in sizes)
    m_max = min(largest_in, largest_out)
    return BasesShape(r=max(rs), m_max=m_max, M_max=max(largest_in, largest_out), nb_max=max(num_bases(m_max, r) for r in rs))


def bases_shape_for_layers(layer_shapes: Iterable[tuple[int, int]], r: int) -> BasesShape:
    """:func:`allocation` for one rank (what PEFT allocates for one adapter)."""
    return allocation(layer_shapes, [r])
