"""Shared helpers: small real Flax NNX models (no mocks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from randlora_jax import RandLoraConfig, get_randlora_model


class Block(nnx.Module):
    """A transformer-ish block: q/k/v/o projections of different shapes and a norm."""

    def __init__(self, rngs: nnx.Rngs, d: int = 16, hidden: int = 24) -> None:
        self.q_proj = nnx.Linear(d, hidden, rngs=rngs)
        self.k_proj = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(d, hidden, rngs=rngs)
        self.o_proj = nnx.Linear(hidden, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.q_proj(x) + self.k_proj(x) + self.v_proj(x)
        return self.norm(x + self.o_proj(jnp.tanh(h)))


class TinyLM(nnx.Module):
    """Blocks in an ``nnx.List`` (for layers_to_transform), a classifier and an lm_head."""

    def __init__(self, rngs: nnx.Rngs, d: int = 16, n_layers: int = 3, vocab: int = 11) -> None:
        self.layers = nnx.List([Block(rngs, d) for _ in range(n_layers)])
        self.classifier = nnx.Linear(d, 3, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def tiny_lm(seed: int = 0) -> TinyLM:
    """A TinyLM with deterministic weights."""
    return TinyLM(nnx.Rngs(seed))


def host(x: object) -> np.ndarray:
    """A numpy copy."""
    return np.asarray(x)


def randomize_adapters(model: object, seed: int = 1) -> None:
    """Give every lambda a non-zero value so the adapters change outputs (init_weights starts at a no-op)."""
    rng = np.random.default_rng(seed)
    for layer in model.randlora_layers().values():
        for name in layer.adapters:
            lam = layer.randlora_lambda[name].get_value()
            layer.randlora_lambda[name].set_value(jnp.asarray(rng.normal(size=lam.shape), lam.dtype))


@pytest.fixture
def lm_model():
    """TinyLM with a rank-4 adapter on q_proj and v_proj of every block, lambda randomised."""
    model = get_randlora_model(tiny_lm(), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return model
