"""The DoRA-style variant (``use_dora``, SPEC.md 3.11) for every RandLoRA layer kind.

A DoRA adapter keeps a trainable magnitude ``mag`` per output feature of the layer's ``(O, I)``
weight view ``W`` and, with ``n = ||W + delta_W||`` per row (detached from the graph) and
``f = mag / n``, contributes ``(f - 1) * base_map(x) + f * (x @ delta_W^T)``: one map with the
weight ``V = (f - 1) W + f delta_W``. A plain adapter on the same call contributes ``V = delta_W``.
So a call is the base layer's own output plus the layer's map (:meth:`_apply_weight`, no bias) of
``sum_a V_a`` (or, with active dropout, of each ``V_a`` on its own dropped-out input), and autograd
through plain torch ops gives every gradient of SPEC 3.11. The weight-sized ``V`` is built per call,
as PEFT's DoRA builds ``W + delta_W`` per call for its norm.

Merging (several adapters at once when one of them is DoRA) writes ``W_eff`` of SPEC 3.11 and
keeps the factors with the merge (:class:`DoraMerge`); unmerging divides them out again.
The layer supplies the hooks ``_weight_view``, ``_set_weight_view``, ``delta_view``,
``_apply_weight`` and ``_compute_dtype`` (:class:`~randlora_core.layer.RandLoraLinear` has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from randlora_spec.errors import MergeError

if TYPE_CHECKING:
    from randlora_core.layer import RandLoraLinear
    from randlora_core.operands import LayerInput


@dataclass
class DoraMerge:
    """One merge that involved a DoRA adapter: its names in order, and each DoRA adapter's factor ``f`` (O,)."""

    names: list[str]
    factors: dict[str, torch.Tensor]


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """``||w[o, :]||`` per row of an ``(O, I)`` matrix."""
    norms: torch.Tensor = torch.linalg.vector_norm(w, dim=1)
    return norms


def _total(views: list[torch.Tensor]) -> torch.Tensor:
    return sum(views[1:], views[0])


def initial_magnitude(layer: RandLoraLinear, name: str) -> torch.Tensor:
    """``||W + delta_W||`` per row for adapter ``name`` as initialised, so its factor starts at 1 (SPEC 3.11)."""
    with torch.no_grad():
        device = layer.randlora_lambda[name].device
        dtype = layer._compute_dtype([name], device)
        w = layer._weight_view().detach().to(device=device, dtype=dtype)
        return row_norms(w + layer.delta_view(name, dtype, device))


def _update_weights(
    layer: RandLoraLinear, names: list[str], dtype: torch.dtype, device: torch.device
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Per adapter its ``V_a``, the DoRA factors ``f_a`` and ``c = 1 + sum (f_a - 1)``, and the deltas.

    ``V_a`` is ``delta_W_a`` for a plain adapter, ``(f_a - 1) W + f_a delta_W_a`` for a DoRA one, with
    the norm in ``f_a`` detached; lambda, gamma and the magnitude keep their graphs.
    """
    w = layer._weight_view().detach().to(device=device, dtype=dtype)
    views: list[torch.Tensor] = []
    factors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    scale = torch.ones(w.shape[0], device=device, dtype=dtype)
    for name in names:
        delta = deltas[name] = layer.delta_view(name, dtype, device)
        if not layer.use_dora.get(name, False):
            views.append(delta)
            continue
        norm = row_norms(w + delta.detach())
        f = factors[name] = layer.randlora_magnitude[name].to(device=device, dtype=dtype) / norm
        scale = scale + (f - 1)
        views.append((f - 1)[:, None] * w + f[:, None] * delta)
    return views, factors, scale, deltas


def forward(layer: RandLoraLinear, call: LayerInput, names: list[str]) -> torch.Tensor:
    """The layer's output with ``names`` active, at least one of them DoRA (SPEC 3.11)."""
    x, base = call.x, layer._base_output(call)
    dtype = layer._compute_dtype(names, base.device)
    views, _, _, _ = _update_weights(layer, names, dtype, base.device)
    dropouts = [layer.randlora_dropout[n] for n in names]
    own = [d.training and getattr(d, "p", 0.0) > 0 for d in dropouts] if layer.applies_dropout else [False] * len(names)
    x_in = x.to(dtype) if x.is_floating_point() else x
    if not any(own):
        extra = layer._apply_weight(x_in, layer._view_to_storage(_total(views)), None)
    else:
        extra = _total(
            [
                layer._apply_weight(d(x_in) if o else x_in, layer._view_to_storage(v), None)
                for d, o, v in zip(dropouts, own, views, strict=True)
            ]
        )
    out_dtype = torch.promote_types(base.dtype, dtype)
    return layer._finish(x, base.to(out_dtype) + extra.to(out_dtype))


def merged_view(layer: RandLoraLinear, names: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(W_eff of names, factors)`` on the current weight view, without changing the layer (no gradients).

    Raises:
        MergeError: some row's ``c`` is 0 or not finite: such a merge could not be undone.

    """
    with torch.no_grad():
        weight = layer._weight_view()
        device = weight.device
        dtype = layer._compute_dtype(names, device)
        views, factors, scale, _ = _update_weights(layer, names, dtype, device)
        if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
            raise MergeError(
                f"merging {names} into layer {layer.layer_name!r} would scale a weight row by 0 or a non-finite factor "
                "(c = 1 + sum of the DoRA factors minus 1), so it could not be unmerged; nothing was merged"
            )
        return weight.to(dtype) + _total(views), factors


def merge(layer: RandLoraLinear, names: list[str]) -> None:
    """Merge ``names`` (at least one DoRA) into the weight as one merge and remember its factors."""
    new, factors = merged_view(layer, names)
    with torch.no_grad():
        layer._set_weight_view(new)
    layer.dora_merges.append(DoraMerge(list(names), factors))
    layer.merged_adapters.extend(names)


def unmerge_last(layer: RandLoraLinear) -> None:
    """Undo the last :class:`DoraMerge`: ``W = (W_eff - sum_plain delta - sum_dora f delta) / c``."""
    record = layer.dora_merges.pop()
    with torch.no_grad():
        weight = layer._weight_view()
        dtype = layer._compute_dtype(record.names, weight.device)
        w = weight.to(dtype)
        scale = torch.ones(w.shape[0], device=w.device, dtype=dtype)
        for name in record.names:
            if name in record.factors:
                scale = scale + (record.factors[name] - 1)
        for name in reversed(record.names):
            delta = layer.delta_view(name, dtype, w.device)
            w = w - (record.factors[name][:, None] * delta if name in record.factors else delta)
        layer._set_weight_view(w / scale[:, None])
    del layer.merged_adapters[-len(record.names) :]
