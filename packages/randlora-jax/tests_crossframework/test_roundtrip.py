"""Adapters cross between frameworks: trained in JAX, loaded in randlora-core, and the reverse.

Run by ``nox -s crossframework`` in a venv holding randlora-spec, randlora-core and randlora-jax.
The two models have the same structure and attribute names, so their dotted module paths (the
checkpoint's layer keys) agree; base weights are copied across (Flax kernels are ``(in, out)``,
torch weights ``(out, in)``). Outputs must agree within the spec's float32 tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch import nn

import randlora_core
import randlora_jax
from randlora_jax.targeting import resolve
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.tolerances import check_close

D, HIDDEN = 24, 40


class JaxNet(nnx.Module):
    """Two blocks in an nnx.List and a head: paths blocks.0.up, blocks.0.down, ..., head."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([JaxBlock(rngs) for _ in range(2)])
        self.head = nnx.Linear(D, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class JaxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, D, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(x), approximate=False))


class TorchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TorchBlock() for _ in range(2)])
        self.head = nn.Linear(D, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TorchBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, HIDDEN)
        self.down = nn.Linear(HIDDEN, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


def jax_net() -> JaxNet:
    return JaxNet(nnx.Rngs(0))


def torch_twin(source: JaxNet) -> TorchNet:
    """A TorchNet with the JAX model's base weights."""
    net = TorchNet()
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, nn.Linear):
                _, _, twin = resolve(source, name)
                module.weight.copy_(torch.from_numpy(np.asarray(twin.kernel.get_value()).T.copy()))
                module.bias.copy_(torch.from_numpy(np.asarray(twin.bias.get_value()).copy()))
    return net


X = np.random.default_rng(0).normal(size=(6, 3, D)).astype(np.float32)
CONFIGS = [
    dict(target_modules=["up", "down"]),
    dict(target_modules=r"blocks\.\d\.(up|down)", save_projection=False, sparse=True, bias="randlora_only"),
    dict(target_modules="all-linear", very_sparse=True, layers_to_transform=[1]),
]


def train_jax(model: randlora_jax.RandLoraModel, steps: int = 5) -> None:
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=randlora_jax.trainable)
    target = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3, 5)).astype(np.float32))

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(x) - target) ** 2), argnums=nnx.DiffState(0, randlora_jax.trainable)
        )(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(steps):
        step(model, optimizer, jnp.asarray(X))


def train_torch(model: randlora_core.RandLoraModel, steps: int = 5) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    target = torch.from_numpy(np.random.default_rng(1).normal(size=(6, 3, 5)).astype(np.float32))
    for _ in range(steps):
        loss = (model(torch.from_numpy(X)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    ok, err, bound = check_close(actual, np.asarray(expected, np.float64), "float32")
    assert ok, f"max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("config", CONFIGS, ids=["dense-stored", "sparse-absent-bias", "very-sparse-all-linear"])
def test_trained_in_jax_loads_in_torch(tmp_path, config):
    model = randlora_jax.get_randlora_model(jax_net(), randlora_jax.RandLoraConfig(r=4, randlora_alpha=8.0, **config))
    train_jax(model)
    model.save_adapter(tmp_path / "jax.safetensors")
    expected = np.asarray(model(jnp.asarray(X)))

    torch_model = randlora_core.load_adapter(torch_twin(jax_net()), tmp_path / "jax.safetensors")
    with torch.no_grad():
        actual = torch_model(torch.from_numpy(X)).numpy()
    assert_close(actual, expected)
    assert not np.allclose(expected, np.asarray(jax_net()(jnp.asarray(X))), atol=1e-3)  # training changed the outputs


@pytest.mark.parametrize("config", CONFIGS, ids=["dense-stored", "sparse-absent-bias", "very-sparse-all-linear"])
def test_trained_in_torch_loads_in_jax(tmp_path, config):
    torch_model = randlora_core.get_randlora_model(
        torch_twin(jax_net()), randlora_core.RandLoraConfig(r=4, randlora_alpha=8.0, **config)
    )
    train_torch(torch_model)
    torch_model.save_adapter(tmp_path / "torch.safetensors")
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(X)).numpy()

    model = randlora_jax.load_adapter(jax_net(), tmp_path / "torch.safetensors")
    assert_close(np.asarray(model(jnp.asarray(X))), expected)


def test_the_files_agree_on_everything_but_the_trained_values(tmp_path):
    config = dict(r=4, randlora_alpha=8.0, target_modules=["up", "down"], save_projection=True)  # bases stored, to compare them
    randlora_jax.get_randlora_model(jax_net(), randlora_jax.RandLoraConfig(**config)).save_adapter(tmp_path / "j.safetensors")
    randlora_core.get_randlora_model(torch_twin(jax_net()), randlora_core.RandLoraConfig(**config)).save_adapter(
        tmp_path / "t.safetensors"
    )
    ours, theirs = spec_ckpt.load(tmp_path / "j.safetensors"), spec_ckpt.load(tmp_path / "t.safetensors")
    assert ours.layers == theirs.layers and ours.bases_shape == theirs.bases_shape
    assert ours.config.to_json() == theirs.config.to_json()
    for mine, other in zip(ours.bases, theirs.bases, strict=True):  # the same bases, bit for bit
        assert np.array_equal(mine.view(np.uint32), other.view(np.uint32))
    assert (tmp_path / "j.safetensors").read_bytes() == (tmp_path / "t.safetensors").read_bytes()  # untrained: identical files
