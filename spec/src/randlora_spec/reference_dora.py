"""Float64 reference of a layer's effective weight with DoRA adapters and any layer kind (SPEC.md 3.10, 3.11).

Works on the ``(O, I)`` *view* of a layer's weight (:func:`view_of`, :func:`stored_of`): the update
``delta_W`` of every adapter is that of SPEC 3.4 (an embedding's padding column zeroed), and an
adapter with a magnitude vector is a DoRA adapter:

    n_a = ||W + delta_W_a||_row        f_a = magnitude_a / n_a        c = 1 + sum_dora (f_a - 1)
    W_eff = c * W + sum_plain delta_W_a + sum_dora f_a * delta_W_a            (rows scaled)

Without DoRA adapters ``W_eff = W + sum delta_W_a`` exactly as :func:`randlora_spec.reference.effective_weight`
forms it. Gradients treat ``n_a`` as a constant (DoRA's detached norm). Merging replaces the weight
by ``W_eff`` of the merged adapters and keeps their factors, with which unmerging inverts it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from randlora_spec.errors import AdapterNotFoundError, MergeError
from randlora_spec.geometry import LayerGeometry
from randlora_spec.layer_kinds import CONV_KINDS, EMBEDDING
from randlora_spec.reference import Adapter, adapter_grads, delta_weight, exact_sum


@dataclass(frozen=True)
class ViewAdapter:
    """An adapter of SPEC 3 with, for DoRA (``use_dora``), its magnitude vector ``(O,)``."""

    adapter: Adapter
    magnitude: np.ndarray | None = None

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA adapter."""
        return self.magnitude is not None


ViewAdapters = Mapping[str, ViewAdapter]
"""A layer's adapters by name."""


class InputMap(Protocol):
    """What :mod:`randlora_spec.reference_inputs` provides for one layer input."""

    def forward(self, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray: ...  # noqa: D102
    def weight_grad(self, g: np.ndarray) -> np.ndarray: ...  # noqa: D102
    def input_grad(self, g: np.ndarray, w: np.ndarray) -> np.ndarray | None: ...  # noqa: D102


def view_of(weight: np.ndarray, kind: str, fan_in_fan_out: bool = False) -> np.ndarray:
    """The ``(O, I)`` view of a stored weight (SPEC 3.10), float64."""
    w = np.asarray(weight, np.float64)
    if kind in CONV_KINDS:
        return w.reshape(w.shape[0], -1)
    return w.T if kind == EMBEDDING or fan_in_fan_out else w


def stored_of(view: np.ndarray, like_shape: tuple[int, ...], kind: str, fan_in_fan_out: bool = False) -> np.ndarray:
    """A view back in the storage layout of a weight of shape ``like_shape``."""
    if kind in CONV_KINDS:
        return view.reshape(like_shape)
    return view.T if kind == EMBEDDING or fan_in_fan_out else view


def delta_view(
    shape: tuple[int, int], adapter: Adapter, a: np.ndarray, b: np.ndarray, padding_idx: int | None = None
) -> np.ndarray:
    """``delta_W`` (O, I) of one adapter (SPEC 3.4); column ``padding_idx`` zeroed for an embedding (SPEC 3.10)."""
    out_f, in_f = shape
    delta = delta_weight(LayerGeometry(in_f, out_f, adapter.r), adapter, a, b)
    if padding_idx is not None:
        delta[:, padding_idx] = 0.0
    return delta


def row_norms(w: np.ndarray) -> np.ndarray:
    """``||w[o, :]||`` per row, from an exact sum of squares."""
    norms: np.ndarray = np.sqrt(exact_sum(w * w, axis=1))
    return norms


@dataclass
class Effective:
    """``W_eff`` of a set of adapters, with what gradients and unmerging need."""

    weight: np.ndarray
    deltas: dict[str, np.ndarray]
    norms: dict[str, np.ndarray]  # DoRA adapters only
    factors: dict[str, np.ndarray]  # DoRA adapters only
    scale: np.ndarray  # c, per row (ones without DoRA adapters)


def _picked(adapters: ViewAdapters, names: Sequence[str]) -> list[str]:
    missing = [n for n in names if n not in adapters]
    if missing:
        raise AdapterNotFoundError(f"active adapters {missing} are not among {sorted(adapters)}")
    return list(names)


def effective(
    w: np.ndarray, adapters: ViewAdapters, names: Sequence[str], a: np.ndarray, b: np.ndarray, padding_idx: int | None = None
) -> Effective:
    """``W_eff`` of the adapters ``names`` on the view ``w`` (see the module docstring)."""
    names = _picked(adapters, names)
    deltas = {n: delta_view(w.shape, adapters[n].adapter, a, b, padding_idx) for n in names}
    dora = [n for n in names if adapters[n].dora]
    norms = {n: row_norms(w + deltas[n]) for n in dora}
    factors = {n: np.asarray(adapters[n].magnitude, np.float64) / norms[n] for n in dora}
    c = np.ones(w.shape[0])
    for n in dora:
        c = c + (factors[n] - 1.0)
    total = c[:, None] * w if dora else w.copy()
    for n in names:
        total += factors[n][:, None] * deltas[n] if n in factors else deltas[n]
    return Effective(total, deltas, norms, factors, c)


def forward(
    inputs: InputMap,
    w: np.ndarray,
    bias: np.ndarray | None,
    adapters: ViewAdapters,
    active: Sequence[str],
    a: np.ndarray,
    b: np.ndarray,
    padding_idx: int | None = None,
) -> np.ndarray:
    """The layer output with the active adapters (SPEC 3.5 with 3.10 / 3.11; dropout as the identity)."""
    return inputs.forward(effective(w, adapters, active, a, b, padding_idx).weight, bias)


def backward(
    inputs: InputMap,
    grad_y: np.ndarray,
    w: np.ndarray,
    adapters: ViewAdapters,
    active: Sequence[str],
    a: np.ndarray,
    b: np.ndarray,
    padding_idx: int | None = None,
) -> tuple[np.ndarray | None, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """``(grad_x, {name: (grad_lambda, grad_gamma, grad_magnitude or None)})`` for ``L = sum(grad_y * y)``.

    A DoRA adapter's update enters ``W_eff`` scaled by ``f_a`` with ``n_a`` constant, so its
    lambda/gamma see ``f_a * G``; its magnitude gets ``sum_i G[o, i] (W + delta_W_a)[o, i] / n_a[o]``.
    """
    eff = effective(w, adapters, active, a, b, padding_idx)
    grad_w = inputs.weight_grad(grad_y)
    grad_delta = grad_w.copy()
    if padding_idx is not None:
        grad_delta[:, padding_idx] = 0.0  # that column of every delta_W is zero, whatever lambda and gamma are
    out_f, in_f = w.shape
    grads: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for name in active:
        adapter = adapters[name].adapter
        geom = LayerGeometry(in_f, out_f, adapter.r)
        if name in eff.factors:
            scaled = eff.factors[name][:, None] * grad_delta
            grad_mag = exact_sum(grad_w * (w + eff.deltas[name]), axis=1) / eff.norms[name]
            grads[name] = (*adapter_grads(scaled, geom, adapter, a, b), grad_mag)
        else:
            grads[name] = (*adapter_grads(grad_delta, geom, adapter, a, b), None)
    return inputs.input_grad(grad_y, eff.weight), grads


def merge(
    w: np.ndarray, adapters: ViewAdapters, names: Sequence[str], a: np.ndarray, b: np.ndarray, padding_idx: int | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(merged view, factors)``: ``W_eff`` of ``names`` (SPEC 3.11), and the DoRA factors unmerging needs.

    Raises:
        MergeError: a row's ``c`` is zero or not finite, so the merge could not be undone.

    """
    eff = effective(w, adapters, names, a, b, padding_idx)
    if eff.factors:
        c = eff.scale
        if not np.all(np.isfinite(c)) or np.any(c == 0):
            raise MergeError("merging these DoRA adapters scales some weight row by 0 or a non-finite factor")
    return eff.weight, eff.factors


def unmerge(
    merged: np.ndarray,
    adapters: ViewAdapters,
    names: Sequence[str],
    a: np.ndarray,
    b: np.ndarray,
    factors: Mapping[str, np.ndarray],
    padding_idx: int | None = None,
) -> np.ndarray:
    """Inverse of :func:`merge` with the factors it returned: ``(W_eff - sum f_a delta_W_a) / c``.

    Without DoRA adapters the deltas are subtracted in reverse order, as :func:`randlora_spec.reference.unmerge`.
    """
    names = _picked(adapters, names)
    w: np.ndarray = np.asarray(merged, np.float64).copy()
    deltas = {n: delta_view(w.shape, adapters[n].adapter, a, b, padding_idx) for n in names}
    if not factors:
        for n in reversed(names):
            w -= deltas[n]
        return w
    c = np.ones(w.shape[0])
    for n in names:
        if n in factors:
            c = c + (factors[n] - 1.0)
    for n in reversed(names):
        w -= factors[n][:, None] * deltas[n] if n in factors else deltas[n]
    unmerged: np.ndarray = w / c[:, None]
    return unmerged
