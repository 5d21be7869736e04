"""Sparse kernels for ternary bases (``sparse`` and ``very_sparse``, SPEC 4.4): the factored path on the nonzeros.

Ternary bases are mostly zeros (``very_sparse``: a fraction ``1/sqrt(m_max)`` is nonzero), and the
dense kernels multiply every zero. Here the factored path (SPEC 3.5/3.6) runs on structures built
once per basis window (:func:`window_structure`):

- ``b_flat`` (M, K) and its transpose as CSR matrices (the values never change), multiplied with
  ``torch.sparse.mm`` by row-major dense operands of ``N`` columns (the tokens);
- ``S_flat`` (K, m) as blocks: row ``k*nb + b`` is ``lambda[k, b] * A[k] * gamma[b]``, so every row
  of block ``k`` has the nonzeros of ``A[k]`` (the columns ``J[k]``, padded to the longest row with
  zero coefficients). A product with ``S_flat`` gathers the ``J`` columns of the dense operand and
  runs one batched matmul over the ``r`` blocks; its transpose's product runs the batched matmul the
  other way and adds the results onto their columns (``index_add_``). The gradient of ``S_flat`` on
  its pattern is the same batched matmul, and lambda's and gamma's gradients follow from it by sums
  (gamma's through a CSR selection matrix that leaves the pads out).

The CSR products need the tokens as the last (contiguous) axis, ``h^T`` as (K, N); the gathers and
scatters of ``S_flat`` work on the tokens-first activations directly, so each direction transposes
only around its ``b_flat`` product. The math is exactly the factored path's; only the order of the
sums differs.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from randlora_spec.bases import sparse_threshold

if TYPE_CHECKING:
    from randlora_core.bases import RandLoraBases

Adapters = list[tuple[torch.Tensor, torch.Tensor, float]]
"""A group's adapters: ``(lambda, gamma, scaling)``."""

MAX_DENSITY = 0.1
"""Above this fraction of nonzeros the dense kernels are faster (measured: 3x slower at a third), so
``auto`` never takes the sparse path there and no structure is built."""


@dataclass(frozen=True, eq=False)
class SparseWindow:
    """The compressed structure of one basis window (see the module docstring); built once, never changed.

    Attributes:
        b: ``b_flat`` (M, K) as CSR.
        bt: ``b_flat^T`` (K, M) as CSR.
        cols: (r * L,) the column ``J[k, l]`` of ``A[k]``'s ``l``-th nonzero, 0 at pads.
        a_pad: (r, L) ``A[k, J[k, l]]``, 0 at pads.
        pick: (m, r * L) CSR with a one at ``(J[k, l], k * L + l)`` for every nonzero (no pads).
        nb: bases per window; K = r * nb.
        nnz_b: nonzeros of ``b_flat``.
        nnz_s: nonzeros of ``S_flat`` (those of ``A`` times ``nb``).

    """

    b: torch.Tensor
    bt: torch.Tensor
    cols: torch.Tensor
    a_pad: torch.Tensor
    pick: torch.Tensor
    nb: int
    nnz_b: int
    nnz_s: int

    @property
    def nnz(self) -> tuple[int, int]:
        """Nonzeros of ``b_flat`` and of ``S_flat``."""
        return self.nnz_b, self.nnz_s

    @property
    def blocks(self) -> tuple[int, int]:
        """``(r, L)``: the blocks of ``S_flat`` and the padded nonzeros of each."""
        r, length = self.a_pad.shape
        return int(r), int(length)


def sparse_density(bases: RandLoraBases) -> float:
    """Expected fraction of nonzeros of ternary bases: ``2T / 2**32`` (SPEC 4.4), 1 for dense ones."""
    if bases.kind == "dense":
        return 1.0
    return sparse_threshold(bases.kind, bases.shape.m_max) / 2**31


def _build(a_s: torch.Tensor, b_flat: torch.Tensor, nb: int) -> SparseWindow:
    r, m = a_s.shape
    k_idx, j_idx = torch.nonzero(a_s, as_tuple=True)  # row-major: by k, then j
    per_k = torch.bincount(k_idx, minlength=r)
    length = max(int(per_k.max()) if per_k.numel() else 0, 1)
    slot = k_idx * length + torch.arange(k_idx.numel(), device=a_s.device) - (torch.cumsum(per_k, 0) - per_k)[k_idx]
    cols = torch.zeros(r * length, dtype=torch.long, device=a_s.device).index_copy_(0, slot, j_idx)
    a_pad = torch.zeros(r * length, dtype=a_s.dtype, device=a_s.device).index_copy_(0, slot, a_s[k_idx, j_idx])
    ones = torch.ones(slot.numel(), dtype=a_s.dtype, device=a_s.device)
    pick = torch.sparse_coo_tensor(torch.stack([j_idx, slot]), ones, (m, r * length), check_invariants=False)
    b = _csr32(b_flat)
    return SparseWindow(
        b=b,
        bt=_csr32(b_flat.T),
        cols=cols,
        a_pad=a_pad.view(r, length),
        pick=_csr32(pick),
        nb=nb,
        nnz_b=int(b.values().numel()),
        nnz_s=int(k_idx.numel()) * nb,
    )


def _csr32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (strided or COO) as CSR with int32 indices: MKL's own index type, so no product converts them."""
    csr = t.to_sparse_csr() if t.layout == torch.sparse_coo else t.contiguous().to_sparse_csr()
    return torch.sparse_csr_tensor(
        csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape, check_invariants=False
    )


_STRUCTURES: weakref.WeakKeyDictionary[object, dict[tuple[Hashable, Hashable], SparseWindow]] = weakref.WeakKeyDictionary()


def window_structure(
    owner: object, window: Hashable, values: Hashable, a_s: torch.Tensor, b_flat: torch.Tensor, nb: int
) -> SparseWindow:
    """The structure of a window, built on first use and kept while ``owner`` (the shared bases) lives.

    ``window`` tells a model's windows apart (its shape, dtype and device: one structure each);
    ``values`` must change whenever the bases' values do (their identity and version), and then
    every structure built from the older values is dropped.
    """
    cache = _STRUCTURES.setdefault(owner, {})
    hit = cache.get((window, values))
    if hit is None:
        for stale in [k for k in cache if k[1] != values]:
            del cache[stale]
        with _quiet():
            hit = cache[(window, values)] = _build(a_s, b_flat, nb)
    return hit


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's notice that sparse CSR support is in beta: these kernels are tested against the dense ones."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        yield


def _on_cols(win: SparseWindow, t: torch.Tensor) -> torch.Tensor:
    """``t[:, cols]`` for ``t`` (nb, m) as (r, nb, L): a matrix's entries at the nonzeros of each block."""
    r, length = win.blocks
    return t.index_select(1, win.cols).view(-1, r, length).transpose(0, 1)


def _coef(win: SparseWindow, adapters: Adapters) -> torch.Tensor:
    """The blocks of ``sum_a s_a * S_flat(lambda_a, gamma_a)``: (r, nb, L), entry ``[k, b, l]`` at ``(k*nb + b, J[k, l])``."""
    total: torch.Tensor | None = None
    for lam, gamma, s in adapters:
        term = _on_cols(win, gamma) * (lam * s).unsqueeze(2)
        total = term if total is None else total.add_(term)
    assert total is not None
    return total.mul_(win.a_pad.unsqueeze(1))


def _gather(win: SparseWindow, v: torch.Tensor) -> torch.Tensor:
    """The ``J`` columns of ``v`` (N, m) as an (r, L, N) view of a tokens-first gather.

    Gathering columns reads each row of ``v`` in place; transposing ``v`` first would add a strided
    full-size copy (4x the gather's time at 2048 x 2048). ``bmm`` takes the view as it is.
    """
    r, length = win.blocks
    return v.index_select(1, win.cols).view(v.shape[0], r, length).permute(1, 2, 0)


def _spmm(csr: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``csr @ dense`` into a fresh row-major result.

    ``addmm`` with ``beta=0`` into an empty ``out`` skips ``torch.sparse.mm``'s zero fill and its
    copy of the result (a fifth of the product's time at 2048 x 2048 on CPU); ``beta=0`` never reads
    it on CPU (MKL, tested), other devices get zeros rather than rely on their backend for that.
    """
    alloc = torch.empty if dense.device.type == "cpu" else torch.zeros
    out = alloc(csr.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, csr, dense, beta=0, out=out)


def _tokens_first(t: torch.Tensor) -> torch.Tensor:
    """``t^T`` row-major: ``contiguous()`` transposes in cache blocks, where adding the strided view would not."""
    return t.T.contiguous()


def _scatter_into(out: torch.Tensor, win: SparseWindow, coef: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out`` (N, m) plus ``v^T S`` for ``v`` (r, nb, N): entry ``[n, J[k, l]]`` gains ``sum_b coef[k, b, l] v[k, b, n]``.

    The product is formed tokens-first, (r, N, L); reordering it to (N, r, L) moves runs of ``L``
    values, and ``index_add_`` adds them onto their columns, so no full transpose is needed. Pads add
    ``0 * v``: nothing for finite values, NaN where the dense product has one too.
    """
    t = torch.bmm(v.transpose(1, 2), coef)
    return out.index_add_(1, win.cols, t.permute(1, 0, 2).reshape(out.shape[0], -1).to(out.dtype))


def forward_into(y2: torch.Tensor, x2: torch.Tensor, win: SparseWindow, adapters: Adapters, in_le_out: bool) -> torch.Tensor:
    """Add the group's factored output to ``y2`` (N, out); returns what :func:`backward` reuses for dL/dS.

    That is the gathered input (r, L, N) when ``in <= out``, else ``h^T`` (K, N).
    """
    coef = _coef(win, adapters)
    if in_le_out:  # h = x S^T, y = h B^T
        xg = _gather(win, x2)
        y2 += _tokens_first(_spmm(win.b, torch.bmm(coef, xg).view(-1, xg.shape[-1]))).to(y2.dtype)
        return xg
    h_t = _spmm(win.bt, x2.T.contiguous())  # h = x B, y = h S
    _scatter_into(y2, win, coef, h_t.view(coef.shape[0], win.nb, -1))
    return h_t


def backward(
    g2: torch.Tensor,
    x2: torch.Tensor,
    win: SparseWindow,
    adapters: Adapters,
    in_le_out: bool,
    saved: torch.Tensor | None,
    need: tuple[bool, bool],
    into: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(input gradient, dL/dS on the blocks (r, nb, L))`` of one group, each ``None`` unless ``need``-ed.

    ``saved`` is :func:`forward_into`'s result for this call, or ``None`` to recompute it. The input
    gradient is added to ``into`` (N, in) when given, and then is ``into`` itself.
    """
    need_in, need_s = need
    r, _ = win.blocks
    if in_le_out:  # gh = g B, dL/dS = gh^T x, grad_x = gh S
        gh_t = _spmm(win.bt, g2.T.contiguous()).view(r, win.nb, -1)
        xg = saved if saved is not None else _gather(win, x2)
        grad_s = torch.bmm(gh_t, xg.transpose(1, 2)) if need_s else None
        grad_in = None
        if need_in:
            out = into if into is not None else gh_t.new_zeros(g2.shape[0], win.pick.shape[0])
            grad_in = _scatter_into(out, win, _coef(win, adapters), gh_t)
        return grad_in, grad_s
    gg = _gather(win, g2)  # dL/dS = h^T g, grad_x = g S^T B^T
    grad_s = None
    if need_s:
        h_t = saved if saved is not None else _spmm(win.bt, x2.T.contiguous())
        grad_s = torch.bmm(h_t.view(r, win.nb, -1), gg.transpose(1, 2))
    grad_in = _tokens_first(_spmm(win.b, torch.bmm(_coef(win, adapters), gg).view(-1, gg.shape[-1]))) if need_in else None
    if grad_in is not None and into is not None:
        grad_in = into.add_(grad_in)
    return grad_in, grad_s


def parameter_grads(
    win: SparseWindow, grad_s: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, s: float, need: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SPEC 3.6's lambda and gamma gradients from dL/dS on the blocks (r, nb, L), for one adapter of scaling ``s``."""
    u = grad_s * (win.a_pad * s).unsqueeze(1)  # pads: zero
    grad_lam = grad_gamma = None
    if need[0]:
        grad_lam = (u * _on_cols(win, gamma.to(u.dtype))).sum(2).to(lam.dtype)
    if need[1]:
        per_slot = (u * lam.to(u.dtype).unsqueeze(2)).transpose(1, 2).reshape(-1, u.shape[1])  # (r*L, nb)
        grad_gamma = _spmm(win.pick, per_slot).T.to(gamma.dtype).contiguous()
    return grad_lam, grad_gamma
