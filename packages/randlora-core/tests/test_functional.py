"""The engine with an external base (the adapter alone) against gradcheck, the plain-op oracle and the spec reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from randlora_core.engine import GroupPlan, Plan, RandLoraFunction, layer_forward
from randlora_core.operands import AdapterCall, BaseCall
from randlora_core.plain import adapter_output as adapter_output_plain
from randlora_core.plain import delta_weight, scaled_basis
from randlora_spec import reference
from randlora_spec.bases import BasesShape, generate_bases
from randlora_spec.tolerances import check_close

# (in, out, r): in < out, in > out, square, m not divisible by r, r > m
SHAPES = [(6, 10, 2), (10, 6, 2), (8, 8, 3), (10, 14, 4), (3, 8, 5)]


def adapter_output(x, a_s, b_flat, lam, gamma, scaling, in_le_out, dropout=None):
    """The engine's factored output with a zero base: the adapter's contribution ``x @ delta_W^T`` alone."""
    out_f = b_flat.shape[0] if in_le_out else a_s.shape[1]
    base = BaseCall(lambda: x.new_zeros(*x.shape[:-1], out_f))
    call = AdapterCall(a_s, b_flat, lam, gamma, scaling, window=0, dropout=dropout)
    return layer_forward(x, base, [call], x.shape[-1], out_f, "factored")


def operands(in_f: int, out_f: int, r: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    m, big_m = min(in_f, out_f), max(in_f, out_f)
    nb = -(-m // r)
    a, b = generate_bases(seed, BasesShape(r=r, m_max=m, M_max=big_m, nb_max=nb))
    gen = torch.Generator().manual_seed(seed)
    lam = torch.randn(r, nb, generator=gen, dtype=dtype)
    gamma = torch.randn(nb, m, generator=gen, dtype=dtype)
    a_s = torch.from_numpy(a[:r, 0, :m]).to(dtype)
    b_flat = torch.from_numpy(b[:big_m, :nb, :r].reshape(big_m, nb * r)).to(dtype)
    return a, b, a_s, b_flat, lam, gamma


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_gradcheck(in_f: int, out_f: int, r: int) -> None:
    _, _, a_s, b_flat, lam, gamma = operands(in_f, out_f, r)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    base_out = torch.randn(2, 3, out_f, dtype=torch.float64, requires_grad=True)
    plan = Plan(in_f <= out_f, in_f > out_f, False, (GroupPlan((1.5,), False),), False, False)

    def fn(x, base_out, lam, gamma):
        return RandLoraFunction.apply(plan, x, None, None, base_out, a_s, b_flat, lam, gamma)

    assert torch.autograd.gradcheck(fn, (x, base_out, lam.requires_grad_(), gamma.requires_grad_()))


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_matches_plain_autograd(in_f: int, out_f: int, r: int) -> None:
    _, _, a_s, b_flat, lam, gamma = operands(in_f, out_f, r)
    x = torch.randn(5, in_f, dtype=torch.float64)
    grad_y = torch.randn(5, out_f, dtype=torch.float64)
    results = []
    for fn in (adapter_output, adapter_output_plain):
        leaves = [t.clone().requires_grad_() for t in (x, lam, gamma)]
        y = fn(leaves[0], a_s, b_flat, leaves[1], leaves[2], 0.75, in_f <= out_f)
        y.backward(grad_y)
        results.append([y.detach(), *(leaf.grad for leaf in leaves)])
    for ours, plain in zip(*results, strict=True):
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_matches_spec_reference(in_f: int, out_f: int, r: int) -> None:
    a, b, a_s, b_flat, lam, gamma = operands(in_f, out_f, r)
    x = torch.randn(2, 4, in_f, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 4, out_f, dtype=torch.float64)
    lam.requires_grad_()
    gamma.requires_grad_()
    scaling = 2.0 / r
    y = adapter_output(x, a_s, b_flat, lam, gamma, scaling, in_f <= out_f)
    y.backward(grad_y)
    adapters = {"a": reference.Adapter(r, 2.0, lam.detach().numpy(), gamma.detach().numpy())}
    zero_w = np.zeros((out_f, in_f))
    y_ref = reference.forward(x.detach().numpy(), zero_w, None, adapters, ["a"], a, b)
    gx_ref, grads = reference.backward(x.detach().numpy(), grad_y.numpy(), zero_w, adapters, ["a"], a, b)
    for actual, expected in (
        (y, y_ref),
        (x.grad, gx_ref),
        (lam.grad, grads["a"][0]),
        (gamma.grad, grads["a"][1]),
    ):
        ok, err, bound = check_close(actual.detach().numpy(), expected, "float64")
        assert ok, (err, bound)
    geom = reference.LayerGeometry(in_f, out_f, r)
    dw = delta_weight(a_s, b_flat, lam.detach(), gamma.detach(), scaling, in_f <= out_f)
    assert check_close(dw.numpy(), reference.delta_weight(geom, adapters["a"], a, b), "float64")[0]


def test_scaled_basis_row_order() -> None:
    # S_flat rows are k*nb + b (SPEC 3.2): check one element explicitly
    a_s = torch.randn(3, 5, dtype=torch.float64)
    lam = torch.randn(3, 2, dtype=torch.float64)
    gamma = torch.randn(2, 5, dtype=torch.float64)
    s = scaled_basis(a_s, lam, gamma)
    k, b, j = 2, 1, 4
    assert s.shape == (6, 5)
    assert s[k * 2 + b, j] == lam[k, b] * a_s[k, j] * gamma[b, j]


def test_no_scaled_matrix_saved_for_backward() -> None:
    in_f, out_f, r = 12, 40, 4
    _, _, a_s, b_flat, lam, gamma = operands(in_f, out_f, r, torch.float32)
    x = torch.randn(7, in_f, requires_grad=True)
    y = adapter_output(x, a_s, b_flat, lam.requires_grad_(), gamma.requires_grad_(), 1.0, True)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]  # the external base has no weight
    nb = lam.shape[1]
    assert all(tuple(t.shape) != (r * nb, in_f) for t in saved)
    assert {tuple(t.shape) for t in saved} == {(7, in_f), (r, in_f), (out_f, nb * r), (r, nb), (nb, in_f)}
    assert any(t.data_ptr() == b_flat.data_ptr() for t in saved)  # the bases view, not a copy


def test_only_needed_gradients() -> None:
    _, _, a_s, b_flat, lam, gamma = operands(6, 9, 2)
    x = torch.randn(3, 6, dtype=torch.float64)  # no grad for x
    lam.requires_grad_()
    adapter_output(x, a_s, b_flat, lam, gamma, 1.0, True).sum().backward()
    assert lam.grad is not None and gamma.grad is None and x.grad is None


class FixedMask(nn.Module):
    """A deterministic stand-in for dropout: multiplies by a fixed mask (active while training, p > 0)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.p = 0.5
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_own_input_groups_match_plain_autograd(in_f: int, out_f: int, r: int) -> None:
    """Two adapters with active dropout read their own inputs; a third shares x; the gradients reach x through all."""
    gen = torch.Generator().manual_seed(3)
    _, _, a_s, b_flat, _, _ = operands(in_f, out_f, r)
    nb = b_flat.shape[1] // r
    m = min(in_f, out_f)
    params = [(torch.randn(r, nb, generator=gen, dtype=torch.float64), torch.randn(nb, m, generator=gen, dtype=torch.float64))]
    params += [(p[0].clone() * 0.5, p[1].clone() + 1.0) for p in params] * 2
    masks = [torch.rand(4, in_f, generator=gen, dtype=torch.float64).round() * 2 for _ in range(2)]
    dropouts = [FixedMask(masks[0]), FixedMask(masks[1]), None]
    weight = torch.randn(out_f, in_f, dtype=torch.float64)
    x = torch.randn(4, in_f, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(4, out_f, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for p in params for t in p]
    calls = [
        AdapterCall(a_s, b_flat, leaves[2 * i], leaves[2 * i + 1], 0.5 + i, window=0, dropout=d) for i, d in enumerate(dropouts)
    ]
    y = layer_forward(x, BaseCall(lambda: x @ weight.T, weight, None), calls, in_f, out_f)
    got = torch.autograd.grad(y, [x, *leaves], grad_y)
    expected = x @ weight.T
    for i, d in enumerate(dropouts):
        xi = x if d is None else d(x)
        expected = expected + adapter_output_plain(xi, a_s, b_flat, leaves[2 * i], leaves[2 * i + 1], 0.5 + i, in_f <= out_f)
    want = torch.autograd.grad(expected, [x, *leaves], grad_y)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
