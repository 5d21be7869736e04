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

from dataclasses import dataclass
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


# -- the whole adapted layer in one autograd node: factored or dense (issue #6) -------------------


@dataclass(frozen=True)
class LayerPlan:
    """How :class:`RandLoraLinearFunction` evaluates one call (a plain value, passed through autograd).

    Attributes:
        in_le_out: ``I <= O`` (selects the orientation of ``P``, SPEC 3.4).
        weight_in_out: the base weight is stored ``(I, O)`` (``fan_in_fan_out``) instead of ``(O, I)``.
        scalings: one tuple per group of adapters sharing a basis window (equal rank), holding each
            adapter's scaling ``s = alpha / r`` in the order of its ``(lambda, gamma)`` operands.
        dense_forward: fold ``delta_W`` into the base matmul in forward (else factored).
        dense_backward: gradients through ``W + delta_W`` and ``G = g^T x`` (else factored).

    """

    in_le_out: bool
    weight_in_out: bool
    scalings: tuple[tuple[float, ...], ...]
    dense_forward: bool
    dense_backward: bool


Group = tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float]]]


def _groups(plan: LayerPlan, ops: tuple[torch.Tensor, ...]) -> list[Group]:
    """Unflatten ``(a_s, b_flat, lam_1, gamma_1, lam_2, gamma_2, ...)`` per group."""
    out, i = [], 0
    for scalings in plan.scalings:
        a_s, b_flat = ops[i], ops[i + 1]
        i += 2
        adapters = []
        for s in scalings:
            adapters.append((ops[i], ops[i + 1], s))
            i += 2
        out.append((a_s, b_flat, adapters))
    return out


def combined_scaled_basis(a_s: torch.Tensor, adapters: list[tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """``sum_a s_a * S_flat(lambda_a, gamma_a)``, shape (r*nb, m): every adapter of one window at once.

    Adapters of equal rank share ``a_s`` and ``b_flat``, and the adapter outputs are linear in
    ``S_flat``, so their sum needs one pair of matmuls (factored) or one ``b_flat @ S`` (dense)
    instead of one per adapter. The scaling is folded into lambda (an (r, nb) tensor) rather than
    applied to the (tokens, out) output. Two elementwise passes, one allocation.
    """
    m = a_s.shape[1]
    total: torch.Tensor | None = None
    for lam, gamma, s in adapters:
        term = (lam * s)[:, :, None] * a_s[:, None, :]
        if total is None:
            total = term.mul_(gamma)
        else:
            total.addcmul_(term, gamma)
    assert total is not None
    return total.reshape(-1, m)


def _basis_grads(
    grad_s: torch.Tensor,
    a_s: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    s: float,
    need_lam: bool,
    need_gamma: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SPEC 3.6 reductions from ``grad_s`` = dL/d(combined S) (rows ``k*nb + b``) for one adapter of scaling ``s``.

    ``u[k, b, j] = s * grad_S[k, b, j] * A[k, j]`` is formed once (over ``grad_s`` itself when
    ``in_place``, i.e. when no other adapter needs it); both reductions are then batched matmuls
    over ``b`` reading it in place (``grad_lambda[k, b] = u[k, b, :] . gamma[b, :]``,
    ``grad_gamma[b, :] = lambda[:, b] @ u[:, b, :]``) instead of two more full-size products.
    """
    r, m = a_s.shape
    nb = lam.shape[1]
    weight = (a_s * s)[:, None, :]
    u = grad_s.view(r, nb, m).mul_(weight) if in_place else grad_s.view(r, nb, m) * weight
    u_b = u.transpose(0, 1)  # (nb, r, m), a view
    grad_lam = torch.bmm(u_b, gamma[:, :, None]).squeeze(2).T if need_lam else None
    grad_gamma = torch.bmm(lam.T[:, None, :], u_b).squeeze(1) if need_gamma else None
    return grad_lam, grad_gamma


def effective_weight(weight: torch.Tensor, plan: LayerPlan, groups: list[Group], bases: list[torch.Tensor]) -> torch.Tensor:
    """``W + sum_g b_flat_g @ S_g`` in the weight's storage layout, as fused ``addmm`` calls (no separate add pass).

    ``P = b_flat @ S`` is (M, m): (O, I) when ``in_le_out``. When the storage layout is the other
    orientation the product is formed transposed, ``S^T @ b_flat^T``, which costs the same.
    """
    same = plan.in_le_out != plan.weight_in_out
    w: torch.Tensor | None = None
    for (_, b_flat, _), s in zip(groups, bases, strict=True):
        m1, m2 = (b_flat, s) if same else (s.T, b_flat.T)
        w = torch.addmm(weight, m1, m2) if w is None else w.addmm_(m1, m2)
    assert w is not None
    return w


def _base_matmul(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_in_out: bool) -> torch.Tensor:
    if weight_in_out:
        return torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return torch.nn.functional.linear(x2, weight, bias)


class RandLoraLinearFunction(torch.autograd.Function):
    """Base layer plus every active adapter of one layer as a single autograd node.

    ``forward(plan, x, weight, bias, *ops)`` with ``ops = (a_s, b_flat, lam_1, gamma_1, ...)`` per
    group of :class:`LayerPlan`. The base weight and bias are frozen inputs (the bias may train).
    All matmuls run in the compute dtype of the adapter operands; ``x``, ``weight`` and ``bias`` are
    cast to it when they differ (only the dense path is used that way) and the output has ``x``'s
    dtype.

    Saved for backward: ``x``, the weight and bias (references, no copy), the operands, and for a
    factored forward of a layer with ``I > O`` whose lambda/gamma need gradients also
    ``h = x @ b_flat`` (tokens x r*nb, the size PEFT keeps too) so backward need not recompute the
    largest matmul. The dense path never saves ``W + delta_W`` (an (O, I) matrix): backward rebuilds
    it, so dense memory does not grow over factored.

    Factored mode accumulates the adapter's last matmul into the base output with ``addmm`` (and the
    same for ``grad_x``), so no (tokens, out) temporary or separate add/scale pass exists.
    """

    @staticmethod
    def forward(
        ctx: Any, plan: LayerPlan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *ops: torch.Tensor
    ) -> torch.Tensor:
        """The layer output ``x @ W_eff^T + bias`` (any leading axes on ``x``)."""
        groups = _groups(plan, ops)
        dtype = ops[0].dtype
        bases = [combined_scaled_basis(a_s, adapters) for a_s, _, adapters in groups]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w_c = weight.to(dtype)
        b_c = bias.to(dtype) if bias is not None else None
        need_params = any(ctx.needs_input_grad[4:])
        keep_h = not plan.dense_forward and not plan.dense_backward and not plan.in_le_out and need_params
        hs: list[torch.Tensor] = []
        if plan.dense_forward:
            w_eff = effective_weight(w_c, plan, groups, bases)
            del bases  # free S before the (tokens x out) output is allocated
            y2 = _base_matmul(x2, w_eff, b_c, plan.weight_in_out)
            del w_eff
        else:
            y2 = _base_matmul(x2, w_c, b_c, plan.weight_in_out)
            for (_, b_flat, _), s in zip(groups, bases, strict=True):
                if plan.in_le_out:
                    y2.addmm_(x2 @ s.T, b_flat.T)
                else:
                    h = x2 @ b_flat
                    y2.addmm_(h, s)
                    if keep_h:
                        hs.append(h)
        ctx.plan, ctx.n_h, ctx.bias_dtype = plan, len(hs), bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, *ops, *hs)
        return y2.reshape(*x.shape[:-1], y2.shape[-1]).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients for ``x``, the bias and every lambda/gamma (SPEC 3.6); none for the weight or bases.

        Ordered for a low peak: the lambda/gamma gradients of a group are finished (and their
        temporaries freed) before its contribution to ``grad_x`` is formed, and on the dense path
        ``G = g^T x`` and ``W + delta_W`` (both weight-sized) are never alive together.
        """
        plan: LayerPlan = ctx.plan
        saved = ctx.saved_tensors
        x, weight = saved[0], saved[1]
        ops = saved[2 : len(saved) - ctx.n_h]
        hs = saved[len(saved) - ctx.n_h :]
        groups = _groups(plan, ops)
        dtype = ops[0].dtype
        need_x = ctx.needs_input_grad[1]
        need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
        need = ctx.needs_input_grad[4:]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        grads: list[torch.Tensor | None] = [None] * len(ops)
        offsets, i = [], 0
        for _, _, adapters in groups:
            offsets.append(i)
            i += 2 + 2 * len(adapters)

        def finish(index: int, grad_s: torch.Tensor) -> None:
            """lambda/gamma gradients of group ``index`` from dL/dS (consumed: reused in place for the last adapter)."""
            a_s, _, adapters = groups[index]
            j = offsets[index] + 2
            for n, (lam, gamma, s) in enumerate(adapters):
                last = n == len(adapters) - 1
                grads[j], grads[j + 1] = _basis_grads(grad_s, a_s, lam, gamma, s, need[j], need[j + 1], in_place=last)
                j += 2

        wanted = [any(need[o + 2 : o + 2 + 2 * len(g[2])]) for o, g in zip(offsets, groups, strict=True)]
        grad_x: torch.Tensor | None = None
        if plan.dense_backward:
            if any(wanted):
                g_w = g2.T @ x2  # dL/d(delta_W), (O, I)
                for index, (_, b_flat, _) in enumerate(groups):
                    if wanted[index]:
                        finish(index, b_flat.T @ g_w if plan.in_le_out else (g_w @ b_flat).T)
                del g_w
            if need_x:
                bases = [combined_scaled_basis(a_s, adapters) for a_s, _, adapters in groups]
                w_eff = effective_weight(weight.to(dtype), plan, groups, bases)
                del bases
                grad_x = g2 @ w_eff.T if plan.weight_in_out else g2 @ w_eff
                del w_eff
        else:
            if need_x:
                w_c = weight.to(dtype)
                grad_x = g2 @ w_c.T if plan.weight_in_out else g2 @ w_c
            for index, (a_s, b_flat, adapters) in enumerate(groups):
                if plan.in_le_out:  # x -> h = x S^T -> y = h B^T;  gh = g B feeds both gradients
                    gh = g2 @ b_flat
                    if wanted[index]:
                        finish(index, gh.T @ x2)
                    if grad_x is not None:
                        grad_x.addmm_(gh, combined_scaled_basis(a_s, adapters))
                    del gh
                else:  # x -> h = x B -> y = h S
                    if wanted[index]:
                        h = hs[index] if hs else x2 @ b_flat
                        finish(index, h.T @ g2)
                        del h
                    if grad_x is not None:
                        grad_x.addmm_(g2 @ combined_scaled_basis(a_s, adapters).T, b_flat.T)
        grad_bias = g2.sum(0).to(ctx.bias_dtype) if need_bias else None
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        return (None, grad_x, None, grad_bias, *grads)


def linear_forward(
    plan: LayerPlan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ops: list[torch.Tensor]
) -> torch.Tensor:
    """Apply :class:`RandLoraLinearFunction` (the base weight must not require grad)."""
    return RandLoraLinearFunction.apply(plan, x, weight, bias, *ops)
