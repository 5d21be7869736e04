"""The tensor kernels of the layer engine (SPEC 3.2-3.6 with memory in mind), shared by its node and its cache.

Notation as in :mod:`randlora_core.plain`: ``a_s`` (r, m), ``b_flat`` (M, nb*r), lambda (r, nb),
gamma (nb, m), scaled bases ``S`` (r*nb, m), ``P = b_flat @ S`` (M, m).
"""

from __future__ import annotations

import torch
from torch import nn


def combined_scaled_basis(a_s: torch.Tensor, adapters: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """``sum_a s_a * S_flat(lambda_a, gamma_a)`` (r*nb, m): one window's adapters at once.

    The scaling is folded into lambda (an (r, nb) tensor) rather than applied to the (tokens, out)
    output: two elementwise passes, one allocation.
    """
    total: torch.Tensor | None = None
    for lam, gamma, s in adapters:
        term = (lam * s)[:, :, None] * a_s[:, None, :]
        total = term.mul_(gamma) if total is None else total.addcmul_(term, gamma)
    assert total is not None
    return total.reshape(-1, a_s.shape[1])


def activation_into(
    y2: torch.Tensor,
    x2: torch.Tensor,
    a_s: torch.Tensor,
    b_flat: torch.Tensor,
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
    in_le_out: bool,
) -> None:
    """``y2 += sum_a s_a * x2 @ delta_W_a^T`` without forming ``S_flat`` (the ``activation`` path, no autograd).

    ``S_flat[k*nb + b, j] = lambda[k, b] a_s[k, j] gamma[b, j]`` is applied to the activations. For
    ``I <= O``, ``z[t, k, b] = sum_j x2[t, j] a_s[k, j] gamma[b, j]`` is one product: the smaller of
    ``a_s`` (r, m) and ``gamma`` (nb, m) scales the rows of ``x2`` elementwise, the other is the
    matmul operand; ``z * lambda`` read in (k, b) order is ``x2 @ S_flat^T``, then ``@ b_flat^T``. For
    ``I > O`` the mirror: ``h = x2 @ b_flat`` times lambda, one product with the larger factor, the
    smaller weighs the rows and they are summed. The (N, min(r, nb), m) intermediate makes it a
    path for few tokens (:mod:`randlora_core.compute`).
    """
    n, (r, m) = x2.shape[0], a_s.shape
    nb = b_flat.shape[1] // r
    # one adapter: its scaling rides on the last product's alpha instead of an (r, nb) multiply
    single = len(adapters) == 1
    alpha = adapters[0][2] if single else 1.0
    if in_le_out:
        h: torch.Tensor | None = None
        for lam, gamma, s in adapters:
            lam_s = lam if single else lam * s
            if r <= nb:
                z = torch.mm((x2.unsqueeze(1) * a_s).view(-1, m), gamma.T).view(n, r, nb)
            else:
                z = torch.mm((x2.unsqueeze(1) * gamma).view(-1, m), a_s.T).view(n, nb, r).transpose(1, 2)
            h = z.mul_(lam_s) if h is None else h.addcmul_(z, lam_s)
        assert h is not None
        y2.addmm_(cast(h.reshape(n, r * nb), y2.dtype), cast(b_flat, y2.dtype).T, alpha=alpha)
        return
    hb = (x2 @ b_flat).view(n, r, nb)
    for lam, gamma, s in adapters:
        v = hb * (lam if single else lam * s)
        rows, operand, weight = (v, gamma, a_s) if r <= nb else (v.transpose(1, 2), a_s, gamma)
        z = torch.mm(rows.reshape(-1, rows.shape[2]), operand).view(n, -1, m).mul_(weight)
        y2.add_(cast(z.sum(1), y2.dtype), alpha=alpha)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; itself when it already is (``Tensor.to`` costs microseconds even then, per layer call)."""
    return t if t.dtype == dtype else t.to(dtype)


def poison_nonfinite_rows(y2: torch.Tensor, x2: torch.Tensor) -> None:
    """Make every row of ``y2`` (N, out) NaN whose input row of ``x2`` (N, in) holds a non-finite value.

    Under IEEE arithmetic the factored path turns an infinite input into NaN where it meets a zero of
    ``S`` while the dense path keeps it; poisoning the whole row makes every path agree, so the output
    does not depend on the batch size through the path choice.
    """
    y2 += cast(x2.abs().amax(dim=1, keepdim=True).mul_(0), y2.dtype)


def basis_grads(
    grad_s: torch.Tensor,
    a_s: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    s: float,
    need: tuple[bool, bool],
    in_place: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SPEC 3.6 reductions from ``grad_s`` = dL/d(combined S_flat) for one adapter of scaling ``s``.

    ``u[k, b, j] = s * grad_S[k, b, j] * A[k, j]`` is formed once (over ``grad_s`` itself when
    ``in_place``, i.e. no other adapter needs it); both reductions are batched matmuls over ``b``
    reading it in place instead of two more full-size products.
    """
    r, m = a_s.shape
    nb = lam.shape[1]
    weight = (a_s * s)[:, None, :]
    u = grad_s.view(r, nb, m).mul_(weight) if in_place else grad_s.view(r, nb, m) * weight
    u_b = u.transpose(0, 1)  # (nb, r, m), a view
    grad_lam = torch.bmm(u_b, gamma[:, :, None]).squeeze(2).T.to(lam.dtype) if need[0] else None
    grad_gamma = torch.bmm(lam.T[:, None, :], u_b).squeeze(1).to(gamma.dtype) if need[1] else None
    return grad_lam, grad_gamma


def delta_sum(
    weight: torch.Tensor | None, in_le_out: bool, weight_in_out: bool, pairs: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """``W + sum_g b_flat_g @ S_g`` (or the sum alone) for ``pairs = [(b_flat_g, S_g)]``, as fused ``addmm`` calls.

    ``P = b_flat @ S`` is (M, m), i.e. (O, I) when ``in_le_out``; in the ``weight_in_out`` layout
    the other orientation is formed directly, ``S^T @ b_flat^T``, which costs the same.
    """
    same = in_le_out != weight_in_out
    total = weight
    for b_flat, s in pairs:
        m1, m2 = (b_flat, s) if same else (s.T, b_flat.T)
        total = m1 @ m2 if total is None else (torch.addmm(total, m1, m2) if total is weight else total.addmm_(m1, m2))
    assert total is not None
    return total


def times(x: torch.Tensor, w: torch.Tensor, weight_in_out: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a weight in ``(O, I)`` layout, ``x @ W (+ bias)`` in ``(I, O)`` layout; any leading axes."""
    if weight_in_out:
        y = x @ w
        return y.add_(bias) if bias is not None else y
    return nn.functional.linear(x, w, bias)


def times_into(
    x: torch.Tensor, w: torch.Tensor, weight_in_out: bool, bias: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`times` written into a fresh tensor with ``x``'s leading axes: ``(y, y2)``, ``y2`` its 2-D view.

    ``y`` is nobody's view (a module output that is a view breaks FSDP2's backward hooks; torch's
    own ``linear`` returns one for inputs of more than two axes), and ``y2`` is where later terms
    accumulate in place.
    """
    x2 = x.reshape(-1, x.shape[-1])
    out_features = w.shape[1] if weight_in_out else w.shape[0]
    y = torch.empty((*x.shape[:-1], out_features), dtype=dtype, device=x.device)
    y2 = y.view(-1, out_features)
    mat = w if weight_in_out else w.T
    if bias is not None:
        torch.addmm(bias, x2, mat, out=y2)
    else:
        torch.mm(x2, mat, out=y2)
    return y, y2


def own_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of ``t`` in ``dtype`` that shares nothing with it (to accumulate into in place)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def grad_times(g2: torch.Tensor, w: torch.Tensor, weight_in_out: bool) -> torch.Tensor:
    """The input gradient of :func:`times`."""
    return g2 @ w.T if weight_in_out else g2 @ w
