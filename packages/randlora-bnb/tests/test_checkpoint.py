"""Adapters on quantized models save and load with randlora-core's checkpoint format (independent of quantization)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import MLP, QUANTS, randomize

from randlora_bnb import RandLoraBnbLinear, quantize_model
from randlora_core import RandLoraConfig, get_randlora_model, load_adapter

TARGETS = ["up", "mid", "down"]


def quantized_mlp(quant: str) -> torch.nn.Module:
    options = {} if quant == "int8" else {"compute_dtype": torch.float32}
    return quantize_model(MLP(seed=5), quant, **options)


@pytest.mark.parametrize("quant", QUANTS)
def test_round_trip_on_a_freshly_quantized_base_is_exact(quant: str, tmp_path: Path) -> None:
    model = get_randlora_model(quantized_mlp(quant), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=TARGETS))
    randomize(model, seed=11)
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    loaded = load_adapter(quantized_mlp(quant), path)
    assert all(isinstance(layer, RandLoraBnbLinear) for _, layer in loaded.named_randlora_layers())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_an_adapter_trained_in_4bit_loads_into_float_and_int8_models(tmp_path: Path) -> None:
    model = get_randlora_model(quantized_mlp("nf4"), RandLoraConfig(r=4, target_modules=TARGETS))
    randomize(model, seed=2)
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    source = dict(model.named_randlora_layers())
    for target in (MLP(seed=5), quantized_mlp("int8")):
        loaded = load_adapter(target, path)
        for name, layer in loaded.named_randlora_layers():
            torch.testing.assert_close(layer.get_delta_weight("default"), source[name].get_delta_weight("default"))
