"""Acceptance: QLoRA-style RandLoRA training on a 4-bit model reduces a regression loss by at least half."""

from __future__ import annotations

import torch
from conftest import MLP, randomize

from randlora_bnb import prepare_model_for_kbit_training, quantize_model
from randlora_core import RandLoraConfig, get_randlora_model

CONFIG = dict(r=4, randlora_alpha=8.0, target_modules=["up", "mid", "down"], projection_prng_key=7)


def quantized_mlp() -> torch.nn.Module:
    return prepare_model_for_kbit_training(quantize_model(MLP(seed=21), "nf4", compute_dtype=torch.float32))


def test_fifty_steps_halve_the_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    # The target is the same 4-bit base with a perturbation the adapter can express: a randomly
    # initialised RandLoRA adapter on the same shared bases (same seed), i.e. perturbed base weights.
    teacher = get_randlora_model(quantized_mlp(), RandLoraConfig(**CONFIG))
    randomize(teacher, seed=5, scale=0.5)
    with torch.no_grad():
        target = teacher(x)
    student = get_randlora_model(quantized_mlp(), RandLoraConfig(**CONFIG))
    params = [p for p in student.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(student(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0
    print(f"loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    assert losses[-1] <= 0.5 * losses[0], f"loss {losses[0]:.4g} -> {losses[-1]:.4g}"
