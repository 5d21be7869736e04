"""The sparse kernels for ternary bases: the factored path's math on the nonzeros, chosen by the cost model."""

from __future__ import annotations

import pytest
import torch
from conftest import np64, randomize_adapters
from torch import nn
from torch.nn import functional

from randlora_core import RandLoraConfig, get_randlora_model, sparse
from randlora_core.compute import CallShape, choose_path, compute_override
from randlora_core.engine import Plan, RandLoraFunction
from randlora_core.plain import adapter_output, scaled_basis
from randlora_core.sparse import backward, forward_into, parameter_grads, window_structure
from randlora_spec.tolerances import check_close

KINDS = {"sparse": {"sparse": True}, "very_sparse": {"very_sparse": True}}


def adapted(in_f: int, out_f: int, kind: str, dtype: torch.dtype = torch.float64, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, dtype=dtype))
    model = get_randlora_model(base, RandLoraConfig(r=4, randlora_alpha=4.0, target_modules=["0"], **KINDS[kind], **kw))  # type: ignore[arg-type]
    model.add_adapter("second", RandLoraConfig(r=4, randlora_alpha=2.0, target_modules=["0"], **KINDS[kind], **kw))  # type: ignore[arg-type]
    model.add_adapter("third", RandLoraConfig(r=2, randlora_alpha=1.0, target_modules=["0"], **KINDS[kind], **kw))  # type: ignore[arg-type]
    randomize_adapters(model)
    model.set_adapter(["default", "second", "third"])  # two groups: r=4 (two adapters) and r=2
    return model


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("in_f", "out_f"), [(20, 36), (36, 20), (24, 24)])
def test_sparse_path_equals_factored(kind: str, in_f: int, out_f: int) -> None:
    model = adapted(in_f, out_f, kind)
    x = torch.randn(2, 5, in_f, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 5, out_f, dtype=torch.float64)
    results = {}
    for compute in ("factored", "sparse"):
        with compute_override(compute):
            y = model(x)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(y, [x, *params], grad_y)
        results[compute] = [y.detach(), *grads]
    for a, b in zip(results["factored"], results["sparse"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_sparse_plan_is_taken_and_gradchecks() -> None:
    model = adapted(12, 18, "very_sparse")
    plans: list[Plan] = []
    original = RandLoraFunction.apply

    def spy(plan: Plan, *args: object) -> object:
        plans.append(plan)
        return original(plan, *args)

    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    layer = model.model[0]
    lam = layer.randlora_lambda["default"]
    RandLoraFunction.apply = spy  # type: ignore[method-assign]
    try:
        with compute_override("sparse"):
            assert torch.autograd.gradcheck(lambda x, lam: model(x), (x, lam))
    finally:
        RandLoraFunction.apply = original  # type: ignore[method-assign]
    assert plans and all(p.sparse and all(w is not None for w in p.sparse) for p in plans)


def test_external_base_and_dense_bases_fall_back() -> None:
    """A base layer with a hook keeps its own call beside the sparse adapters; dense bases take the factored path."""
    model = adapted(16, 24, "very_sparse")
    model.model[0].get_base_layer().register_forward_hook(lambda *args: None)
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad(), compute_override("factored"):
        expected = model(x)
    with torch.no_grad(), compute_override("sparse"):
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)
    torch.manual_seed(0)
    dense = get_randlora_model(nn.Sequential(nn.Linear(16, 24)), RandLoraConfig(r=4, target_modules=["0"]))
    with torch.no_grad(), compute_override("sparse"):
        dense(torch.randn(2, 16))  # no structure for dense bases: the factored path


def test_cost_model_takes_sparse_for_very_sparse_bases_only() -> None:
    """very_sparse at d = 2048 (2.2 % nonzeros) in training: sparse; the dense-bases paths stay for ternary s = 3."""
    d, r, tokens = 2048, 32, 512
    k = d  # r * nb
    density = 1 / d**0.5
    very = (int(density * d * k), int(density * r * d) * (d // r))
    assert choose_path(CallShape(tokens, d, d, (k,), sparse_nnz=(very,))) == "sparse"
    third = (int(d * k / 3), int(r * d / 3) * (d // r))
    assert choose_path(CallShape(tokens, d, d, (k,), sparse_nnz=(third,))) != "sparse"


def _oracle(model: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient and every lambda/gamma gradient by the plain ops, in float64, on the same bases."""
    layer = model.model[0]
    base = layer.get_base_layer()
    x64 = x.detach().double().requires_grad_()
    y = functional.linear(x64, base.weight.detach().double(), base.bias.detach().double())
    params: dict[str, torch.Tensor] = {}
    for name in layer.active_adapters:
        op = layer.adapter_call(name, torch.float64, x.device)
        lam = params[f"randlora_lambda.{name}"] = layer.randlora_lambda[name].detach().double().requires_grad_()
        gamma = params[f"randlora_gamma.{name}"] = layer.randlora_gamma[name].detach().double().requires_grad_()
        y = y + adapter_output(x64, op.a_s, op.b_flat, lam, gamma, op.scaling, layer.in_features <= layer.out_features)
    grads = torch.autograd.grad(y, [x64, *params.values()], grad_y.double())
    return {"y": y.detach(), "x": grads[0], **dict(zip(params, grads[1:], strict=True))}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("in_f", "out_f"), [(20, 36), (36, 20), (24, 24)])
@pytest.mark.parametrize("wanted", ["all", "params", "input"])
def test_sparse_kernels_match_plain_oracle(dtype: torch.dtype, in_f: int, out_f: int, wanted: str, monkeypatch) -> None:
    """Forward, input gradient and lambda/gamma gradients (two groups, one of two adapters) within the dtype's tolerance.

    ``params``: the input needs no gradient; ``input``: lambda and gamma are frozen (no dL/dS at all).
    """
    model = adapted(in_f, out_f, "very_sparse", dtype)
    layer = model.model[0]
    trainable = {n: p for n, p in layer.named_parameters() if n.startswith(("randlora_lambda", "randlora_gamma"))}
    for p in trainable.values():
        p.requires_grad_(wanted != "input")
    plans: list[Plan] = []
    original = RandLoraFunction.apply
    monkeypatch.setattr(RandLoraFunction, "apply", lambda plan, *args: plans.append(plan) or original(plan, *args))
    x = torch.randn(3, 7, in_f, dtype=dtype, requires_grad=wanted != "params")
    grad_y = torch.randn(3, 7, out_f, dtype=dtype)
    with compute_override("sparse"):
        y = model(x)
    assert plans and all(p.sparse and all(w is not None for w in p.sparse) for p in plans)
    inputs = ({"x": x} if x.requires_grad else {}) | (trainable if wanted != "input" else {})
    actual = dict(zip(inputs, torch.autograd.grad(y, list(inputs.values()), grad_y), strict=True))
    expected = _oracle(model, x, grad_y)
    name = str(dtype).removeprefix("torch.")
    for key, value in {"y": y.detach(), **actual}.items():
        ok, err, bound = check_close(np64(value), np64(expected[key]), name)
        assert ok, (key, err, bound)


@pytest.mark.parametrize("in_le_out", [True, False])
def test_window_with_empty_and_uneven_rows(in_le_out: bool) -> None:
    """Rows of A with no nonzero, or fewer than the longest (padded), add nothing through the pads."""
    gen = torch.Generator().manual_seed(1)
    r, nb, m, big_m, n = 3, 2, 9, 11, 5
    a_s = torch.zeros(r, m, dtype=torch.float64)
    a_s[0, [1, 4, 8]] = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    a_s[2, 3] = -1.0  # row 1 stays empty
    b_flat = torch.randint(-1, 2, (big_m, r * nb), generator=gen).double()
    lam, gamma = torch.randn(r, nb, generator=gen, dtype=torch.float64), torch.randn(nb, m, generator=gen, dtype=torch.float64)
    owner = nn.Module()  # anything weak-referenceable: the structure lives while it does
    win = window_structure(owner, "window", "values", a_s, b_flat, nb)
    assert win.nnz == (int(b_flat.count_nonzero()), 4 * nb)
    x = torch.randn(n, m if in_le_out else big_m, generator=gen, dtype=torch.float64)
    g = torch.randn(n, big_m if in_le_out else m, generator=gen, dtype=torch.float64)
    s_flat = scaled_basis(a_s, lam, gamma) * 0.5
    delta = b_flat @ s_flat if in_le_out else (b_flat @ s_flat).T  # (out, in)
    y = torch.zeros(n, delta.shape[0], dtype=torch.float64)
    saved = forward_into(y, x, win, [(lam, gamma, 0.5)], in_le_out)
    torch.testing.assert_close(y, x @ delta.T, rtol=1e-12, atol=1e-12)
    grad_in, grad_s = backward(g, x, win, [(lam, gamma, 0.5)], in_le_out, saved, (True, True))
    assert grad_in is not None and grad_s is not None
    torch.testing.assert_close(grad_in, g @ delta, rtol=1e-12, atol=1e-12)
    lam_, gamma_ = lam.clone().requires_grad_(), gamma.clone().requires_grad_()
    oracle = b_flat @ scaled_basis(a_s, lam_, gamma_) * 0.5
    ((x @ (oracle if in_le_out else oracle.T).T) * g).sum().backward()
    grad_lam, grad_gamma = parameter_grads(win, grad_s, lam, gamma, 0.5, (True, True))
    torch.testing.assert_close(grad_lam, lam_.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_gamma, gamma_.grad, rtol=1e-12, atol=1e-12)


def test_each_window_structure_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers of different shapes keep one structure each; only changed bases make them build anew."""
    builds: list[int] = []
    original = sparse._build

    def counted(a_s: torch.Tensor, b_flat: torch.Tensor, nb: int) -> sparse.SparseWindow:
        builds.append(nb)
        return original(a_s, b_flat, nb)

    monkeypatch.setattr(sparse, "_build", counted)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 384), nn.Linear(384, 256), nn.Linear(256, 256))
    model = get_randlora_model(base, RandLoraConfig(r=8, target_modules=["0", "1", "2"], very_sparse=True))
    x = torch.randn(3, 256)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert len(builds) == 2  # 256 x 384 and 384 x 256 share a window (m = 256, M = 384); 256 x 256 has its own
    bases = model.model[0].bases
    with torch.no_grad():
        bases.randlora_B.neg_()  # new values: every structure is stale
        model(x)
    assert len(builds) == 4
