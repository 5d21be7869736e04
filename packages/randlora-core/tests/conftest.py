"""Shared helpers: small real models (no mocks) and reference-comparison utilities."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from randlora_core import RandLoraConfig, engine, get_randlora_model
from randlora_core.engine import Plan
from randlora_core.testing import Conv1DLike, SingleLayer


class Block(nn.Module):
    """A transformer-ish block: q/k/v/o projections of different shapes."""

    def __init__(self, d: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, hidden)
        self.k_proj = nn.Linear(d, hidden, bias=False)
        self.v_proj = nn.Linear(d, hidden)
        self.o_proj = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q_proj(x) + self.k_proj(x) + self.v_proj(x)
        return self.norm(x + self.o_proj(torch.tanh(h)))


class TinyLM(nn.Module):
    """Layers in a ModuleList (for layers_to_transform), a classifier and an lm_head."""

    def __init__(self, d: int = 16, n_layers: int = 3, vocab: int = 11) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.classifier = nn.Linear(d, 3)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x) + self.classifier(x).sum(-1, keepdim=True)


class GPT2ish(nn.Module):
    """Conv1D-like layers as in GPT-2 (weight stored (in, out))."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.c_attn = Conv1DLike(d, 3 * d)
        self.c_proj = Conv1DLike(3 * d, d)
        with torch.no_grad():
            for module in (self.c_attn, self.c_proj):
                module.weight.normal_(0, 0.2)
                module.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_attn(x)))


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every lambda/gamma non-trivial values (init makes the adapter a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "randlora_lambda" in name or "randlora_gamma" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype) * 0.5)


def adapted(in_f: int, out_f: int, r: int, dtype: torch.dtype = torch.float64, conv1d: bool = False, **cfg: object):
    """A seeded ``nn.Linear`` (or Conv1D-like) layer with a randomized adapter: ``(model, adapted layer)``."""
    torch.manual_seed(0)
    layer = Conv1DLike(in_f, out_f, dtype=dtype) if conv1d else nn.Linear(in_f, out_f, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.3)
        layer.bias.normal_(0, 0.1)
    config = RandLoraConfig(r=r, randlora_alpha=2.0 * r, target_modules=["layer"], fan_in_fan_out=conv1d, **cfg)
    model = get_randlora_model(SingleLayer(layer), config)
    randomize_adapters(model)
    return model, model.model.layer


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, cloned, plus each parameter's requires_grad."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    state.update({f"{k}::requires_grad": torch.tensor(p.requires_grad) for k, p in model.named_parameters()})
    return state


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def seeded_block() -> Block:
    """A :class:`Block` with the weights of seed 0."""
    torch.manual_seed(0)
    return Block()


def adapted_block(config: RandLoraConfig):
    """A seed-0 :class:`Block` wrapped with ``config``, its adapters randomised (catalogue tests' subject)."""
    model = get_randlora_model(seeded_block(), config)
    randomize_adapters(model)
    return model


@pytest.fixture
def block() -> Block:
    return seeded_block()


@pytest.fixture
def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def spy_plans(monkeypatch: pytest.MonkeyPatch) -> list[Plan]:
    """Records the :class:`Plan` of every engine call from now on (the plans a test asserts about)."""
    plans: list[Plan] = []
    original = engine.evaluate

    def evaluate(plan: Plan, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        plans.append(plan)
        return original(plan, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    return plans
