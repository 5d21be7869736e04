"""Sparse kernels for ternary bases (``sparse`` and ``very_sparse``, SPEC 4.4): the factored path on the nonzeros.

Ternary bases are mostly zeros (``very_sparse``: a fraction ``1/sqrt(m_max)`` is nonzero), and the
dense kernels multiply every zero. Here the factored path (SPEC 3.5/3.6) runs on compressed
structures built once per basis window (:func:`window_structure`):

- ``b_flat`` (M, K) and its transpose as CSR matrices (the values never change);
- the pattern of ``S_flat`` (K, m): row ``k*nb + b`` has the nonzeros of ``A[k]``, whatever
  lambda and gamma are; per nonzero its ``k``, ``b``, ``j`` and ``A[k, j]``, so each call forms the
  values ``s * lambda[k, b] * A[k, j] * gamma[b, j]`` by gathers, and the pattern of ``S_flat^T``.

Products are CSR x dense (``torch.sparse.mm``), and the gradient of ``S_flat`` is needed only on
its pattern (``torch.sparse.sampled_addmm``), from which lambda's and gamma's gradients are
index-sums. The math is exactly the factored path's; only the order of the sums differs.
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
    """The compressed structure of one basis window (see the module docstring); built once, never changed."""

    b: torch.Tensor
    bt: torch.Tensor
    pattern: torch.Tensor
    pattern_t: torch.Tensor
    perm_t: torch.Tensor
    row_k: torch.Tensor
    row_b: torch.Tensor
    col: torch.Tensor
    a_val: torch.Tensor
    nb: int
    m: int

    @property
    def nnz(self) -> tuple[int, int]:
        """Nonzeros of ``b_flat`` and of ``S_flat``."""
        return int(self.b.values().numel()), int(self.col.numel())


def sparse_density(bases: RandLoraBases) -> float:
    """Expected fraction of nonzeros of ternary bases: ``2T / 2**32`` (SPEC 4.4), 1 for dense ones."""
    if bases.kind == "dense":
        return 1.0
    return sparse_threshold(bases.kind, bases.shape.m_max) / 2**31


def _build(a_s: torch.Tensor, b_flat: torch.Tensor, nb: int) -> SparseWindow:
    r, m = a_s.shape
    k_idx, j_idx = torch.nonzero(a_s, as_tuple=True)  # row-major: by k, then j
    per_k = torch.bincount(k_idx, minlength=r)
    # S_flat row k*nb + b repeats A[k]'s nonzeros for every b
    counts = per_k.repeat_interleave(nb)
    starts = torch.cumsum(per_k, 0) - per_k
    offsets = torch.arange(int(counts.sum()), device=a_s.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts
    )
    row = torch.repeat_interleave(torch.arange(r * nb, device=a_s.device), counts)
    row_k, row_b = row // nb, row % nb
    entry = starts[row_k] + offsets
    col = j_idx[entry]
    crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    pattern = torch.sparse_csr_tensor(
        crow, col, torch.zeros(col.numel(), dtype=a_s.dtype, device=a_s.device), (r * nb, m), check_invariants=False
    )
    order = torch.argsort(col * (r * nb) + row, stable=True)
    crow_t = torch.cat([counts.new_zeros(1), torch.cumsum(torch.bincount(col, minlength=m), 0)])
    pattern_t = torch.sparse_csr_tensor(
        crow_t, row[order], torch.zeros_like(pattern.values()), (m, r * nb), check_invariants=False
    )
    return SparseWindow(
        b=b_flat.to_sparse_csr(),
        bt=b_flat.T.contiguous().to_sparse_csr(),
        pattern=pattern,
        pattern_t=pattern_t,
        perm_t=order,
        row_k=row_k,
        row_b=row_b,
        col=col,
        a_val=a_s[row_k, col],
        nb=nb,
        m=m,
    )


_STRUCTURES: weakref.WeakKeyDictionary[object, dict[Hashable, SparseWindow]] = weakref.WeakKeyDictionary()


def window_structure(owner: object, key: Hashable, a_s: torch.Tensor, b_flat: torch.Tensor, nb: int) -> SparseWindow:
    """The structure of a window, built on first use and kept while ``owner`` (the shared bases) lives.

    ``key`` must change whenever the window's values do (the bases' identity, version, window and dtype).
    """
    cache = _STRUCTURES.setdefault(owner, {})
    hit = cache.get(key)
    if hit is None:
        cache.clear()  # an older key means replaced bases: drop their structures
        with _quiet():
            hit = cache[key] = _build(a_s, b_flat, nb)
    return hit


def _values(win: SparseWindow, adapters: Adapters) -> torch.Tensor:
    """The nonzeros of ``sum_a s_a * S_flat(lambda_a, gamma_a)``, in the pattern's order."""
    total: torch.Tensor | None = None
    for lam, gamma, s in adapters:
        term = (lam * s)[win.row_k, win.row_b] * gamma[win.row_b, win.col]
        total = term if total is None else total.add_(term)
    assert total is not None
    return total.mul_(win.a_val)


def _csr(pattern: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    with _quiet():
        return torch.sparse_csr_tensor(
            pattern.crow_indices(), pattern.col_indices(), values, pattern.shape, check_invariants=False
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch's notice that sparse CSR support is in beta: these kernels are tested against the dense ones.

    Invariant checks are off (``check_invariants=False``): the structures are built here, valid by construction.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        yield


def forward_into(y2: torch.Tensor, x2: torch.Tensor, win: SparseWindow, adapters: Adapters, in_le_out: bool) -> torch.Tensor:
    """Add the group's factored output to ``y2`` (N, out); returns ``h^T`` (K, N), the inner product."""
    values = _values(win, adapters)
    h_t: torch.Tensor  # torch.sparse.mm is typed as returning Any
    if in_le_out:  # h = x S^T, y = h B^T
        h_t = torch.sparse.mm(_csr(win.pattern, values), x2.T)
        y2 += torch.sparse.mm(win.b, h_t).T.to(y2.dtype)
    else:  # h = x B, y = h S
        h_t = torch.sparse.mm(win.bt, x2.T)
        y2 += torch.sparse.mm(_csr(win.pattern_t, values[win.perm_t]), h_t).T.to(y2.dtype)
    return h_t


def backward(
    g2: torch.Tensor,
    x2: torch.Tensor,
    win: SparseWindow,
    adapters: Adapters,
    in_le_out: bool,
    h_t: torch.Tensor | None,
    need_in: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(input gradient or None, dL/dS on the pattern)`` for one group; ``h_t`` is forward's (or ``None``)."""
    values = _values(win, adapters)
    if in_le_out:  # gh = g B, dL/dS = gh^T x, grad_x = gh S
        gh_t = torch.sparse.mm(win.bt, g2.T)
        grad_s = torch.sparse.sampled_addmm(win.pattern, gh_t, x2, beta=0.0).values()
        grad_in = torch.sparse.mm(_csr(win.pattern_t, values[win.perm_t]), gh_t).T if need_in else None
        return grad_in, grad_s
    if h_t is None:
        h_t = torch.sparse.mm(win.bt, x2.T)
    grad_s = torch.sparse.sampled_addmm(win.pattern, h_t, g2, beta=0.0).values()  # dL/dS = h^T g
    grad_in = torch.sparse.mm(win.b, torch.sparse.mm(_csr(win.pattern, values), g2.T)).T if need_in else None
    return grad_in, grad_s


def parameter_grads(
    win: SparseWindow, grad_s: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, s: float, need: tuple[bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SPEC 3.6's lambda and gamma gradients from dL/dS given on the pattern, for one adapter of scaling ``s``."""
    u = grad_s * win.a_val * s
    grad_lam = grad_gamma = None
    if need[0]:
        flat = torch.zeros(lam.numel(), dtype=u.dtype, device=u.device)
        grad_lam = flat.index_add_(0, win.row_k * win.nb + win.row_b, u * gamma[win.row_b, win.col]).view_as(lam).to(lam.dtype)
    if need[1]:
        flat = torch.zeros(gamma.numel(), dtype=u.dtype, device=u.device)
        grad_gamma = flat.index_add_(0, win.row_b * win.m + win.col, u * lam[win.row_k, win.row_b]).view_as(gamma)
        grad_gamma = grad_gamma.to(gamma.dtype)
    return grad_lam, grad_gamma
