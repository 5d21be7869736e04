"""prepare_model_for_kbit_training on a small transformers-like model with a 4-bit layer."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import seeded_linear
from torch import nn
from torch.utils.checkpoint import checkpoint

from randlora_bnb import prepare_model_for_kbit_training, quantize_linear
from randlora_core import RandLoraConfig, get_randlora_model


class TinyLM(nn.Module):
    """Embeddings, a norm, a 4-bit projection, an int8 projection with float16 weights, a half head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 32).to(torch.bfloat16)
        self.norm = nn.LayerNorm(32).to(torch.bfloat16)
        self.proj = quantize_linear(seeded_linear(32, 32, dtype=torch.bfloat16), "nf4", compute_dtype=torch.float32)
        self.proj8 = quantize_linear(seeded_linear(32, 32, seed=1, dtype=torch.float16), "int8", has_fp16_weights=True)
        self.head = nn.Linear(32, 10).to(torch.float16)
        self.checkpointing: list[dict] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.checkpointing.append(dict(gradient_checkpointing_kwargs or {}))

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).float()
        if self.checkpointing:  # re-entrant checkpointing, as transformers used by default
            h = checkpoint(self.block, h, use_reentrant=True)
        else:
            h = self.block(h)
        return self.head(h.to(self.head.weight.dtype))


def test_freezes_upcasts_and_enables_checkpointing() -> None:
    model = TinyLM()
    packed = model.proj.weight
    assert prepare_model_for_kbit_training(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    for module in (model.embed, model.norm, model.head):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert model.proj.bias.dtype == torch.float32
    assert model.proj.weight is packed and isinstance(packed, bnb.nn.Params4bit) and packed.dtype == torch.uint8
    assert model.proj8.weight.dtype == torch.float16  # bitsandbytes-managed (quantized on the fly): left alone
    assert model.checkpointing == [{}]
    assert model.embed(torch.tensor([1, 2])).requires_grad


def test_adapters_train_through_reentrant_checkpointing() -> None:
    model = prepare_model_for_kbit_training(TinyLM())
    adapted = get_randlora_model(model, RandLoraConfig(r=4, target_modules=["proj"]))
    adapted(torch.tensor([[1, 2, 3]])).float().sum().backward()
    lam = adapted.model.proj.randlora_lambda["default"]
    assert lam.grad is not None and torch.count_nonzero(lam.grad) > 0


@pytest.mark.parametrize("use_checkpointing", [False, True])
def test_non_reentrant_or_disabled_checkpointing_adds_no_hook(use_checkpointing: bool) -> None:
    model = TinyLM()
    prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=use_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    assert model.checkpointing == ([{"use_reentrant": False}] if use_checkpointing else [])
    assert not model.embed(torch.tensor([1])).requires_grad


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_parameter_counts_see_quantized_weights_at_their_real_size(quant: str) -> None:
    # 4-bit weights are packed two values per byte; the counts must not halve them.
    def base(quantized: bool) -> nn.Module:
        layers = [seeded_linear(64, 48, seed=i) for i in range(2)]
        if quantized:
            layers[0] = quantize_linear(layers[0], quant, compute_dtype=torch.float32)
        return nn.ModuleDict({"a": layers[0], "b": layers[1]})

    config = RandLoraConfig(r=8, target_modules=["a", "b"])
    quantized = get_randlora_model(base(True), config).trainable_parameters()
    reference = get_randlora_model(base(False), config).trainable_parameters()
    assert quantized == reference
    assert reference[1] == 2 * (64 * 48 + 48) + reference[0]
