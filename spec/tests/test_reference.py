import numpy as np
import pytest

from randlora_spec import reference
from randlora_spec.bases import bases_shape_for_layers, generate_bases
from randlora_spec.errors import AdapterNotFoundError, ShapeError
from randlora_spec.reference import Adapter, LayerGeometry

GEOMETRIES = [(12, 20, 4), (20, 12, 4), (16, 16, 4), (10, 14, 4), (3, 8, 5), (9, 30, 2)]


def _setup(in_f, out_f, r, seed=0, extra=0):
    rng = np.random.default_rng(seed)
    geom = LayerGeometry(in_f, out_f, r)
    a, b = generate_bases(seed, bases_shape_for_layers([(in_f + extra, out_f + extra)], r))
    adapter = Adapter(r, 3.0 * r, rng.standard_normal((r, geom.nb)), rng.standard_normal((geom.nb, geom.m)))
    weight = rng.standard_normal((out_f, in_f))
    return rng, geom, a, b, adapter, weight


def _peft_style_forward(x, weight, bias, adapter, a, b):
    """PEFT's computation written literally with numpy: slices, flatten orders, then two linears."""
    out_f, in_f = weight.shape
    m, big_m = min(in_f, out_f), max(in_f, out_f)
    nb = -(-m // adapter.r)
    sliced_a = a[:, :nb, :m].astype(np.float64)  # (r, 1, m): the middle axis broadcasts
    sliced_b = b[:big_m, :nb, :].astype(np.float64)
    update_b = sliced_b.reshape(big_m, -1)
    update_a = (adapter.lam[:, :, None] * sliced_a * adapter.gamma[None]).reshape(-1, m)
    if m == in_f:
        first, second = update_a, update_b
    else:
        first, second = update_b.T, update_a.T
    y = x @ weight.T + (0 if bias is None else bias)
    return y + ((x @ first.T) @ second.T) * adapter.scaling


@pytest.mark.parametrize(("in_f", "out_f", "r"), GEOMETRIES)
def test_forward_matches_peft_formula(in_f, out_f, r):
    rng, _, a, b, adapter, weight = _setup(in_f, out_f, r)
    x = rng.standard_normal((2, 3, in_f))
    bias = rng.standard_normal(out_f)
    ours = reference.forward(x, weight, bias, {"d": adapter}, ["d"], a, b)
    assert np.allclose(ours, _peft_style_forward(x, weight, bias, adapter, a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("in_f", "out_f", "r"), GEOMETRIES)
def test_delta_weight_orientation_and_fan_in_fan_out(in_f, out_f, r):
    _, geom, a, b, adapter, _ = _setup(in_f, out_f, r)
    delta = reference.delta_weight(geom, adapter, a, b)
    assert delta.shape == (out_f, in_f)
    assert np.array_equal(reference.delta_weight(geom, adapter, a, b, fan_in_fan_out=True), delta.T)
    # in <= out means delta = s * P and P is (M, m) = (out, in); otherwise delta = s * P^T
    p = reference.product(geom, adapter, a, b)
    assert np.array_equal(delta, adapter.scaling * (p if in_f <= out_f else p.T))


def test_pairing_order_is_peft_s():
    """Column c of B_flat pairs with row c of S_flat although the flatten orders differ."""
    _, geom, a, b, adapter, _ = _setup(10, 14, 4)
    a_s, b_s = reference.slice_bases(a, b, geom)
    s = reference.scaled_basis(a_s, adapter.lam, adapter.gamma)
    bf = reference.flat_b(b_s)
    for c in range(geom.r * geom.nb):
        k_s, b_idx_s = divmod(c, geom.nb)  # S row c is (k, b) = divmod(c, nb)
        b_idx_b, k_b = divmod(c, geom.r)  # B column c is (b, k) = divmod(c, r)
        assert np.array_equal(s[c], adapter.lam[k_s, b_idx_s] * a_s[k_s] * adapter.gamma[b_idx_s])
        assert np.array_equal(bf[:, c], b_s[:, b_idx_b, k_b])


@pytest.mark.parametrize(("in_f", "out_f", "r"), GEOMETRIES)
def test_backward_matches_finite_differences(in_f, out_f, r):
    rng, _, a, b, adapter, weight = _setup(in_f, out_f, r, seed=1)
    x = rng.standard_normal((4, in_f))
    g = rng.standard_normal((4, out_f))
    grad_x, grads = reference.backward(x, g, weight, {"d": adapter}, ["d"], a, b)
    grad_lam, grad_gamma = grads["d"]

    def loss(x_, lam_, gamma_):
        ad = Adapter(adapter.r, adapter.alpha, lam_, gamma_)
        return float(np.sum(g * reference.forward(x_, weight, None, {"d": ad}, ["d"], a, b)))

    eps = 1e-6
    for arr, grad, name in ((x, grad_x, "x"), (adapter.lam, grad_lam, "lam"), (adapter.gamma, grad_gamma, "gamma")):
        direction = rng.standard_normal(arr.shape)
        args = {"x": x, "lam": adapter.lam, "gamma": adapter.gamma}
        plus = dict(args, **{name: arr + eps * direction})
        minus = dict(args, **{name: arr - eps * direction})
        numeric = (loss(plus["x"], plus["lam"], plus["gamma"]) - loss(minus["x"], minus["lam"], minus["gamma"])) / (2 * eps)
        assert np.isclose(np.sum(grad * direction), numeric, rtol=1e-6, atol=1e-6), name


def test_merge_unmerge_round_trip_and_merged_forward():
    rng, _, a, b, adapter, weight = _setup(12, 20, 4)
    second = Adapter(4, 1.0, rng.standard_normal(adapter.lam.shape), rng.standard_normal(adapter.gamma.shape))
    adapters = {"one": adapter, "two": second}
    merged = reference.merge(weight, adapters, ["one", "two"], a, b)
    x = rng.standard_normal((3, 12))
    assert np.allclose(x @ merged.T, reference.forward(x, weight, None, adapters, ["one", "two"], a, b), atol=1e-12)
    assert np.allclose(reference.unmerge(merged, adapters, ["one", "two"], a, b), weight, atol=1e-12)


def test_init_weights_true_is_a_no_op():
    rng, geom, a, b, _, weight = _setup(12, 20, 4)
    lam, gamma = reference.init_parameters(geom, init_weights=True)
    assert np.all(lam == 0) and np.all(gamma == 1 / max(geom.nb, geom.m))
    x = rng.standard_normal((2, 12))
    y = reference.forward(x, weight, None, {"d": Adapter(4, 8.0, lam, gamma)}, ["d"], a, b)
    assert np.array_equal(y, reference.matmul(x, weight.T))
    lam, gamma = reference.init_parameters(geom, init_weights=False, rng=rng)
    assert lam.shape == (4, geom.nb) and np.all(gamma == 1 / geom.M)


def test_exact_sum_is_correctly_rounded():
    values = np.array([1e16, 1.0, -1e16, 1.0])
    assert reference.exact_sum(values) == 2.0  # naive left-to-right summation gives 1.0 or 0.0


def test_errors_name_the_problem():
    _, geom, a, b, adapter, weight = _setup(12, 20, 4)
    with pytest.raises(ShapeError, match="last dimension is 7"):
        reference.forward(np.zeros((2, 7)), weight, None, {"d": adapter}, ["d"], a, b)
    with pytest.raises(AdapterNotFoundError, match="missing"):
        reference.forward(np.zeros((2, 12)), weight, None, {"d": adapter}, ["missing"], a, b)
    with pytest.raises(ShapeError, match="too small"):
        reference.product(LayerGeometry(64, 64, 4), Adapter(4, 1.0, np.zeros((4, 16)), np.zeros((16, 64))), a, b)
    with pytest.raises(ShapeError, match="lambda must be"):
        reference.product(geom, Adapter(4, 1.0, np.zeros((4, 2)), adapter.gamma), a, b)
