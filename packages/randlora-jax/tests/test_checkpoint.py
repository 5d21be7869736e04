"""save_adapter / load_adapter in checkpoint format v1: round trips, bases, validation before change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import host, randomize_adapters, tiny_lm
from flax import nnx

from randlora_jax import (
    BasisRuleError,
    CheckpointError,
    RandLoraConfig,
    RandLoraLinear,
    build_checkpoint,
    get_randlora_model,
    load_adapter,
)
from randlora_spec import checkpoint as spec_ckpt

X = jax.random.normal(jax.random.key(0), (2, 5, 16))
CALL = nnx.jit(lambda model, x: model(x))


def trained(**config) -> object:
    config = {"r": 4, "randlora_alpha": 8.0, "target_modules": ["q_proj", "o_proj"], **config}
    model = get_randlora_model(tiny_lm(), RandLoraConfig(**config))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", [{}, {"sparse": True}, {"very_sparse": True}])
def test_round_trip_is_bit_exact(tmp_path, save_projection, kind):
    model = trained(save_projection=save_projection, **kind)
    model.save_adapter(tmp_path / "a.safetensors")
    ckpt = spec_ckpt.load(tmp_path / "a.safetensors")
    assert (ckpt.bases is not None) == save_projection
    assert sorted(ckpt.layers) == sorted(model.randlora_layers())
    assert not any(rec.fan_in_fan_out for rec in ckpt.layers.values())  # nnx.Linear is nn.Linear's counterpart
    restored = load_adapter(tiny_lm(), tmp_path / "a.safetensors")
    np.testing.assert_array_equal(host(CALL(restored, X)), host(CALL(model, X)))


def test_loading_into_a_model_adds_without_activating(tmp_path):
    model = trained()
    model.save_adapter(tmp_path / "a.safetensors")
    other = get_randlora_model(tiny_lm(), RandLoraConfig(r=4, target_modules=["v_proj"]))
    out = load_adapter(other, tmp_path / "a.safetensors", adapter_name="loaded")
    assert out is other and other.active_adapters == ["default"]
    other.set_adapter("loaded")
    np.testing.assert_allclose(host(CALL(other, X)), host(CALL(model, X)), atol=1e-6)


def test_trainable_biases_and_modules_to_save_round_trip(tmp_path):
    model = trained(bias="randlora_only", modules_to_save=["classifier"])
    layer = model.randlora_layers()["layers.1.q_proj"]
    layer.base_layer.bias.set_value(jnp.full((24,), 0.25))
    copy = model.saved_modules()["classifier"].copies["default"]
    copy.kernel.set_value(copy.kernel.get_value() + 1.0)
    model.save_adapter(tmp_path / "a.safetensors")
    ckpt = spec_ckpt.load(tmp_path / "a.safetensors")
    assert "layers.1.q_proj" in ckpt.biases and ckpt.modules_to_save == {"classifier": ["bias", "kernel"]}
    restored = load_adapter(tiny_lm(), tmp_path / "a.safetensors")
    np.testing.assert_array_equal(host(restored.randlora_layers()["layers.1.q_proj"].base_layer.bias.get_value()), 0.25)
    np.testing.assert_array_equal(
        host(restored.saved_modules()["classifier"].current().kernel.get_value()), host(copy.kernel.get_value())
    )


def test_bfloat16_parameters_are_stored_as_bf16(tmp_path):
    base = tiny_lm()
    for _, var in nnx.iter_graph(base):
        if isinstance(var, nnx.Param):
            var.set_value(var.get_value().astype(jnp.bfloat16))
    model = get_randlora_model(base, RandLoraConfig(r=4, target_modules=["q_proj"]))
    ckpt = build_checkpoint(model)
    assert ckpt.bf16_keys == {k for k in ckpt.tensors if k.endswith(("randlora_lambda", "randlora_gamma"))}


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: setattr(m.layers[0], "q_proj", nnx.Linear(16, 25, rngs=nnx.Rngs(0))), "is 16x25 \\(in x out\\) in the model"),
        (lambda m: setattr(m.layers[0], "q_proj", nnx.LayerNorm(16, rngs=nnx.Rngs(0))), "cannot be adapted"),
        (lambda m: delattr(m.layers[2], "o_proj"), "has no module 'layers.2.o_proj'"),
    ],
)
def test_a_checkpoint_that_does_not_fit_leaves_the_model_unchanged(tmp_path, mutate, match):
    trained().save_adapter(tmp_path / "a.safetensors")
    target = tiny_lm()
    mutate(target)
    before = [host(v) for v in jax.tree.leaves(nnx.state(target))]
    with pytest.raises(CheckpointError, match=match):
        load_adapter(target, tmp_path / "a.safetensors")
    assert all(np.array_equal(a, b) for a, b in zip(before, [host(v) for v in jax.tree.leaves(nnx.state(target))], strict=True))
    assert not any(isinstance(m, RandLoraLinear) for _, m in nnx.iter_modules(target))


def test_bases_of_another_seed_are_refused_by_a_model(tmp_path):
    trained(projection_prng_key=5).save_adapter(tmp_path / "a.safetensors")
    model = trained()
    with pytest.raises(CheckpointError, match="projection_prng_key"):
        load_adapter(model, tmp_path / "a.safetensors", adapter_name="x")


def test_missing_file_and_unregenerable_rule(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_adapter(tiny_lm(), tmp_path / "missing.safetensors")
    ckpt = build_checkpoint(trained(save_projection=False))
    ckpt.config = ckpt.config.model_copy(update={"basis_rule": "peft-torch-v1"})
    (tmp_path / "peft.safetensors").write_bytes(spec_ckpt.to_bytes(ckpt, readable_basis_rules=("peft-torch-v1",)))
    with pytest.raises(BasisRuleError, match="refusing to substitute"):
        load_adapter(tiny_lm(), tmp_path / "peft.safetensors")
