"""The sparse kernels for ternary bases: the factored path's math on the nonzeros, chosen by the cost model."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.compute import CallShape, choose_path, compute_override
from randlora_core.engine import Plan, RandLoraFunction

KINDS = {"sparse": {"sparse": True}, "very_sparse": {"very_sparse": True}}


def adapted(in_f: int, out_f: int, kind: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f, dtype=torch.float64))
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
