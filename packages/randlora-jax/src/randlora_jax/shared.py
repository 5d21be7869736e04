"""The shared pair of random bases, held once per model (SPEC.md 3.1 and 3.9).

Every RandLoRA layer of a model references the same :class:`RandLoraBases` node, so the bases
exist once in the model's state however many layers and adapters use them. When an added adapter
needs a larger allocation they are regenerated at the union size; under the portable rule the
windows already in use keep their exact values (the slice property, SPEC 4.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from randlora_jax.arrays import to_device
from randlora_jax.bases import generate_bases
from randlora_jax.variables import RandLoraBasis
from randlora_spec.bases import PORTABLE_RULE, BasesShape, BasisKind, basis_kind, num_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class BasesIdentity:
    """What every adapter sharing the bases must agree on (SPEC 3.9)."""

    seed: int
    kind: BasisKind
    basis_rule: str
    save_projection: bool

    @classmethod
    def of(cls, config: RandLoraConfig) -> BasesIdentity:
        """The identity an adapter's config asks for."""
        kind = basis_kind(config.sparse, config.very_sparse)
        return cls(config.projection_prng_key, kind, config.basis_rule, config.save_projection)


def union_shape(have: BasesShape | None, r: int, layer_sizes: list[tuple[int, int]]) -> BasesShape:
    """The smallest allocation covering ``have`` and rank-``r`` windows of layers ``(I, O)``.

    ``m_max`` and ``M_max`` come from the largest input and output taken separately (SPEC 3.1);
    the basis axis must hold ``ceil(m_max / r)`` for every rank in use (SPEC 3.9).
    """
    largest_in = max(i for i, _ in layer_sizes)
    largest_out = max(o for _, o in layer_sizes)
    m_max, big_m = min(largest_in, largest_out), max(largest_in, largest_out)
    if have is not None:
        m_max, big_m = max(m_max, have.m_max), max(big_m, have.M_max)
        return BasesShape(r=max(r, have.r), m_max=m_max, M_max=big_m, nb_max=max(have.nb_max, num_bases(m_max, r)))
    return BasesShape(r=r, m_max=m_max, M_max=big_m, nb_max=num_bases(m_max, r))


def covers(have: BasesShape, need: BasesShape) -> bool:
    """Whether allocation ``have`` holds every window of ``need``."""
    return have.r >= need.r and have.m_max >= need.m_max and have.M_max >= need.M_max and have.nb_max >= need.nb_max


class RandLoraBases(nnx.Module):
    """The shared ``randlora_A`` ``(r, 1, m_max)`` and ``randlora_B`` ``(M_max, nb_max, r)``, float32, frozen.

    Args:
        identity: seed, kind, rule and ``save_projection`` of the adapters using the bases.
        a: the A basis.
        b: the B basis.
        regenerable: the values follow the portable rule for ``identity`` (generated here, or read
            from a file under that rule), so a larger allocation can be generated consistently.

    """

    def __init__(self, identity: BasesIdentity, a: jax.Array, b: jax.Array, regenerable: bool) -> None:
        self.identity = identity
        self.regenerable = regenerable
        self.randlora_A = RandLoraBasis(to_device(a, np.float32))
        self.randlora_B = RandLoraBasis(to_device(b, np.float32))

    @classmethod
    def generate(cls, identity: BasesIdentity, shape: BasesShape) -> RandLoraBases:
        """Bases generated with the portable rule for ``shape``."""
        a, b = generate_bases(identity.seed, shape, identity.kind, identity.basis_rule)
        return cls(identity, a, b, regenerable=True)

    @property
    def shape(self) -> BasesShape:
        """The current allocation."""
        a, b = self.randlora_A.get_value(), self.randlora_B.get_value()
        return BasesShape(r=int(a.shape[0]), m_max=int(a.shape[2]), M_max=int(b.shape[0]), nb_max=int(b.shape[1]))

    def check_identity(self, identity: BasesIdentity, what: str) -> None:
        """Raise ``ConfigError`` unless ``identity`` may share these bases (SPEC 3.9)."""
        mine = self.identity
        for field in ("seed", "kind", "basis_rule", "save_projection"):
            if getattr(identity, field) != getattr(mine, field):
                name = {"seed": "projection_prng_key", "kind": "sparse/very_sparse"}.get(field, field)
                raise ConfigError(
                    f"{what}: {name} is {getattr(identity, field)!r} but the model's shared bases use "
                    f"{getattr(mine, field)!r}; all adapters of a model share one pair of bases"
                )

    def plan_growth(self, need: BasesShape) -> BasesShape | None:
        """The allocation to grow to for ``need`` (None if already covered); raises if it cannot grow.

        Raises:
            ShapeError: the bases cannot be regenerated (not from the portable rule) or, for
                ``very_sparse``, growing would change ``m_max`` and with it every value.

        """
        have = self.shape
        if covers(have, need):
            return None
        grown = BasesShape(
            r=max(have.r, need.r),
            m_max=max(have.m_max, need.m_max),
            M_max=max(have.M_max, need.M_max),
            nb_max=max(have.nb_max, need.nb_max),
        )
        if not self.regenerable or self.identity.basis_rule != PORTABLE_RULE:
            raise ShapeError(
                f"the shared bases {have} do not cover {need} and cannot be regenerated "
                f"(they were not generated with {PORTABLE_RULE!r})"
            )
        if self.identity.kind == "very_sparse" and grown.m_max != have.m_max:
            raise ShapeError(
                f"very_sparse bases depend on m_max: growing from m_max={have.m_max} to {grown.m_max} would change the "
                "values the existing adapters use"
            )
        return grown

    def grow(self, shape: BasesShape) -> None:
        """Regenerate at ``shape`` (a superset of the current allocation; windows keep their values)."""
        a, b = generate_bases(self.identity.seed, shape, self.identity.kind, self.identity.basis_rule)
        self.randlora_A.set_value(a)
        self.randlora_B.set_value(b)

    def windows_equal(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether bases ``(a, b)`` equal the overlapping windows of the held ones, bit for bit."""
        mine_a, mine_b = np.asarray(self.randlora_A.get_value()), np.asarray(self.randlora_B.get_value())
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        wa = tuple(slice(0, min(x, y)) for x, y in zip(mine_a.shape, a.shape, strict=True))
        wb = tuple(slice(0, min(x, y)) for x, y in zip(mine_b.shape, b.shape, strict=True))
        return np.array_equal(mine_a[wa].view(np.uint32), a[wa].view(np.uint32)) and np.array_equal(
            mine_b[wb].view(np.uint32), b[wb].view(np.uint32)
        )
