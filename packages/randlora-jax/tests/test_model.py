"""The model API: targeting, several adapters, activation, merging, training with optax, failure safety."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Block, host, randomize_adapters, tiny_lm
from flax import nnx

from randlora_jax import (
    AdapterNotFoundError,
    ConfigError,
    MergeError,
    RandLoraConfig,
    RandLoraLinear,
    RandLoraParam,
    ShapeError,
    TargetModuleError,
    get_randlora_model,
    trainable,
)

X = jax.random.normal(jax.random.key(0), (2, 5, 16))
CALL = nnx.jit(lambda model, x: model(x))


def paths(model) -> list[str]:
    return sorted(model.randlora_layers())


def snapshot(model) -> list[np.ndarray]:
    return [host(v) for v in jax.tree.leaves(nnx.state(model))]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (dict(target_modules=["q_proj"]), ["layers.0.q_proj", "layers.1.q_proj", "layers.2.q_proj"]),
        (dict(target_modules=r"layers\.1\.(q|o)_proj"), ["layers.1.o_proj", "layers.1.q_proj"]),
        (
            dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
            ["layers.0.q_proj", "layers.0.v_proj", "layers.2.q_proj", "layers.2.v_proj"],
        ),
        (dict(target_modules=["o_proj"], layers_to_transform=1, layers_pattern="layers"), ["layers.1.o_proj"]),
        (
            dict(target_modules=["q_proj", "k_proj"], exclude_modules=["layers.0.k_proj"]),
            ["layers.0.q_proj", "layers.1.k_proj", "layers.1.q_proj", "layers.2.k_proj", "layers.2.q_proj"],
        ),
        (
            dict(target_modules="all-linear", layers_to_transform=[2]),
            ["layers.2.k_proj", "layers.2.o_proj", "layers.2.q_proj", "layers.2.v_proj"],
        ),
    ],
)
def test_targeting(config, expected):
    assert paths(get_randlora_model(tiny_lm(), RandLoraConfig(r=4, **config))) == expected


def test_all_linear_leaves_out_the_output_head():
    chosen = paths(get_randlora_model(tiny_lm(), RandLoraConfig(r=4, target_modules="ALL-LINEAR")))
    assert "classifier" in chosen and "lm_head" not in chosen and len(chosen) == 13


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (dict(target_modules=["nope"]), TargetModuleError, "matched no module"),
        (dict(target_modules=["norm"]), TargetModuleError, "cannot adapt: layers.0.norm \\(LayerNorm\\)"),
        (dict(target_modules="(unclosed"), ConfigError, "not a valid regular expression"),
        (dict(), ConfigError, "target_modules: must be set"),
    ],
)
def test_selection_errors_leave_the_model_unchanged(config, error, match):
    base = tiny_lm()
    before = snapshot(base)
    with pytest.raises(error, match=match):
        get_randlora_model(base, RandLoraConfig(r=4, **config))
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot(base), strict=True))
    assert not any(isinstance(m, RandLoraLinear) for _, m in nnx.iter_modules(base))


def test_bases_exist_once_and_every_layer_shares_them(lm_model):
    layers = list(lm_model.randlora_layers().values())
    assert all(layer.randlora_bases is lm_model.randlora_bases for layer in layers)
    bases = nnx.state(lm_model, nnx.OfType(type(lm_model.randlora_bases.randlora_A)))
    assert len(jax.tree.leaves(bases)) == 2
    assert lm_model.randlora_bases.shape.a_shape == (4, 1, 16) and lm_model.randlora_bases.shape.b_shape == (24, 4, 4)


def test_trainable_filter_selects_active_lambda_gamma_only(lm_model):
    chosen = nnx.state(lm_model, trainable)
    leaves = jax.tree_util.tree_leaves_with_path(chosen)
    assert len(leaves) == 12  # 6 layers x (lambda, gamma)
    assert all(isinstance(v, RandLoraParam) for _, v in nnx.to_flat_state(chosen))
    done, total = lm_model.trainable_parameters()
    assert done == 6 * (4 * 4 + 4 * 16) and total > done


def test_optax_training_updates_only_the_adapter():
    model = get_randlora_model(tiny_lm(), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q_proj", "v_proj"]))
    frozen = [host(v) for v in jax.tree.leaves(nnx.state(model, nnx.Not(trainable)))]
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=trainable)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2), argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, X)) for _ in range(4)]
    assert losses[-1] < losses[0]
    after = [host(v) for v in jax.tree.leaves(nnx.state(model, nnx.Not(trainable)))]
    assert all(np.array_equal(a, b) for a, b in zip(frozen, after, strict=True))


def test_several_adapters_set_activate_delete(lm_model):
    lm_model.add_adapter("other", RandLoraConfig(r=2, randlora_alpha=4.0, target_modules=["o_proj"], init_weights=False))
    assert lm_model.active_adapters == ["default"]  # added, not activated
    assert lm_model.randlora_bases.shape.r == 4 and lm_model.randlora_bases.shape.nb_max == 8  # grown for r=2
    only_default = host(CALL(lm_model, X))
    lm_model.set_adapter(["default", "other"])
    both = host(CALL(lm_model, X))
    assert not np.allclose(both, only_default)
    assert len(jax.tree.leaves(nnx.state(lm_model, trainable))) == 18
    lm_model.set_adapter("default")
    np.testing.assert_array_equal(host(CALL(lm_model, X)), only_default)
    lm_model.delete_adapter("other")
    assert "other" not in lm_model.peft_config
    assert not any("other" in layer.adapters for layer in lm_model.randlora_layers().values())
    with pytest.raises(AdapterNotFoundError, match="'other' not found"):
        lm_model.set_adapter("other")


def test_adapters_must_share_the_bases_identity(lm_model):
    with pytest.raises(ConfigError, match="projection_prng_key"):
        lm_model.add_adapter("x", RandLoraConfig(r=4, target_modules=["o_proj"], projection_prng_key=1))
    with pytest.raises(ConfigError, match="already exists"):
        lm_model.add_adapter("default", RandLoraConfig(r=4, target_modules=["o_proj"]))
    with pytest.raises(ConfigError, match="adapter_name"):
        lm_model.add_adapter("a.b", RandLoraConfig(r=4, target_modules=["o_proj"]))


def test_very_sparse_bases_cannot_grow_m_max():
    model = get_randlora_model(tiny_lm(), RandLoraConfig(r=4, target_modules=["q_proj"], very_sparse=True))
    model.add_adapter("wider", RandLoraConfig(r=2, target_modules=["q_proj"], very_sparse=True))  # same m_max: fine
    wide = get_randlora_model(
        nnx.Dict({"a": nnx.Linear(8, 8, rngs=nnx.Rngs(0)), "b": nnx.Linear(16, 16, rngs=nnx.Rngs(0))}),
        RandLoraConfig(r=4, target_modules=["a"], very_sparse=True),
    )
    with pytest.raises(ShapeError, match="m_max"):
        wide.add_adapter("big", RandLoraConfig(r=4, target_modules=["b"], very_sparse=True))


def test_merge_unmerge_and_unload(lm_model):
    adapted = host(CALL(lm_model, X))
    lm_model.merge_adapter()
    np.testing.assert_allclose(host(CALL(lm_model, X)), adapted, atol=2e-5)
    with pytest.raises(MergeError, match="already merged"):
        lm_model.merge_adapter()
    with pytest.raises(MergeError, match="merged"):
        with lm_model.disable_adapter():
            pass
    with pytest.raises(MergeError, match="unmerge it"):
        lm_model.delete_adapter("default")
    lm_model.unmerge_adapter()
    with pytest.raises(MergeError, match="no adapter is merged"):
        lm_model.unmerge_adapter()
    with lm_model.disable_adapter():
        base_only = host(CALL(lm_model, X))
    plain = lm_model.merge_and_unload()
    assert not any(isinstance(m, RandLoraLinear) for _, m in nnx.iter_modules(plain))
    assert not nnx.state(plain, trainable)
    np.testing.assert_allclose(host(CALL(plain, X)), adapted, atol=2e-5)
    assert not np.allclose(base_only, adapted)


def test_unload_restores_the_base_model_exactly():
    base = tiny_lm()
    before = host(CALL(base, X))
    model = get_randlora_model(base, RandLoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    np.testing.assert_array_equal(host(CALL(model.unload(), X)), before)


def test_bias_and_modules_to_save_train():
    config = RandLoraConfig(r=4, target_modules=["q_proj"], bias="randlora_only", modules_to_save=["classifier"])
    model = get_randlora_model(tiny_lm(), config)
    names = {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, trainable))}
    assert "model.layers.0.q_proj.base_layer.bias" in names
    assert "model.classifier.copies.default.kernel" in names and "model.layers.0.v_proj.bias" not in names
    with model.disable_adapter():
        assert not model.saved_modules()["classifier"].current_name()


def test_layer_block_alone_is_adaptable():
    model = get_randlora_model(Block(nnx.Rngs(0)), RandLoraConfig(r=8, target_modules="all-linear"))
    assert paths(model) == ["k_proj", "o_proj", "q_proj", "v_proj"]
