#!/usr/bin/env python3
"""Fine-tune a small Flax NNX model with RandLoRA (randlora-jax + optax), then reload the adapter in PyTorch.

1. A 64 -> 256 -> 256 -> 10 MLP is pretrained in full on a generated classification task (a fixed
   random "teacher" network labels Gaussian inputs).
2. The task shifts (the teacher's output layer is perturbed); RandLoRA adapts the MLP's three
   linear layers with its weights frozen: only lambda and gamma train, in one ``nnx.jit``-compiled
   step with optax's AdamW over ``randlora_jax.trainable``.
3. The adapter is saved in the spec's checkpoint format (bases not stored: they regenerate
   bit-exactly from the seed), reloaded into a fresh JAX model and into a PyTorch twin of the base
   MLP with randlora-core; the script fails unless all three give the same logits (float32 tolerance).

Usage::

    python examples/jax_finetune.py [--steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from randlora_jax import RandLoraConfig, get_randlora_model, load_adapter, trainable
from randlora_spec.tolerances import check_close

DIMS = (64, 256, 256, 10)
BATCH = 128


class MLP(nnx.Module):
    """``fc1 -> gelu -> fc2 -> gelu -> head``; randlora-core's twin below has the same module paths."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(DIMS[0], DIMS[1], rngs=rngs)
        self.fc2 = nnx.Linear(DIMS[1], DIMS[2], rngs=rngs)
        self.head = nnx.Linear(DIMS[2], DIMS[3], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits for ``x`` of shape (..., 64)."""
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        return self.head(jax.nn.gelu(self.fc2(h), approximate=False))


def make_task(seed: int, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of a teacher network; ``shift`` perturbs the teacher's last layer (the new task)."""
    rng = np.random.default_rng(0)  # the same teacher for every task...
    w1 = rng.normal(size=(DIMS[0], 32)) / 8.0
    w2 = rng.normal(size=(32, DIMS[3]))
    w2 = w2 + shift * np.random.default_rng(1).normal(size=w2.shape)  # ...up to the shift
    x = np.random.default_rng(seed).normal(size=(n, DIMS[0])).astype(np.float32)
    return x, np.argmax(np.tanh(x @ w1) @ w2, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of correct predictions."""
    return float(np.mean(np.argmax(np.asarray(model(jnp.asarray(x))), axis=-1) == y))


def train(model: nnx.Module, wrt: object, data: tuple[np.ndarray, np.ndarray], steps: int, lr: float) -> list[float]:
    """AdamW over the variables ``wrt`` selects, one jit-compiled step per batch; returns the losses."""
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=wrt)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y), argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    x_all, y_all = data
    losses = []
    for i in range(steps):
        rows = np.random.default_rng(i).integers(0, len(x_all), BATCH)
        losses.append(float(step(model, optimizer, jnp.asarray(x_all[rows]), jnp.asarray(y_all[rows]))))
    return losses


def torch_twin(source: MLP) -> object:
    """The same MLP in PyTorch with the JAX model's base weights (Flax kernels are (in, out))."""
    import torch
    from torch import nn

    class TorchMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.head = (nn.Linear(a, b) for a, b in itertools.pairwise(DIMS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = nn.functional.gelu(self.fc1(x))
            return self.head(nn.functional.gelu(self.fc2(h)))

    twin = TorchMLP()
    with torch.no_grad():
        for name in ("fc1", "fc2", "head"):
            layer = getattr(source, name)
            getattr(twin, name).weight.copy_(torch.from_numpy(np.array(layer.kernel.get_value()).T))
            getattr(twin, name).bias.copy_(torch.from_numpy(np.array(layer.bias.get_value())))
    return twin


def main(argv: list[str] | None = None) -> int:
    """Pretrain, fine-tune with RandLoRA, save, reload in JAX and PyTorch; 0 when every check passes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (pretraining uses the same number)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the adapter file (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)

    pretrain, new_task, test = make_task(1, 8192, 0.0), make_task(2, 8192, 1.5), make_task(3, 2048, 1.5)
    base = MLP(nnx.Rngs(0))
    train(base, nnx.Param, pretrain, args.steps, 3e-3)
    pretrained = nnx.state(base)  # kept to rebuild the same base for the reloads
    before = accuracy(base, *test)

    config = RandLoraConfig(r=16, randlora_alpha=32.0, target_modules=["fc1", "fc2", "head"], save_projection=False)
    model = get_randlora_model(base, config)
    model.print_trainable_parameters()
    started = time.perf_counter()
    losses = train(model, trainable, new_task, args.steps, 1e-2)
    seconds = time.perf_counter() - started
    after = accuracy(model, *test)
    print(f"new task, test accuracy: pretrained {before:.1%} -> RandLoRA {after:.1%}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"{args.steps} jit-compiled fine-tuning steps in {seconds:.1f} s (compilation included)")

    path = out / "mlp-randlora.safetensors"
    model.save_adapter(path)
    print(f"saved {path} ({path.stat().st_size} bytes, bases regenerated from the seed on load)")

    def fresh_base() -> MLP:
        fresh = MLP(nnx.Rngs(0))
        nnx.update(fresh, pretrained)
        return fresh

    x = test[0][:256]
    expected = np.asarray(model(jnp.asarray(x)), np.float64)
    reloaded = np.asarray(load_adapter(fresh_base(), path)(jnp.asarray(x)))

    import torch

    import randlora_core

    torch_model = randlora_core.load_adapter(torch_twin(fresh_base()), path)
    with torch.no_grad():
        in_torch = torch_model(torch.from_numpy(x)).numpy()
    failures = []
    for name, actual in (("JAX reload", reloaded), ("PyTorch (randlora-core) reload", in_torch)):
        ok, err, bound = check_close(actual, expected, "float32")
        print(f"{name}: max |logit difference| {err:.2e} (float32 bound {bound:.2e}) {'ok' if ok else 'FAILED'}")
        failures += [] if ok else [name]
    if after <= before:
        failures.append("fine-tuning did not improve accuracy on the new task")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
