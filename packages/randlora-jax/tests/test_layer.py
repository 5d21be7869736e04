"""RandLoraLinear against the float64 reference: both compute paths, Einsum bases, dropout, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from randlora_jax import DtypeError, RandLoraConfig, ShapeError, TargetModuleError, get_randlora_model
from randlora_jax.compute import choose_path
from randlora_jax.driver import x64
from randlora_spec import reference
from randlora_spec.tolerances import check_close


class One(nnx.Module):
    def __init__(self, layer: nnx.Module) -> None:
        self.layer = layer

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


CALL = nnx.jit(lambda model, x: model(x))


def adapted(in_features, out_features, compute="auto", r=4, dropout=0.0, seed=0, bias=True):
    base = nnx.Linear(in_features, out_features, use_bias=bias, rngs=nnx.Rngs(seed))
    config = RandLoraConfig(
        r=r, randlora_alpha=2.0 * r, target_modules=["layer"], compute=compute, randlora_dropout=dropout, init_weights=False
    )
    return get_randlora_model(One(base), config, rngs=nnx.Rngs(seed + 1))


def reference_forward(model, x):
    layer = model.randlora_layers()["layer"]
    weight = np.asarray(layer.base_layer.kernel.get_value(), np.float64).T
    bias = layer.base_layer.bias.get_value() if layer.base_layer.bias is not None else None
    adapters = {
        n: reference.Adapter(s.r, s.scaling * s.r, layer.randlora_lambda[n].get_value(), layer.randlora_gamma[n].get_value())
        for n, s in layer.adapters.items()
    }
    a, b = (np.asarray(v.get_value()) for v in (model.randlora_bases.randlora_A, model.randlora_bases.randlora_B))
    return reference.forward(np.asarray(x, np.float64), weight, bias, adapters, model.active_adapters, a, b)


@pytest.mark.parametrize(
    ("in_features", "out_features", "compute"), [(12, 20, "factored"), (20, 12, "dense"), (16, 16, "auto"), (3, 9, "dense")]
)
def test_forward_matches_reference(compute, in_features, out_features):
    model = adapted(in_features, out_features, compute)
    x = jax.random.normal(jax.random.key(2), (2, 3, in_features))
    y = CALL(model, x)
    ok, err, bound = check_close(np.asarray(y), reference_forward(model, x), "float32")
    assert ok, (err, bound)


def test_paths_agree_in_float64_and_gradients_too():
    with x64(True):
        x = jax.random.normal(jax.random.key(3), (5, 20), jnp.float64)
        results = {}
        for compute in ("factored", "dense"):
            base = nnx.Linear(20, 12, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
            config = RandLoraConfig(r=3, randlora_alpha=6.0, target_modules=["layer"], compute=compute, init_weights=False)
            model = get_randlora_model(One(base), config, rngs=nnx.Rngs(1))
            grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, nnx.Param)))
            value, grads = grad(model)
            results[compute] = (value, grads["model"]["layer"]["randlora_lambda"]["default"].get_value())
        ok, err, _ = check_close(np.asarray(results["dense"][1]), np.asarray(results["factored"][1], np.float64), "float64")
        assert ok, err
        assert abs(float(results["dense"][0]) - float(results["factored"][0])) < 1e-9


def test_choice_rule_prefers_dense_for_many_tokens():
    assert choose_path("auto", 4096, 512, 512, [32], True) == "dense"
    assert choose_path("auto", 8, 512, 512, [32], True) == "factored"
    assert choose_path("dense", 8, 512, 512, [32], False) == "factored"  # dense impossible: falls back
    assert choose_path("factored", 4096, 512, 512, [32], True) == "factored"


@pytest.mark.parametrize(
    ("equation", "kernel_shape"), [("...i,io->...o", (12, 20)), ("bti,oi->bto", (20, 12)), ("nd,df->nf", (12, 20))]
)
def test_plain_linear_einsum_is_adapted_like_a_linear(equation, kernel_shape):
    einsum = nnx.Einsum(equation, kernel_shape, (20,), rngs=nnx.Rngs(0))
    model = get_randlora_model(
        One(einsum), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["layer"], init_weights=False), rngs=nnx.Rngs(1)
    )
    layer = model.randlora_layers()["layer"]
    assert (layer.in_features, layer.out_features) == (12, 20)
    x = jax.random.normal(jax.random.key(0), (2, 4, 12) if equation.startswith("bt") else (3, 12))
    kernel = np.asarray(einsum.kernel.get_value(), np.float64)
    weight = kernel.T if kernel.shape == (12, 20) else kernel
    adapter = reference.Adapter(4, 8.0, layer.randlora_lambda["default"].get_value(), layer.randlora_gamma["default"].get_value())
    a, b = np.asarray(model.randlora_bases.randlora_A.get_value()), np.asarray(model.randlora_bases.randlora_B.get_value())
    expected = reference.forward(np.asarray(x, np.float64), weight, einsum.bias.get_value(), {"d": adapter}, ["d"], a, b)
    for compute in ("factored", "dense"):
        model.peft_config  # noqa: B018 - the same model, both paths
        layer.specs = tuple((n, type(s)(s.r, s.scaling, compute)) for n, s in layer.specs)
        ok, err, bound = check_close(np.asarray(model(x)), expected, "float32")
        assert ok, (compute, err, bound)
    merged = model.merge_and_unload()
    assert check_close(np.asarray(merged(x)), expected, "float32")[0]


@pytest.mark.parametrize("equation", ["bi,ioh->boh", "bij,jo->boi", "bi,io->o"])
def test_einsum_that_is_not_a_plain_linear_map_is_refused(equation):
    shape = {"bi,ioh->boh": (4, 3, 2), "bij,jo->boi": (4, 3), "bi,io->o": (4, 3)}[equation]
    einsum = nnx.Einsum(equation, shape, rngs=nnx.Rngs(0))
    with pytest.raises(TargetModuleError, match="cannot adapt"):
        get_randlora_model(One(einsum), RandLoraConfig(r=2, target_modules=["layer"]))


def test_dropout_acts_in_training_and_not_in_eval():
    model = adapted(16, 16, dropout=0.5)
    x = jnp.ones((4, 16))
    layer = model.randlora_layers()["layer"]
    assert not layer.randlora_dropout["default"].deterministic  # Flax modules start in training mode
    first, second = np.asarray(model(x)), np.asarray(model(x))
    assert not np.allclose(first, second)  # fresh masks per call
    model.eval()
    assert check_close(np.asarray(model(x)), reference_forward(model, x), "float32")[0]
    model.train()
    assert not np.allclose(np.asarray(model(x)), reference_forward(model, x), atol=1e-4)


def test_output_dtype_is_input_dtype_and_half_precision_computes_in_float32():
    base = nnx.Linear(16, 24, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    model = get_randlora_model(One(base), RandLoraConfig(r=4, target_modules=["layer"], init_weights=False), rngs=nnx.Rngs(1))
    layer = model.randlora_layers()["layer"]
    assert layer.randlora_lambda["default"].get_value().dtype == jnp.bfloat16
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.random.normal(jax.random.key(0), (3, 16), dtype)
        y = CALL(model, x)
        assert y.dtype == dtype
        ok, err, bound = check_close(np.asarray(y, np.float32), reference_forward(model, x), "bfloat16")
        assert ok, (err, bound)


def test_bad_inputs():
    model = adapted(12, 20)
    with pytest.raises(DtypeError, match="floating"):
        model(jnp.ones((2, 12), jnp.int32))
    with pytest.raises(ShapeError, match="in_features = 12"):
        model(jnp.ones((2, 13)))
