"""The engine's node with a fused base (factored / dense / hybrid paths), the compute setting and the cost model.

No timing assertions here: speed is measured by tools/bench.
"""

from __future__ import annotations

import pytest
import torch
from conftest import adapted, np64, spy_plans
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.compute import CallShape, choose_compute, choose_path, compute_override, path_costs
from randlora_core.engine import GroupPlan, Plan, RandLoraFunction
from randlora_core.plain import adapter_output
from randlora_core.testing import SingleLayer
from randlora_spec import reference
from randlora_spec.bases import BasesShape, generate_bases
from randlora_spec.errors import ConfigError
from randlora_spec.tolerances import check_close

# (in, out, r): in < out, in > out, square, m not divisible by r, r > m
SHAPES = [(6, 10, 2), (10, 6, 2), (8, 8, 3), (10, 14, 4), (3, 8, 5)]
PATHS = {"factored": (False, False), "dense": (True, True), "hybrid": (True, False)}


def fused_plan(in_le_out: bool, weight_in_out: bool, scalings: tuple[tuple[float, ...], ...], path: str) -> Plan:
    """A plan with the base matmul inside the node and one group per tuple of scalings."""
    groups = tuple(GroupPlan(s, own_input=False) for s in scalings)
    return Plan(in_le_out, weight_in_out, True, groups, *PATHS[path])


def window(in_f: int, out_f: int, r: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    m, big_m = min(in_f, out_f), max(in_f, out_f)
    nb = -(-m // r)
    a, b = generate_bases(seed, BasesShape(r=r, m_max=m, M_max=big_m, nb_max=nb))
    a_s = torch.from_numpy(a[:r, 0, :m]).to(dtype)
    b_flat = torch.from_numpy(b[:big_m, :nb, :r].reshape(big_m, nb * r)).to(dtype)
    return a_s, b_flat, nb


def params(r: int, nb: int, m: int, gen: torch.Generator, dtype: torch.dtype = torch.float64):
    lam = torch.randn(r, nb, generator=gen, dtype=dtype).requires_grad_()
    gamma = torch.randn(nb, m, generator=gen, dtype=dtype).requires_grad_()
    return lam, gamma


# -- the autograd function ----------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_gradcheck_every_path(in_f: int, out_f: int, r: int, fifo: bool, path: str) -> None:
    gen = torch.Generator().manual_seed(1)
    a_s, b_flat, nb = window(in_f, out_f, r)
    m = min(in_f, out_f)
    lam1, gamma1 = params(r, nb, m, gen)
    lam2, gamma2 = params(r, nb, m, gen)
    weight = torch.randn(in_f, out_f, dtype=torch.float64) if fifo else torch.randn(out_f, in_f, dtype=torch.float64)
    bias = torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    plan = fused_plan(in_f <= out_f, fifo, ((0.7, -1.3),), path)

    def fn(x, bias, lam1, gamma1, lam2, gamma2):
        return RandLoraFunction.apply(plan, x, weight, bias, None, a_s, b_flat, lam1, gamma1, lam2, gamma2)

    assert torch.autograd.gradcheck(fn, (x, bias, lam1, gamma1, lam2, gamma2))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_paths_match_base_plus_factored_adapters(in_f: int, out_f: int, r: int, path: str) -> None:
    """Two rank groups (r and r+1) with two adapters in the first: the fused node equals the sum of the parts."""
    gen = torch.Generator().manual_seed(2)
    m = min(in_f, out_f)
    a1, b1, nb1 = window(in_f, out_f, r, seed=3)
    a2, b2, nb2 = window(in_f, out_f, r + 1, seed=4)
    ps = [params(r, nb1, m, gen), params(r, nb1, m, gen), params(r + 1, nb2, m, gen)]
    scalings = [0.5, 2.0, -0.25]
    weight = torch.randn(out_f, in_f, dtype=torch.float64)
    bias = torch.randn(out_f, dtype=torch.float64)
    x = torch.randn(7, in_f, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(7, out_f, dtype=torch.float64)
    plan = fused_plan(in_f <= out_f, False, ((0.5, 2.0), (-0.25,)), path)
    ops = [a1, b1, *ps[0], *ps[1], a2, b2, *ps[2]]
    y = RandLoraFunction.apply(plan, x, weight, bias, None, *ops)
    leaves = [x, *[t for p in ps for t in p]]
    got = torch.autograd.grad(y, leaves, grad_y)
    expected_y = nn.functional.linear(x, weight, bias)
    for (lam, gamma), s, (a_s, b_flat) in zip(ps, scalings, [(a1, b1), (a1, b1), (a2, b2)], strict=True):
        expected_y = expected_y + adapter_output(x, a_s, b_flat, lam, gamma, s, in_f <= out_f)
    want = torch.autograd.grad(expected_y, leaves, grad_y)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_only_the_needed_gradients(path: str) -> None:
    """x without grad, gamma frozen: the function returns no gradient for them and the rest still match."""
    gen = torch.Generator().manual_seed(5)
    a_s, b_flat, nb = window(10, 6, 2)
    lam, gamma = params(2, nb, 6, gen)
    gamma.requires_grad_(False)
    x = torch.randn(4, 10, dtype=torch.float64)
    weight = torch.randn(6, 10, dtype=torch.float64)
    plan = fused_plan(False, False, ((1.5,),), path)
    y = RandLoraFunction.apply(plan, x, weight, None, None, a_s, b_flat, lam, gamma)
    y.sum().backward()
    lam2 = lam.detach().clone().requires_grad_()
    (nn.functional.linear(x, weight) + adapter_output(x, a_s, b_flat, lam2, gamma, 1.5, False)).sum().backward()
    torch.testing.assert_close(lam.grad, lam2.grad, rtol=1e-10, atol=1e-12)
    assert gamma.grad is None and x.grad is None


def _saved(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize(("in_f", "out_f"), [(24, 40), (40, 24)])
def test_dense_saves_no_out_by_in_matrix(in_f: int, out_f: int) -> None:
    """The dense path rebuilds W + delta_W in backward: the only weight-sized tensor saved is the frozen weight itself."""
    gen = torch.Generator().manual_seed(6)
    r = 5  # r*nb = 25: no operand has a weight-like shape by accident
    a_s, b_flat, nb = window(in_f, out_f, r, torch.float32)
    lam, gamma = params(r, nb, min(in_f, out_f), gen, torch.float32)
    weight = torch.randn(out_f, in_f)
    x = torch.randn(96, in_f, requires_grad=True)
    size = {}
    for path in PATHS:
        plan = fused_plan(in_f <= out_f, False, ((2.0,),), path)
        saved = _saved(lambda plan=plan: RandLoraFunction.apply(plan, x, weight, None, None, a_s, b_flat, lam, gamma))
        weight_like = [t for t in saved if t.shape in ((out_f, in_f), (in_f, out_f))]
        assert len(weight_like) == 1 and weight_like[0].data_ptr() == weight.data_ptr()  # a reference, not a new matrix
        size[path] = sum(t.numel() for t in saved if t.data_ptr() not in (weight.data_ptr(), x.data_ptr()))
    assert size["dense"] <= size["factored"]
    assert size["hybrid"] <= size["factored"]


# -- through the layer and the model ------------------------------------------------------------


@pytest.mark.parametrize("compute", ["factored", "dense"])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_layer_paths_match_spec_reference(in_f: int, out_f: int, r: int, conv1d: bool, compute: str, monkeypatch) -> None:
    plans = spy_plans(monkeypatch)
    model, layer = adapted(in_f, out_f, r, conv1d=conv1d, compute=compute)
    x = torch.randn(2, 5, in_f, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 5, out_f, dtype=torch.float64)
    y = model(x)
    y.backward(grad_y)
    assert plans and all(p.dense_forward == p.dense_backward == (compute == "dense") for p in plans)
    lam, gamma = layer.randlora_lambda["default"], layer.randlora_gamma["default"]
    adapters = {"default": reference.Adapter(r, 2.0 * r, np64(lam), np64(gamma))}
    bases = layer.bases
    a, b = np64(bases.randlora_A), np64(bases.randlora_B)
    weight = np64(layer.get_base_layer().weight)
    bias = np64(layer.get_base_layer().bias)
    y_ref = reference.forward(np64(x), weight, bias, adapters, ["default"], a, b, conv1d)
    gx_ref, grads = reference.backward(np64(x), np64(grad_y), weight, adapters, ["default"], a, b, conv1d)
    for actual, expected in ((y, y_ref), (x.grad, gx_ref), (lam.grad, grads["default"][0]), (gamma.grad, grads["default"][1])):
        ok, err, bound = check_close(np64(actual), expected, "float64")
        assert ok, (err, bound)


def test_dense_and_factored_agree_in_float32() -> None:
    outs = {}
    for compute in ("factored", "dense"):
        model, layer = adapted(48, 80, 8, dtype=torch.float32, compute=compute)
        x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y = model(x)
        y.square().sum().backward()
        outs[compute] = [y, x.grad, layer.randlora_lambda["default"].grad, layer.randlora_gamma["default"].grad]
    for f, d in zip(outs["factored"], outs["dense"], strict=True):
        assert check_close(np64(d), np64(f), "float32")[0]


def test_override_beats_config_and_auto_follows_tokens(monkeypatch) -> None:
    plans = spy_plans(monkeypatch)
    model, _ = adapted(64, 64, 8, dtype=torch.float32)  # compute="auto"
    with torch.no_grad():
        model(torch.randn(4, 64))
        model(torch.randn(4096, 64))
    assert [p.dense_forward for p in plans] == [False, True]
    plans.clear()
    with compute_override("factored"), torch.no_grad():
        model(torch.randn(4096, 64))
        with compute_override(None):
            model(torch.randn(4096, 64))
    assert [p.dense_forward for p in plans] == [False, True]
    with pytest.raises(ValueError, match="compute"):
        with compute_override("fast"):  # type: ignore[arg-type]
            pass


def test_mixed_settings_between_adapters(monkeypatch) -> None:
    plans = spy_plans(monkeypatch)
    model, layer = adapted(16, 16, 4, dtype=torch.float32, compute="dense")
    model.add_adapter("other", RandLoraConfig(r=4, target_modules=["layer"], compute="auto"))
    model.add_adapter("third", RandLoraConfig(r=2, target_modules=["layer"], compute="factored"))
    model.set_adapter(["default", "other"])
    model(torch.randn(2, 16))
    assert plans[-1].dense_forward
    assert [g.scalings for g in plans[-1].groups] == [(layer.scaling["default"], layer.scaling["other"])]
    model.set_adapter(["default", "other", "third"])  # dense against factored: factored
    model(torch.randn(2, 16))
    assert not plans[-1].dense_forward and len(plans[-1].groups) == 2


class CustomLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.0


def test_dense_request_falls_back_where_it_does_not_apply(monkeypatch) -> None:
    """Active dropout and autocast keep the factored path; a base with its own forward or hooks keeps its own call."""
    plans = spy_plans(monkeypatch)
    model, layer = adapted(12, 20, 4, dtype=torch.float32, compute="dense", randlora_dropout=0.5)
    model.train()
    model(torch.randn(3, 12))
    # dropout active in training: the adapter reads its own input, so delta_W cannot fold into the base matmul
    assert not plans[-1].dense_forward and plans[-1].groups[0].own_input
    model.eval()
    model(torch.randn(3, 12))
    assert plans[-1].fused_base and plans[-1].dense_forward  # dropout is the identity in eval
    handle = layer.get_base_layer().register_forward_hook(lambda *a: None)
    model(torch.randn(3, 12))
    handle.remove()
    assert not plans[-1].fused_base  # the hook expects the base layer's own call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(3, 12))
    assert not plans[-1].fused_base and not plans[-1].dense_forward
    torch.manual_seed(0)
    custom = get_randlora_model(SingleLayer(CustomLinear(12, 20)), RandLoraConfig(r=4, target_modules=["layer"], compute="dense"))
    x = torch.randn(3, 12)
    y = custom(x)
    assert not plans[-1].fused_base  # its own forward runs; delta_W is applied beside it
    inner = custom.model.layer
    expected = inner.get_base_layer()(x) + x @ inner.get_delta_weight("default").T
    torch.testing.assert_close(y, expected)


def test_frozen_weight_flag_does_not_change_the_path_without_grad(monkeypatch) -> None:
    """A frozen weight that requires grad (FSDP flat params) fuses under no_grad; it needs its gradient otherwise."""
    plans = spy_plans(monkeypatch)
    model, layer = adapted(16, 24, 4, dtype=torch.float32)
    x = torch.randn(5, 16)
    with torch.no_grad():
        y_frozen = model(x)
        layer.get_base_layer().weight.requires_grad_(True)
        y_flagged = model(x)
    assert plans[0] == plans[1] and plans[1].fused_base
    assert torch.equal(y_frozen, y_flagged)
    y = model(x)
    assert not plans[-1].fused_base  # the weight's gradient is computed by the base layer itself
    y.sum().backward()
    assert layer.get_base_layer().weight.grad is not None
    torch.testing.assert_close(y, y_frozen)


def test_half_weights_on_cpu(monkeypatch) -> None:
    """bfloat16 base on CPU: auto keeps the base matmul in bf16 (the base's own call); explicit dense runs it in float32."""
    plans = spy_plans(monkeypatch)
    results = {}
    for compute in ("auto", "dense"):
        model, _ = adapted(32, 48, 4, dtype=torch.bfloat16, compute=compute)
        x = torch.randn(256, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
        results[compute] = model(x)
        assert results[compute].dtype == torch.bfloat16
    assert not plans[0].fused_base and plans[1].fused_base and plans[1].dense_forward
    assert check_close(np64(results["dense"]), np64(results["auto"]), "bfloat16")[0]


def test_config_field() -> None:
    assert RandLoraConfig().compute == "auto"
    assert RandLoraConfig(compute="dense").compute == "dense"
    with pytest.raises(ConfigError, match="compute"):
        RandLoraConfig(compute="fast")
    cfg = RandLoraConfig(compute="factored")
    assert "compute" not in cfg.to_json() and "compute" not in cfg.to_peft_dict()  # runtime-only
    assert RandLoraConfig.parse(cfg.model_dump(mode="json")) == cfg


# -- the cost model -----------------------------------------------------------------------------


def test_cost_model_crossover() -> None:
    """Factored for few tokens, dense for many, the switch near the layer width; earlier without gradients."""
    for d in (256, 1024, 4096):
        assert choose_compute(d // 16, d, d, 32) == "factored"
        assert choose_compute(4 * d, d, d, 32) == "dense"
        picks = [choose_compute(n, d, d, 32) for n in (d // 8, d // 4, d // 2, d, 2 * d, 4 * d, 8 * d)]
        first_dense = picks.index("dense")
        assert all(p != "factored" for p in picks[first_dense:])  # monotone in tokens
        train = path_costs(CallShape(d, d, d, (d,)))
        infer = path_costs(CallShape(d // 2 + d // 8, d, d, (d,), grad_x=False, grad_params=False))
        assert train["dense"] < train["factored"] and infer["dense"] < infer["factored"]
    # two groups of adapters double the delta-W work of dense but also the factored matmuls
    assert choose_path(CallShape(2048, 1024, 1024, (1024, 1024))) == choose_path(CallShape(2048, 1024, 1024, (1024,)))
