"""The forward-only ``activation`` path (S_flat applied to the activations, never formed) against the oracle.

No timing assertions here: speed is measured by tools/bench (decode suite).
"""

from __future__ import annotations

import pytest
import torch
from conftest import np64, spy_plans
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.compute import CallShape, choose_path, compute_override
from randlora_core.engine import GroupPlan, Plan, RandLoraFunction
from randlora_core.kernels import activation_into
from randlora_core.plain import adapter_output
from randlora_core.testing import SingleLayer
from randlora_spec.bases import BasesShape, generate_bases
from randlora_spec.tolerances import check_close

# (in, out, r): in < out, in > out, square, m not divisible by r, r > m
SHAPES = [(6, 10, 2), (10, 6, 2), (8, 8, 3), (10, 14, 4), (14, 10, 4), (3, 8, 5)]
NAMES = {torch.float32: "float32", torch.float64: "float64"}


def window(in_f: int, out_f: int, r: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    m, big_m = min(in_f, out_f), max(in_f, out_f)
    nb = -(-m // r)
    a, b = generate_bases(seed, BasesShape(r=r, m_max=m, M_max=big_m, nb_max=nb))
    return torch.from_numpy(a[:r, 0, :m]).to(dtype), torch.from_numpy(b[:big_m, :nb, :r].reshape(big_m, nb * r)).to(dtype), nb


def close_enough(actual: torch.Tensor, expected: torch.Tensor, dtype: str = "float32") -> bool:
    return check_close(np64(actual), np64(expected), dtype)[0]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: str) -> bool:
    ok, err, bound = check_close(np64(actual), np64(expected), dtype)
    assert ok, (err, bound)
    return ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_node_matches_oracle(in_f: int, out_f: int, r: int, dtype: torch.dtype) -> None:
    """Two windows, two adapters in the first (scalings summed per window), fused and external base."""
    gen = torch.Generator().manual_seed(2)
    m = min(in_f, out_f)
    a1, b1, nb1 = window(in_f, out_f, r, dtype, seed=3)
    a2, b2, nb2 = window(in_f, out_f, r + 1, dtype, seed=4)
    shapes = [(r, nb1), (r, nb1), (r + 1, nb2)]
    ps = [(torch.randn(k, nb, generator=gen).to(dtype), torch.randn(nb, m, generator=gen).to(dtype)) for k, nb in shapes]
    scalings = [0.5, 2.0, -0.25]
    weight, bias = torch.randn(out_f, in_f).to(dtype), torch.randn(out_f).to(dtype)
    x = torch.randn(2, 3, in_f, generator=gen).to(dtype)
    ops = [a1, b1, *ps[0], *ps[1], a2, b2, *ps[2]]
    groups = (GroupPlan((0.5, 2.0), own_input=False), GroupPlan((-0.25,), own_input=False))
    expected = nn.functional.linear(x.double(), weight.double(), bias.double())
    for (lam, gamma), s, (a_s, b_flat) in zip(ps, scalings, [(a1, b1), (a1, b1), (a2, b2)], strict=True):
        operands = (t.double() for t in (x, a_s, b_flat, lam, gamma))
        expected = expected + adapter_output(*operands, s, in_f <= out_f)
    fused = Plan(in_f <= out_f, False, True, groups, False, False, activation=True)
    y = RandLoraFunction.apply(fused, x, weight, bias, None, *ops)
    assert y.dtype == dtype and close(y, expected, NAMES[dtype])
    external = Plan(in_f <= out_f, in_f > out_f, False, groups, False, False, activation=True)
    y = RandLoraFunction.apply(external, x, None, None, nn.functional.linear(x, weight, bias), *ops)
    assert close(y, expected, NAMES[dtype])


def test_kernel_accumulates_into_the_output() -> None:
    """``activation_into`` adds to what ``y2`` holds (the base output), once per call."""
    a_s, b_flat, nb = window(12, 20, 4, torch.float64)
    lam, gamma = torch.randn(4, nb, dtype=torch.float64), torch.randn(nb, 12, dtype=torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64)
    y = torch.ones(3, 20, dtype=torch.float64)
    activation_into(y, x, a_s, b_flat, [(lam, gamma, 1.5)], True)
    torch.testing.assert_close(y, 1 + adapter_output(x, a_s, b_flat, lam, gamma, 1.5, True), rtol=1e-12, atol=1e-12)


def decode_model(in_f: int, out_f: int, dtype: torch.dtype = torch.float32, r: int = 8, **cfg: object):
    """A layer large enough that the cost model prefers the activation path for one token."""
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, dtype=dtype)
    config = RandLoraConfig(r=r, randlora_alpha=3.0 * r, target_modules=["layer"], init_weights=False, **cfg)  # type: ignore[arg-type]
    model = get_randlora_model(SingleLayer(layer), config)
    return model.eval(), model.model.layer


@pytest.mark.parametrize(("in_f", "out_f"), [(256, 384), (384, 256)])
def test_no_grad_few_tokens_take_the_activation_path(in_f: int, out_f: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode without gradients: activation; many tokens, gradients or a forced compute: not; outputs agree."""
    plans = spy_plans(monkeypatch)
    model, layer = decode_model(in_f, out_f, randlora_dropout=0.3)  # dropout is the identity in eval
    x = torch.randn(1, 1, in_f)
    with torch.no_grad():
        y = model(x)
        with compute_override("factored"):
            y_factored = model(x)
        model(torch.randn(4096, in_f))
    assert [p.activation for p in plans] == [True, False, False]
    y_grad = model(x)  # lambda/gamma need gradients: the factored path, which the backward follows
    assert not plans[-1].activation
    y_grad.sum().backward()
    assert layer.randlora_lambda["default"].grad is not None
    assert close(y, y_factored, "float32") and close(y, y_grad.detach(), "float32")
    expected = model.model.layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").T
    assert close(y, expected.detach(), "float32")


def test_several_adapters_and_scalings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two adapters sharing a window (one group, each its own lambda/gamma/scaling) and a third of another rank."""
    plans = spy_plans(monkeypatch)
    model, layer = decode_model(256, 384)
    model.add_adapter("other", RandLoraConfig(r=8, randlora_alpha=4.0, target_modules=["layer"], init_weights=False))
    model.add_adapter("third", RandLoraConfig(r=16, randlora_alpha=64.0, target_modules=["layer"], init_weights=False))
    model.set_adapter(["default", "other", "third"])
    x = torch.randn(2, 256)
    with torch.no_grad():
        y = model(x)
    assert plans[-1].activation and [len(g.scalings) for g in plans[-1].groups] == [2, 1]
    delta = sum(layer.get_delta_weight(name) for name in ("default", "other", "third"))
    assert close(y, layer.get_base_layer()(x) + x @ delta.T, "float32")


def test_bfloat16_on_cpu_computes_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 layer on CPU: the adapter math runs in float32 (SPEC 5.2) on this path too; output in bf16."""
    plans = spy_plans(monkeypatch)
    model, _ = decode_model(256, 384, dtype=torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        y = model(x)
        with compute_override("factored"):
            y_factored = model(x)
    assert plans[0].activation and y.dtype == torch.bfloat16
    assert close(y, y_factored, "bfloat16")


@pytest.mark.parametrize("in_f", [512, 768])
def test_inference_cache_holds_no_bases_for_decode(in_f: int) -> None:
    """Scaled-bases cache: one token needs no entry (activation path); a prefill fills and reuses one."""
    model, layer = decode_model(in_f, 1280 - in_f, r=16)
    with torch.no_grad():
        expected_one, expected_many = model(torch.ones(1, in_f)), model(torch.ones(512, in_f))
        cache = model.enable_inference_cache(weights=False)
        one = model(torch.ones(1, in_f))
        assert cache.nbytes == 0 and cache.hits == cache.misses == 0
        many, again = model(torch.ones(512, in_f)), model(torch.ones(512, in_f))
    assert cache.nbytes > 0 and cache.misses == 1 and cache.hits == 1
    assert close(one, expected_one, "float32") and close(many, expected_many, "float32") and torch.equal(many, again)
    with torch.no_grad():
        layer.randlora_lambda["default"].mul_(-2.0)  # as an optimizer step: the prefill entry goes stale
        one, many = model(torch.ones(1, in_f)), model(torch.ones(512, in_f))
        model.disable_inference_cache()
        assert close(one, model(torch.ones(1, in_f)), "float32") and close(many, model(torch.ones(512, in_f)), "float32")
    assert not close_enough(many, expected_many)


def test_cost_model_offers_activation_for_few_tokens_without_gradients() -> None:
    """Picked for a decode token of a 2048-wide layer, not for a prefill, never with a gradient; later with cached bases."""
    shape = {"in_features": 2048, "out_features": 5632, "ks": (2048,), "ranks": (32,)}
    no_grad = {"grad_x": False, "grad_params": False}
    assert choose_path(CallShape(tokens=1, **shape, **no_grad)) == "activation"
    assert choose_path(CallShape(tokens=512, **shape, **no_grad)) != "activation"
    assert choose_path(CallShape(tokens=1, **shape, grad_x=True, grad_params=False)) != "activation"
    assert choose_path(CallShape(tokens=1, in_features=2048, out_features=5632, ks=(2048,), **no_grad)) != "activation"
    last = {}
    for cached in (False, True):
        picks = [choose_path(CallShape(n, **shape, **no_grad, bases_cached=cached)) for n in range(1, 65)]
        last[cached] = max(n for n, pick in enumerate(picks, 1) if pick == "activation")
    assert 1 <= last[True] <= last[False] < 64


def test_compiled_decode_has_no_graph_break(monkeypatch: pytest.MonkeyPatch) -> None:
    """The activation path traces into one graph under ``torch.compile`` (no_grad decode), equal to eager."""
    import torch._dynamo

    model, _ = decode_model(384, 256)
    x = torch.randn(1, 1, 384)
    plans = spy_plans(monkeypatch)
    with torch.no_grad():
        eager = model(x)
    assert plans[-1].activation
    monkeypatch.undo()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert close(compiled, eager, "float32")


def test_cached_bases_are_counted_only_without_gradients() -> None:
    """The cost model is told the scaled bases are cached only where the cache serves the call."""
    from randlora_core.compute import describe_call
    from randlora_core.inference_cache import InferenceCache
    from randlora_core.operands import AdapterCall, BaseCall

    a_s, b_flat, nb = window(16, 24, 4, torch.float32)
    x = torch.randn(2, 16)
    adapter = AdapterCall(a_s, b_flat, torch.ones(4, nb), torch.ones(nb, 16), 1.0, window=4, key="k")
    for weights, expected in ((False, True), (True, False)):
        base = BaseCall(forward=lambda: x, cache=InferenceCache(weights=weights))
        with torch.no_grad():
            assert describe_call(x, base, [[adapter]], 16, 24, False, None).bases_cached is expected
        assert not describe_call(x, base, [[adapter]], 16, 24, False, None).bases_cached  # training: rebuilt
