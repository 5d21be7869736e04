"""The inference cache: reuse, across calls without gradients, what an adapter's call rebuilds each time.

Each call of a RandLoRA layer rebuilds its scaled bases ``S`` from lambda, gamma and the shared
bases (and on the dense path ``W + delta_W``), although in inference none of them changes between
calls. With the cache enabled (:meth:`RandLoraModel.enable_inference_cache
<randlora_core.model.RandLoraModel.enable_inference_cache>`), a layer called with gradients
disabled keeps, per layer:

- ``weights=True``: the effective weight ``W + delta_W`` (a plain linear base; one matmul per
  call, as a merged model) or ``delta_W`` beside a base whose own forward must run (quantized
  layers); unmerged decode then costs about what merged decode does;
- ``weights=False``: the scaled bases of each group of adapters (the factored path without the
  rebuild), for calls of many tokens (prefill). A call of few tokens needs no entry: the engine's
  cost model, knowing the scaled bases are cached, sends it to the ``activation`` path, which
  applies lambda, gamma and the bases to the activations and reads about as many bytes as the
  base layer again (:mod:`randlora_core.compute`), less than the cached ``S`` (m x m per layer).

An entry is valid while the tensors it was built from are: its key holds the identity and
version counter of every parameter, base weight and basis it read (in-place updates by an
optimizer, ``hotswap_adapter``, ``set_shared_bases`` or merging bump them), the active adapters,
their scalings, the dtype and the device. Entries weigh what they hold. Under ``max_bytes`` an
entry stays until its own layer replaces it (new values) or the cache is cleared: a layer whose
entry does not fit in what is left runs uncached, without building the entry. Evicting another
layer's entry instead (least recently used first) would, in a forward pass that visits the layers
in turn, evict each entry just before its next use and rebuild every entry on every call (a
measured 48x the base model's decode time at 60 % of the bytes needed, against 2.2x uncached).
Not used while ``torch.compile`` traces.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from randlora_core.kernels import combined_scaled_basis, delta_sum, own_copy, poison_nonfinite_rows, times, times_into

if TYPE_CHECKING:
    from randlora_core.engine import Plan
    from randlora_core.operands import AdapterCall, BaseCall


def tensor_key(t: torch.Tensor) -> tuple[int, int, int]:
    """Identity and version of a tensor: any in-place change or replacement gives another key."""
    return (id(t), t._version, t.data_ptr())


def cacheable(x: torch.Tensor, plan: Plan, weights: bool) -> bool:
    """Whether a call may use the inference cache: no gradient, every adapter reading ``x``, not traced, no autocast.

    A call the cost model sent to the ``activation`` path (weighed against the cached scaled
    bases) needs no scaled-bases entry; the ``W + delta_W`` entry (``weights``) still beats it.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return False
    if plan.activation and not weights:
        return False
    return not any(g.own_input for g in plan.groups)


class InferenceCache:
    """Per-model store of one reusable entry per layer, bounded in bytes: what does not fit is not kept.

    Args:
        max_bytes: the bound (``None``: unbounded).
        weights: cache ``W + delta_W`` (or ``delta_W``) instead of the scaled bases.

    """

    def __init__(self, max_bytes: int | None = None, weights: bool = True) -> None:
        self.max_bytes, self.weights = max_bytes, weights
        self._entries: OrderedDict[int, tuple[Hashable, list[torch.Tensor], int]] = OrderedDict()
        self.nbytes = 0
        """Bytes held now."""
        self.hits = self.misses = 0

    def get(self, owner: int, key: Hashable) -> list[torch.Tensor] | None:
        """The tensors stored for layer ``owner`` under ``key``, or ``None``."""
        entry = self._entries.get(owner)
        if entry is None or entry[0] != key:
            self.misses += 1
            return None
        self._entries.move_to_end(owner)
        self.hits += 1
        return entry[1]

    def fits(self, owner: int, size: int) -> bool:
        """Whether an entry of ``size`` bytes for layer ``owner`` would be kept (its own old entry makes room)."""
        if self.max_bytes is None:
            return True
        entry = self._entries.get(owner)
        return self.nbytes - (entry[2] if entry is not None else 0) + size <= self.max_bytes

    def put(self, owner: int, key: Hashable, tensors: list[torch.Tensor]) -> None:
        """Store ``tensors`` for layer ``owner`` (replacing its entry) if they fit; other layers' entries stay."""
        size = sum(t.nbytes for t in tensors)
        if not self.fits(owner, size):
            return
        self.drop(owner)
        self._entries[owner] = (key, tensors, size)
        self.nbytes += size

    def drop(self, owner: int) -> None:
        """Forget layer ``owner``'s entry."""
        entry = self._entries.pop(owner, None)
        if entry is not None:
            self.nbytes -= entry[2]

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self.nbytes = 0


@dataclass(frozen=True)
class _Lookup:
    """One call's view of the cache: where its entry lives and what it is built from."""

    cache: InferenceCache
    base: BaseCall
    groups: list[list[AdapterCall]]
    keys: tuple[Hashable, ...]
    dtype: torch.dtype
    in_le_out: bool

    def fetch(self, key: Hashable, size: int, build: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor] | None:
        """The entry stored under ``key`` for this layer, built and stored on a miss; ``None`` if ``size`` bytes do not fit."""
        hit = self.cache.get(self.base.owner, key)
        if hit is None:
            if not self.cache.fits(self.base.owner, size):
                return None
            hit = build()
            self.cache.put(self.base.owner, key, hit)
        return hit

    def bases(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(b_flat, combined S_flat)`` of every group."""
        return [(m[0].b_flat, combined_scaled_basis(m[0].a_s, [(a.lam, a.gamma, a.scaling) for a in m])) for m in self.groups]

    def beside_base(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh copy of the base layer's own output to add to: ``(y, its 2-D view)``."""
        out = self.base.forward()
        y = own_copy(out, torch.promote_types(out.dtype, self.dtype))
        return y, y.view(-1, y.shape[-1])


def cached_forward(
    x: torch.Tensor, base: BaseCall, groups: list[list[AdapterCall]], in_le_out: bool, fused: bool
) -> torch.Tensor | None:
    """The layer output from the cache (filling it on a miss), or ``None`` when the call cannot use it.

    ``groups`` are the call's adapter groups (all reading ``x``); ``fused`` says whether the base
    matmul may run here (a plain linear base). Without gradients, a row of ``x`` holding a
    non-finite value is NaN throughout, as on the engine's other paths.
    """
    cache = base.cache
    keys = tuple((a.key, a.scaling) for members in groups for a in members)
    if cache is None or any(k is None for k, _ in keys):
        return None
    dtype = groups[0][0].a_s.dtype
    lookup = _Lookup(cache, base, groups, keys, dtype, in_le_out)
    if cache.weights:
        y = _weights(lookup, fused, base.weight_in_out if fused else not in_le_out, x.to(dtype))
    else:
        y = _scaled_bases(lookup, x.reshape(-1, x.shape[-1]).to(dtype))
    if y is None:
        return None
    poison_nonfinite_rows(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]))
    return y.to(x.dtype)


def _weights(call: _Lookup, fused: bool, weight_in_out: bool, x: torch.Tensor) -> torch.Tensor | None:
    """``x @ (W + delta_W)^T + b`` (a plain base), or ``base(x) + x @ delta_W^T``, with the matrix cached."""
    base, dtype = call.base, call.dtype
    weight = base.weight if fused else None
    key = ("weights", call.keys, dtype, weight_in_out, tensor_key(weight) if weight is not None else None)

    def build() -> list[torch.Tensor]:
        w = weight.to(dtype) if weight is not None else None
        return [delta_sum(w, call.in_le_out, weight_in_out, call.bases())]

    first = call.groups[0][0]
    hit = call.fetch(key, first.b_flat.shape[0] * first.a_s.shape[1] * dtype.itemsize, build)
    if hit is None:
        return None
    if fused:
        bias = base.bias.to(dtype) if base.bias is not None else None
        return times_into(x, hit[0], weight_in_out, bias, dtype)[0]
    y, y2 = call.beside_base()
    y2.add_(times(x.reshape(-1, x.shape[-1]), hit[0], weight_in_out).to(y.dtype))
    return y


def _scaled_bases(call: _Lookup, x2: torch.Tensor) -> torch.Tensor | None:
    """``base(x)`` plus each group's factored output, the scaled bases cached."""
    size = sum(m[0].b_flat.shape[1] * m[0].a_s.shape[1] for m in call.groups) * call.dtype.itemsize
    hit = call.fetch(("scaled_bases", call.keys, call.dtype), size, lambda: [s for _, s in call.bases()])
    if hit is None:
        return None
    y, y2 = call.beside_base()
    for members, s in zip(call.groups, hit, strict=True):
        b_flat = members[0].b_flat
        h = x2 @ (s.T if call.in_le_out else b_flat)
        y2.addmm_(h.to(y2.dtype), (b_flat.T if call.in_le_out else s).to(y2.dtype))
    return y
