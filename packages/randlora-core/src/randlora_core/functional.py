"""RandLoRA adapter math (SPEC.md section 3) and its memory-lean autograd.

Notation as in the spec: a layer with ``I`` inputs and ``O`` outputs has ``m = min(I, O)``,
``M = max(I, O)``, ``nb = ceil(m / r)``; ``a_s = A[:r, 0, :m]`` is (r, m), ``b_flat`` (M, nb*r) is
``B[:M, :nb, :r]`` flattened over its last two axes, and ``S_flat`` (r*nb, m) is the scaled basis
with rows ``k*nb + b``. The factored adapter output is

    I <= O:  y = s * (x @ S_flat^T) @ b_flat^T
    I >  O:  y = s * (x @ b_flat) @ S_flat

:class:`RandLoraFunction` computes it without keeping ``S_flat`` alive between forward and backward:
only ``x``, ``a_s``, ``b_flat`` (a view of the shared bases), ``lambda`` and ``gamma`` are saved, and
``S_flat`` is rebuilt in backward. That saves one (r*nb, m) ~ (m, m) tensor per adapted layer per
step compared with autograd through plain ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


def scaled_basis(a_s: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``S_flat`` (r*nb, m): ``S_flat[k*nb + b, j] = lam[k, b] * a_s[k, j] * gamma[b, j]``, as plain ops."""
    r, m = a_s.shape
    return (lam[:, :, None] * a_s[:, None, :] * gamma[None, :, :]).reshape(r * lam.shape[1], m)


def delta_weight(
    a_s: torch.Tensor, b_flat: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, scaling: float, in_le_out: bool
) -> torch.Tensor:
    """``delta_W`` in (out, in) orientation: ``s * P`` if ``in_le_out`` else ``s * P^T``, with ``P = b_flat @ S_flat``."""
    p = (b_flat @ scaled_basis(a_s, lam, gamma)) * scaling
    return p if in_le_out else p.T


def adapter_output_plain(
    x: torch.Tensor,
    a_s: torch.Tensor,
    b_flat: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    scaling: float,
    in_le_out: bool,
) -> torch.Tensor:
    """The factored adapter output with autograd through plain ops (keeps ``S_flat`` for backward)."""
    s = scaled_basis(a_s, lam, gamma)
    return ((x @ s.T) @ b_flat.T if in_le_out else (x @ b_flat) @ s) * scaling


class RandLoraFunction(torch.autograd.Function):
    """Factored adapter output with ``S_flat`` recomputed in backward (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        a_s: torch.Tensor,
        b_flat: torch.Tensor,
        lam: torch.Tensor,
        gamma: torch.Tensor,
        scaling: float,
        in_le_out: bool,
    ) -> torch.Tensor:
        """``s * (x @ S^T) @ B^T`` (``in_le_out``) or ``s * (x @ B) @ S``; ``x`` has any leading axes."""
        s = scaled_basis(a_s, lam, gamma)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = (x2 @ s.T) @ b_flat.T if in_le_out else (x2 @ b_flat) @ s
        ctx.save_for_backward(x, a_s, b_flat, lam, gamma)
        ctx.scaling, ctx.in_le_out = scaling, in_le_out
        return (y2 * scaling).reshape(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients for ``x``, ``lambda`` and ``gamma`` (SPEC 3.6); the bases get none."""
        x, a_s, b_flat, lam, gamma = ctx.saved_tensors
        need_x, need_lam, need_gamma = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        r, m = a_s.shape
        nb = lam.shape[1]
        s = scaled_basis(a_s, lam, gamma)
        x2 = x.reshape(-1, x.shape[-1])
        # Under autocast the forward's matmuls may have produced a narrower grad_y; backward runs
        # in the operands' own dtype (autocast is off here) and casts each gradient back.
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(s.dtype) * ctx.scaling
        grad_x = grad_s = None
        if ctx.in_le_out:  # x (n, m) -> h = x S^T (n, r*nb) -> y = h B^T (n, M)
            grad_h = g2 @ b_flat
            if need_x:
                grad_x = grad_h @ s
            if need_lam or need_gamma:
                grad_s = grad_h.T @ x2
        else:  # x (n, M) -> h = x B (n, r*nb) -> y = h S (n, m)
            if need_x:
                grad_x = (g2 @ s.T) @ b_flat.T
            if need_lam or need_gamma:
                grad_s = (x2 @ b_flat).T @ g2
        grad_lam = grad_gamma = None
        if grad_s is not None:
            weighted = grad_s.view(r, nb, m) * a_s[:, None, :]  # grad_S[k, b, j] * A[k, j]
            if need_lam:
                grad_lam = (weighted * gamma[None, :, :]).sum(dim=2)
            if need_gamma:
                grad_gamma = (weighted * lam[:, :, None]).sum(dim=0)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if grad_lam is not None:
            grad_lam = grad_lam.to(lam.dtype)
        if grad_gamma is not None:
            grad_gamma = grad_gamma.to(gamma.dtype)
        return grad_x, None, None, grad_lam, grad_gamma, None, None


def adapter_output(
    x: torch.Tensor,
    a_s: torch.Tensor,
    b_flat: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    scaling: float,
    in_le_out: bool,
) -> torch.Tensor:
    """The adapter's contribution ``x @ delta_W^T`` (before adding the base output), memory-lean.

    All tensors must share one dtype and device; ``x`` has any leading axes and last axis ``I``.
    """
    return RandLoraFunction.apply(x, a_s, b_flat, lam, gamma, scaling, in_le_out)
