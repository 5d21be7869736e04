"""Float64 reference implementation of RandLoRA: the executable form of SPEC.md.

Written for clarity, not speed. Sections mirror SPEC.md: layer geometry (section 3.1), the scaled
basis and delta-W with PEFT's pairing order (3.2-3.4), forward (3.5), backward (3.6) and
merge/unmerge (3.7). All arithmetic is float64; inputs of other dtypes are upcast first.

Every reduction is correctly rounded (each product is an IEEE float64 product, and the sum of the
products is exact before one final rounding, via ``math.fsum``). BLAS summation order differs
between CPUs; this does not, so the golden fixtures are byte-identical on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from randlora_spec.errors import AdapterNotFoundError, ShapeError
from randlora_spec.geometry import LayerGeometry, shape_of_bases


def exact_sum(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Correctly rounded float64 sum along ``axis`` (platform-independent, unlike ``np.sum``)."""
    moved = np.moveaxis(np.asarray(values, np.float64), axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    sums = np.fromiter((math.fsum(row) for row in rows), dtype=np.float64, count=rows.shape[0])
    return sums.reshape(moved.shape[:-1])


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for ``a`` (..., k) and 2-D ``b`` (k, n), with correctly rounded dot products."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lead = a64.shape[:-1]
    a2 = a64.reshape(-1, a64.shape[-1])
    out = np.empty((a2.shape[0], b64.shape[1]))
    for i, row in enumerate(a2):  # one row at a time keeps the (k, n) product block small
        out[i] = exact_sum(row[:, None] * b64, axis=0)
    return out.reshape(*lead, b64.shape[1])


@dataclass(frozen=True)
class Adapter:
    """One adapter's state on one layer: rank, alpha and the trainable lambda (r, nb), gamma (nb, m)."""

    r: int
    alpha: float
    lam: np.ndarray
    gamma: np.ndarray

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return float(self.alpha) / self.r


def slice_bases(a: np.ndarray, b: np.ndarray, geom: LayerGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Window of the shared bases used by a layer: A[:r, 0, :m] -> (r, m), B[:M, :nb, :r] -> (M, nb, r)."""
    shape_of_bases(a.shape, b.shape).check_holds(geom, "the given bases")
    r, m, big_m, nb = geom.r, geom.m, geom.M, geom.nb
    return np.asarray(a[:r, 0, :m], np.float64), np.asarray(b[:big_m, :nb, :r], np.float64)


def scaled_basis(a_slice: np.ndarray, lam: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """S_flat (r*nb, m) with ``S_flat[k*nb + b, j] = lam[k, b] * A[k, j] * gamma[b, j]`` (SPEC 3.2)."""
    lam, gamma = np.asarray(lam, np.float64), np.asarray(gamma, np.float64)
    s: np.ndarray = lam[:, :, None] * a_slice[:, None, :] * gamma[None, :, :]
    return s.reshape(-1, a_slice.shape[1])


def flat_b(b_slice: np.ndarray) -> np.ndarray:
    """B_flat (M, nb*r) with ``B_flat[i, b*r + k] = B[i, b, k]`` (SPEC 3.3)."""
    return b_slice.reshape(b_slice.shape[0], -1)


def _check_adapter(geom: LayerGeometry, adapter: Adapter) -> None:
    if np.shape(adapter.lam) != (geom.r, geom.nb) or np.shape(adapter.gamma) != (geom.nb, geom.m):
        raise ShapeError(
            f"lambda must be (r, nb) = {(geom.r, geom.nb)} and gamma (nb, m) = {(geom.nb, geom.m)}; "
            f"got {np.shape(adapter.lam)} and {np.shape(adapter.gamma)}"
        )


def product(geom: LayerGeometry, adapter: Adapter, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P = B_flat @ S_flat, shape (M, m), before scaling and orientation (SPEC 3.4)."""
    _check_adapter(geom, adapter)
    a_s, b_s = slice_bases(a, b, geom)
    return matmul(flat_b(b_s), scaled_basis(a_s, adapter.lam, adapter.gamma))


def delta_weight(geom: LayerGeometry, adapter: Adapter, a: np.ndarray, b: np.ndarray, fan_in_fan_out: bool = False) -> np.ndarray:
    """delta-W in the layer's storage layout: (out, in), or (in, out) when ``fan_in_fan_out``."""
    p = product(geom, adapter, a, b)
    delta = adapter.scaling * (p if geom.in_le_out else p.T)  # (out, in)
    return delta.T if fan_in_fan_out else delta


def _weight_out_in(weight: np.ndarray, fan_in_fan_out: bool) -> np.ndarray:
    w = np.asarray(weight, np.float64)
    return w.T if fan_in_fan_out else w


Adapters = Mapping[str, Adapter]
"""Adapters of one layer by name."""


def _active(adapters: Adapters, active: Sequence[str]) -> list[Adapter]:
    missing = [name for name in active if name not in adapters]
    if missing:
        raise AdapterNotFoundError(f"active adapters {missing} are not among {sorted(adapters)}")
    return [adapters[name] for name in active]


def effective_weight(
    weight: np.ndarray, adapters: Adapters, active: Sequence[str], a: np.ndarray, b: np.ndarray, fan_in_fan_out: bool = False
) -> np.ndarray:
    """W + sum of active adapters' delta-W, in (out, in) layout."""
    return _weight_out_in(merge(weight, adapters, active, a, b, fan_in_fan_out), fan_in_fan_out)


def forward(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    adapters: Adapters,
    active: Sequence[str],
    a: np.ndarray,
    b: np.ndarray,
    fan_in_fan_out: bool = False,
) -> np.ndarray:
    """Y = x W^T + bias + sum over active adapters of x delta-W^T (SPEC 3.5; dropout is identity here).

    ``x`` has any number of leading axes; its last axis is ``in_features``.
    """
    w_eff = effective_weight(weight, adapters, active, a, b, fan_in_fan_out)
    x64 = np.asarray(x, np.float64)
    if x64.shape[-1] != w_eff.shape[1]:
        raise ShapeError(f"input's last dimension is {x64.shape[-1]}, the layer expects {w_eff.shape[1]}")
    y = matmul(x64, w_eff.T)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def backward(
    x: np.ndarray,
    grad_y: np.ndarray,
    weight: np.ndarray,
    adapters: Adapters,
    active: Sequence[str],
    a: np.ndarray,
    b: np.ndarray,
    fan_in_fan_out: bool = False,
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Gradients of ``sum(grad_y * forward(x))`` (SPEC 3.6).

    Returns:
        ``(grad_x, {adapter_name: (grad_lambda, grad_gamma)})`` for every active adapter.

    """
    x64 = np.asarray(x, np.float64)
    g64 = np.asarray(grad_y, np.float64)
    w_eff = effective_weight(weight, adapters, active, a, b, fan_in_fan_out)
    grad_x = matmul(g64, w_eff)
    x2 = x64.reshape(-1, x64.shape[-1])
    g2 = g64.reshape(-1, g64.shape[-1])
    grad_delta = matmul(g2.T, x2)  # dL/d(delta-W), (out, in)
    in_f, out_f = w_eff.shape[1], w_eff.shape[0]
    grads = {
        name: adapter_grads(grad_delta, LayerGeometry(in_f, out_f, adapters[name].r), adapters[name], a, b) for name in active
    }
    return grad_x, grads


def adapter_grads(
    grad_delta: np.ndarray, geom: LayerGeometry, adapter: Adapter, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(grad_lambda, grad_gamma)`` of one adapter from ``grad_delta = dL/d(delta_W)``, (out, in) (SPEC 3.6)."""
    a_s, b_s = slice_bases(a, b, geom)
    grad_p = adapter.scaling * (grad_delta if geom.in_le_out else grad_delta.T)  # (M, m)
    grad_s = matmul(flat_b(b_s).T, grad_p).reshape(geom.r, geom.nb, geom.m)
    lam = np.asarray(adapter.lam, np.float64)
    gamma = np.asarray(adapter.gamma, np.float64)
    # grad_lambda[k, b] = sum_j grad_S[k, b, j] A[k, j] gamma[b, j]
    grad_lam = exact_sum(grad_s * a_s[:, None, :] * gamma[None, :, :], axis=2)
    # grad_gamma[b, j] = sum_k grad_S[k, b, j] lambda[k, b] A[k, j]
    grad_gamma = exact_sum(grad_s * lam[:, :, None] * a_s[:, None, :], axis=0)
    return grad_lam, grad_gamma


def merge(
    weight: np.ndarray, adapters: Adapters, names: Sequence[str], a: np.ndarray, b: np.ndarray, fan_in_fan_out: bool = False
) -> np.ndarray:
    """Weight (in its storage layout) with the named adapters' delta-W added, in order (SPEC 3.7)."""
    w: np.ndarray = np.asarray(weight, np.float64).copy()
    in_f, out_f = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
    for adapter in _active(adapters, names):
        w += delta_weight(LayerGeometry(in_f, out_f, adapter.r), adapter, a, b, fan_in_fan_out)
    return w


def unmerge(
    weight: np.ndarray, adapters: Adapters, names: Sequence[str], a: np.ndarray, b: np.ndarray, fan_in_fan_out: bool = False
) -> np.ndarray:
    """Inverse of :func:`merge`: subtracts the named adapters' delta-W, in reverse order.

    Subtracting ``d`` is adding ``-d`` exactly, and negating lambda negates delta-W exactly, so this
    is :func:`merge` of the negated adapters taken last to first.
    """
    negated = {name: replace(adapter, lam=-np.asarray(adapter.lam, np.float64)) for name, adapter in adapters.items()}
    return merge(weight, negated, list(reversed(names)), a, b, fan_in_fan_out)


def init_parameters(
    geom: LayerGeometry, init_weights: bool = True, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Initial (lambda, gamma) per SPEC 3.8.

    ``init_weights=True``: lambda = 0 and gamma = 1 / max(nb, m), so the adapter starts as a no-op.
    ``init_weights=False``: lambda ~ N(0, 1) from ``rng`` (not part of the portable state) and
    gamma = 1 / M.
    """
    if init_weights:
        lam = np.zeros((geom.r, geom.nb))
        gamma = np.full((geom.nb, geom.m), 1.0 / max(geom.nb, geom.m))
    else:
        rng = rng if rng is not None else np.random.default_rng()
        lam = rng.standard_normal((geom.r, geom.nb))
        gamma = np.full((geom.nb, geom.m), 1.0 / geom.M)
    return lam, gamma
