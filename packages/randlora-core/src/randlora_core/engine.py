"""The layer engine: every RandLoRA layer call is planned once and evaluated as one autograd node.

A call computes (SPEC 3.5), for the base weight ``W`` and each active adapter ``a``,

    y = base(x) + sum_a  x_a @ delta_W_a^T        with  x_a = dropout_a(x)

Wrappers (:class:`~randlora_core.layer.RandLoraLinear`, the bitsandbytes wrappers, randlora-peft's
accelerated PEFT layers) gather their operands into a :class:`BaseCall` and one :class:`AdapterCall`
per active adapter and call :func:`layer_forward`, which

1. groups the adapters (:func:`group_adapters`): adapters reading the same basis window and the
   same input are evaluated together (the output is linear in ``S_flat``, so their scaled bases
   are summed and a group costs one pair of thin matmuls); an adapter whose dropout is active
   reads its own input and forms a group of its own;
2. plans the call (:func:`plan_call`, pure): the base matmul inside the node (*fused*: the base is
   exactly ``x @ W^T + b``, its weight needs no gradient, no autocast) or the base layer's own
   output added to it (*external*); and the path, ``factored`` (``x -> r*nb -> out`` per group),
   ``dense`` (``delta_W`` built once per call, folded into ``W`` when fused) or ``hybrid`` (dense
   forward, factored backward), forced by ``compute`` or picked by :mod:`randlora_core.compute`,
   which under ``auto`` may also pick ``activation`` for a call needing no gradient (few tokens:
   ``S_flat`` is applied to the activations, never formed; :func:`~randlora_core.kernels.activation_into`);
3. runs :class:`RandLoraFunction`, or with gradients disabled its :func:`evaluate` alone (a
   Function's bookkeeping costs tens of microseconds per call, a visible share of a decode step).

Memory: only ``x``, the base weight (a reference), the operands and, for a factored ``I > O``
layer that trains, ``h = x @ b_flat`` (tokens x r*nb, as PEFT keeps) are saved for backward;
``S_flat`` and ``W + delta_W`` are rebuilt in backward, never kept between forward and backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from randlora_core import kernels, sparse
from randlora_core.compute import Compute, choose_path, describe_call, resolve_compute
from randlora_core.inference_cache import cacheable, cached_forward
from randlora_core.kernels import basis_grads, cast, combined_scaled_basis, delta_sum, grad_times, own_copy, times, times_into
from randlora_core.operands import AdapterCall, BaseCall
from randlora_core.sparse import SparseWindow


@dataclass(frozen=True)
class GroupPlan:
    """One group of adapters sharing a window and an input: their scalings, and whether the input is their own."""

    scalings: tuple[float, ...]
    own_input: bool


@dataclass(frozen=True)
class Plan:
    """How :class:`RandLoraFunction` evaluates one call (a plain value passed through autograd).

    Attributes:
        in_le_out: ``I <= O`` (selects the orientation of ``P``, SPEC 3.4).
        weight_in_out: the layout in which ``W`` and ``delta_W`` are multiplied: ``(I, O)`` if true.
        fused_base: the node computes ``x @ W^T + b`` itself; else it adds the base layer's output.
        groups: the adapter groups, in operand order.
        dense_forward: build ``delta_W`` in forward (folded into ``W`` when fused).
        dense_backward: gradients through ``delta_W`` and ``G = g^T x`` (else factored).
        sparse: per group, on the ``sparse`` path, its window's structure (the factored path on
            the nonzeros); empty otherwise.
        activation: the forward-only ``activation`` path (no gradient needed; ``S_flat`` never formed).

    """

    in_le_out: bool
    weight_in_out: bool
    fused_base: bool
    groups: tuple[GroupPlan, ...]
    dense_forward: bool
    dense_backward: bool
    sparse: tuple[SparseWindow | None, ...] = ()
    activation: bool = False


def group_adapters(adapters: Sequence[AdapterCall]) -> list[list[AdapterCall]]:
    """Adapters sharing a window and the input ``x`` in one group each (in order); own-input adapters alone."""
    groups: list[list[AdapterCall]] = []
    shared: dict[Hashable, list[AdapterCall]] = {}
    for adapter in adapters:
        if adapter.own_input:
            groups.append([adapter])
        elif adapter.window in shared:
            shared[adapter.window].append(adapter)
        else:
            shared[adapter.window] = [adapter]
            groups.append(shared[adapter.window])
    return groups


def fusable(x: torch.Tensor, base: BaseCall, dtype: torch.dtype, compute: str) -> bool:
    """Whether the node may compute the base matmul itself (see the module docstring).

    Only when no gradient for the weight is needed (``requires_grad`` under grad mode), so the
    frozen weight's flag alone never changes the path. The node computes in the adapters' dtype,
    so a base of another dtype is fused only on an explicit ``dense`` request.
    """
    weight, bias = base.weight, base.bias
    if weight is None or weight.device != x.device or torch.is_autocast_enabled(x.device.type):
        return False
    if weight.requires_grad and torch.is_grad_enabled():
        return False
    native = x.dtype == dtype and weight.dtype == dtype and (bias is None or bias.dtype == dtype)
    return native or compute == "dense"


def plan_call(
    x: torch.Tensor,
    base: BaseCall,
    groups: list[list[AdapterCall]],
    in_features: int,
    out_features: int,
    compute: str,
) -> Plan:
    """The :class:`Plan` of a call: base fused or external, and the path (``compute`` or the cost model's)."""
    dtype = groups[0][0].a_s.dtype
    fused = fusable(x, base, dtype, compute)
    own = [members[0].own_input for members in groups]
    windows = tuple(members[0].sparse for members in groups)
    sparse_nnz = tuple(w.nnz for w in windows if w is not None) if all(windows) else None
    if any(own) or torch.is_autocast_enabled(x.device.type):
        path = "factored"  # dense needs every adapter to read x itself, and a dtype fixed by us
    elif compute in ("factored", "dense"):
        path = compute
    elif compute == "sparse":
        path = "sparse" if sparse_nnz is not None else "factored"
    else:
        path = choose_path(describe_call(x, base, groups, in_features, out_features, fused, sparse_nnz))
    in_le_out = in_features <= out_features
    return Plan(
        in_le_out=in_le_out,
        # With an external base delta_W is multiplied in P's own orientation (no transpose).
        weight_in_out=base.weight_in_out if fused else not in_le_out,
        fused_base=fused,
        groups=tuple(GroupPlan(tuple(a.scaling for a in members), o) for members, o in zip(groups, own, strict=True)),
        dense_forward=path in ("dense", "hybrid"),
        dense_backward=path == "dense",
        sparse=windows if path == "sparse" else (),
        activation=path == "activation",
    )


def layer_forward(
    x: torch.Tensor,
    base: BaseCall,
    adapters: Sequence[AdapterCall],
    in_features: int,
    out_features: int,
    compute: Compute = "auto",
    shared_base: torch.Tensor | None = None,
) -> torch.Tensor:
    """The layer output ``base(x) + sum_a dropout_a(x) @ delta_W_a^T``, in ``x``'s dtype.

    ``adapters`` hold every active adapter's operands in one compute dtype on ``x``'s device;
    ``compute`` is the layers' preference (an active :func:`~randlora_core.compute.compute_override`
    beats it). ``shared_base`` is the base layer's output for this very ``x`` when several calls
    share it (mixed-adapter batches): a fused factored plan then adds to it instead of running the
    base matmul again, with the same arithmetic (the base layer's own matmul is the fused one).
    """
    if not adapters:
        return base.forward().to(x.dtype)
    groups = group_adapters(adapters)
    plan = plan_call(x, base, groups, in_features, out_features, resolve_compute(compute))
    if shared_base is not None and plan.fused_base and not plan.dense_forward:
        plan = dataclasses.replace(plan, fused_base=False, weight_in_out=not plan.in_le_out)
        base = dataclasses.replace(base, forward=lambda: shared_base, weight=None, bias=None)
    if base.cache is not None and cacheable(x, plan, base.cache.weights):
        out = cached_forward(x, base, groups, plan.in_le_out, plan.fused_base)
        if out is not None:
            return out
    dtype = groups[0][0].a_s.dtype
    # The base layer runs before any dropout draws, as in PEFT, so random streams line up.
    base_out = None if plan.fused_base else base.forward()
    ops: list[torch.Tensor] = []
    for members, group in zip(groups, plan.groups, strict=True):
        if group.own_input:
            dropout = members[0].dropout
            assert dropout is not None
            ops.append(dropout(x.to(dtype)))
        ops += [members[0].a_s, members[0].b_flat]
        for adapter in members:
            ops += [adapter.lam, adapter.gamma]
    weight, bias = (base.weight, base.bias) if plan.fused_base else (None, None)
    if not torch.is_grad_enabled():
        return evaluate(plan, x, weight, bias, base_out, ops, keep_h=False)[0]
    result: torch.Tensor = RandLoraFunction.apply(plan, x, weight, bias, base_out, *ops)  # typed Any by torch
    return result


# -- the autograd node ------------------------------------------------------------------------


@dataclass
class _Group:
    """One group's tensors inside the node: its own input (or ``None`` for ``x``), its window, its adapters."""

    x: torch.Tensor | None
    a_s: torch.Tensor
    b_flat: torch.Tensor
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]]
    offset: int  # index of the group's first operand in ``ops``


def _unflatten(plan: Plan, ops: Sequence[torch.Tensor]) -> list[_Group]:
    out, i = [], 0
    for group in plan.groups:
        offset = i
        own = ops[i] if group.own_input else None
        i += int(group.own_input)
        a_s, b_flat = ops[i], ops[i + 1]
        i += 2
        adapters = []
        for s in group.scalings:
            adapters.append((ops[i], ops[i + 1], s))
            i += 2
        out.append(_Group(own, a_s, b_flat, adapters, offset))
    return out


def _pairs(groups: list[_Group], bases: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(g.b_flat, b) for g, b in zip(groups, bases, strict=True)]


def evaluate(
    plan: Plan,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    base_out: torch.Tensor | None,
    ops: Sequence[torch.Tensor],
    keep_h: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The layer output of :class:`RandLoraFunction` (same arguments), and each group's ``h`` if ``keep_h``."""
    groups = _unflatten(plan, ops)
    dtype = groups[0].a_s.dtype
    n_in = x.shape[-1]
    reads_x = plan.fused_base or any(g.x is None for g in groups)
    x2 = cast(x.reshape(-1, n_in), dtype) if reads_x else x
    # the sparse path forms S's nonzeros itself, the activation path none
    bases = [g.a_s if plan.sparse or plan.activation else combined_scaled_basis(g.a_s, g.adapters) for g in groups]
    # y is built with x's leading axes and written through the 2-D view y2, so the node returns
    # no view (FSDP2 warns that a module returning a view can break backward).
    if plan.fused_base:
        assert weight is not None
        w = cast(weight, dtype)
        w = delta_sum(w, plan.in_le_out, plan.weight_in_out, _pairs(groups, bases)) if plan.dense_forward else w
        y, y2 = times_into(cast(x, dtype), w, plan.weight_in_out, cast(bias, dtype) if bias is not None else None, dtype)
        del w
    else:
        assert base_out is not None
        y = own_copy(base_out, torch.promote_types(base_out.dtype, dtype))
        y2 = y.view(-1, y.shape[-1])
    if not plan.fused_base and plan.dense_forward:
        delta = delta_sum(None, plan.in_le_out, plan.weight_in_out, _pairs(groups, bases))
        y2 += times(x2, delta, plan.weight_in_out).to(y2.dtype)
    hs: list[torch.Tensor] = []
    if plan.activation:
        for group in groups:
            xg = x2 if group.x is None else group.x.reshape(-1, n_in)
            kernels.activation_into(y2, xg, group.a_s, group.b_flat, group.adapters, plan.in_le_out)
    elif not plan.dense_forward:
        for index, (group, s) in enumerate(zip(groups, bases, strict=True)):
            xg = x2 if group.x is None else group.x.reshape(-1, n_in)
            window = plan.sparse[index] if plan.sparse else None
            if window is not None:
                h = sparse.forward_into(y2, xg, window, group.adapters, plan.in_le_out)
            else:
                h = xg @ (s.T if plan.in_le_out else group.b_flat)
                y2.addmm_(cast(h, y2.dtype), cast(group.b_flat.T if plan.in_le_out else s, y2.dtype))
            if keep_h:
                hs.append(h)
    del bases
    kernels.poison_nonfinite_rows(y2, x.reshape(-1, n_in))
    return cast(y, x.dtype), hs


class RandLoraFunction(torch.autograd.Function):
    """Base layer plus every active adapter of one layer as a single autograd node.

    ``apply(plan, x, weight, bias, base_out, *ops)``: with a fused base ``weight`` (frozen) and
    ``bias`` (may train) are given and ``base_out`` is ``None``; otherwise ``base_out`` is the base
    layer's output. ``ops`` hold per group ``[x_g,] a_s, b_flat, lam_1, gamma_1, ...`` (``x_g`` for an
    own-input group). Matmuls run in the operands' dtype; the output has ``x``'s dtype.
    """

    @staticmethod
    def forward(
        ctx: Any,
        plan: Plan,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        base_out: torch.Tensor | None,
        *ops: torch.Tensor,
    ) -> torch.Tensor:
        """The layer output (any leading axes on ``x``): :func:`evaluate`, saving what backward needs."""
        # h (the sparse path: its gathered input when in <= out) feeds grad_S
        keep_h = not plan.dense_backward and (bool(plan.sparse) or not plan.in_le_out) and any(ctx.needs_input_grad[5:])
        y, hs = evaluate(plan, x, weight, bias, base_out, ops, keep_h)
        ctx.plan, ctx.n_h = plan, len(hs)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.base_dtype = base_out.dtype if base_out is not None else None
        ctx.save_for_backward(x, weight, *ops, *hs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients for ``x``, the bias, ``base_out``, own inputs and every lambda/gamma (SPEC 3.6); see :class:`_Backward`."""
        return _Backward(ctx, grad_y).run()


class _Backward:
    """One backward pass of :class:`RandLoraFunction`.

    Ordered for a low peak: a group's lambda/gamma gradients are finished (and their temporaries
    freed) before its part of the input gradient is formed, and on the dense path ``G = g^T x``
    and ``W + delta_W`` (both weight-sized) are never alive together.
    """

    def __init__(self, ctx: Any, grad_y: torch.Tensor) -> None:
        self.ctx, self.grad_y, self.plan = ctx, grad_y, ctx.plan
        saved = ctx.saved_tensors
        self.x, self.weight = saved[0], saved[1]
        ops = saved[2 : len(saved) - ctx.n_h]
        self.hs = saved[len(saved) - ctx.n_h :]
        self.groups = _unflatten(self.plan, ops)
        self.dtype = self.groups[0].a_s.dtype
        self.need = ctx.needs_input_grad[5:]
        self.need_x = ctx.needs_input_grad[1]
        reads_x = self.plan.fused_base or any(g.x is None for g in self.groups)
        self.x2 = cast(self.x.reshape(-1, self.x.shape[-1]), self.dtype) if reads_x else self.x
        self.g2 = cast(grad_y.reshape(-1, grad_y.shape[-1]), self.dtype)
        self.grads: list[torch.Tensor | None] = [None] * len(ops)

    def run(self) -> tuple[torch.Tensor | None, ...]:
        ctx = self.ctx
        grad_x = self.dense() if self.plan.dense_backward else self.factored()
        grad_bias = self.g2.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[3] else None
        grad_base = self.grad_y.to(ctx.base_dtype) if ctx.base_dtype is not None and ctx.needs_input_grad[4] else None
        if grad_x is not None:
            grad_x = grad_x.reshape(self.x.shape).to(self.x.dtype)
        return (None, grad_x, None, grad_bias, grad_base, *self.grads)

    def _first_param(self, group: _Group) -> int:
        return group.offset + int(group.x is not None) + 2

    def wanted(self, group: _Group) -> bool:
        """Whether any lambda/gamma of ``group`` needs a gradient."""
        j = self._first_param(group)
        return any(self.need[j : j + 2 * len(group.adapters)])

    def finish(self, group: _Group, grad_s: torch.Tensor) -> None:
        """lambda/gamma gradients of ``group`` from dL/dS (consumed: reused in place for the last adapter)."""
        j = self._first_param(group)
        for n, (lam, gamma, s) in enumerate(group.adapters):
            last = n == len(group.adapters) - 1
            self.grads[j], self.grads[j + 1] = basis_grads(
                grad_s, group.a_s, lam, gamma, s, (self.need[j], self.need[j + 1]), last
            )
            j += 2

    def dense(self) -> torch.Tensor | None:
        """``G = g^T x`` for every group's lambda/gamma, then ``grad_x = g @ (W + delta_W)`` (every group reads ``x``)."""
        plan, g2 = self.plan, self.g2
        if any(self.wanted(g) for g in self.groups):
            g_w = g2.T @ self.x2  # dL/d(delta_W), (O, I)
            for group in self.groups:
                if self.wanted(group):
                    self.finish(group, group.b_flat.T @ g_w if plan.in_le_out else (g_w @ group.b_flat).T)
            del g_w
        if not self.need_x:
            return None
        bases = [combined_scaled_basis(g.a_s, g.adapters) for g in self.groups]
        w = self.weight.to(self.dtype) if plan.fused_base else None
        return grad_times(g2, delta_sum(w, plan.in_le_out, plan.weight_in_out, _pairs(self.groups, bases)), plan.weight_in_out)

    def factored(self) -> torch.Tensor | None:
        """Per group, its lambda/gamma gradients and its input's gradient through the two thin matmuls."""
        grad_x = None
        if self.plan.fused_base and self.need_x:
            grad_x = grad_times(self.g2, self.weight.to(self.dtype), self.plan.weight_in_out)
        for index, group in enumerate(self.groups):
            if group.x is None:
                grad_x = self.factored_group(index, group, grad_x if self.need_x else None, self.need_x)
                continue
            grad_in = self.factored_group(index, group, None, self.need[group.offset])
            if grad_in is not None:
                self.grads[group.offset] = grad_in.reshape(group.x.shape).to(group.x.dtype)
        return grad_x

    def factored_group(self, index: int, group: _Group, into: torch.Tensor | None, need_in: bool) -> torch.Tensor | None:
        """One group's lambda/gamma gradients; returns its input gradient (accumulated into ``into`` when given)."""
        g2, b_flat = self.g2, group.b_flat
        xg = self.x2 if group.x is None else group.x.reshape(-1, self.x.shape[-1])
        if self.plan.sparse and self.plan.sparse[index] is not None:
            return self.sparse_group(index, group, xg, into, need_in)
        if self.plan.in_le_out:  # h = x S^T, y = h B^T: gh = g B feeds both gradients
            gh = g2 @ b_flat
            if self.wanted(group):
                self.finish(group, gh.T @ xg)
            if not need_in:
                return into
            s = combined_scaled_basis(group.a_s, group.adapters)
            return into.addmm_(gh, s) if into is not None else gh @ s
        if self.wanted(group):  # h = x B, y = h S
            h = self.hs[index] if self.hs else xg @ b_flat
            self.finish(group, h.T @ g2)
            del h
        if not need_in:
            return into
        gs = g2 @ combined_scaled_basis(group.a_s, group.adapters).T
        return into.addmm_(gs, b_flat.T) if into is not None else gs @ b_flat.T

    def sparse_group(
        self, index: int, group: _Group, xg: torch.Tensor, into: torch.Tensor | None, need_in: bool
    ) -> torch.Tensor | None:
        """:meth:`factored_group` on the nonzeros of a ternary window (:mod:`randlora_core.sparse`)."""
        window = self.plan.sparse[index]
        assert window is not None
        saved = self.hs[index] if self.hs else None
        wanted = self.wanted(group)
        grad_in, grad_s = sparse.backward(
            self.g2, xg, window, group.adapters, self.plan.in_le_out, saved, (need_in, wanted), into if need_in else None
        )
        j = self._first_param(group)
        for lam, gamma, s in group.adapters:
            if grad_s is not None:
                self.grads[j], self.grads[j + 1] = sparse.parameter_grads(
                    window, grad_s, lam, gamma, s, (self.need[j], self.need[j + 1])
                )
            j += 2
        return into if grad_in is None else grad_in  # grad_in is into itself when into was given
