"""DoRA on quantized layers is refused (SPEC 3.11: it rescales rows of a plain weight): catalogue row ERR-366.

Adding the adapter, adding it next to a plain one, and loading a DoRA checkpoint all fail before the
model changes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import adapt, quantized, seeded_linear

from randlora_core import RandLoraConfig, get_randlora_model, load_adapter, save_adapter
from randlora_core.testing import SingleLayer, model_state
from randlora_spec.testing import catalogue


def dora(**kw: object) -> RandLoraConfig:
    return RandLoraConfig(r=4, target_modules=["layer"], use_dora=True, **kw)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_err_366_dora_on_a_quantized_layer(quant: str, tmp_path: Path) -> None:
    model = SingleLayer(quantized(16, 8, quant))
    catalogue.check_row("ERR-366", lambda: get_randlora_model(model, dora()), model, tmp_path, state=model_state)
    adapted = adapt(quantized(16, 8, quant))
    catalogue.check_row("ERR-366", lambda: adapted.add_adapter("d", dora()), adapted, tmp_path, state=model_state)


def test_err_366_loading_a_dora_checkpoint_into_a_quantized_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_adapter(get_randlora_model(SingleLayer(seeded_linear(16, 8)), dora()), tmp_path / "d.safetensors")
    model = SingleLayer(quantized(16, 8, "nf4"))
    catalogue.check_row("ERR-366", lambda: load_adapter(model, tmp_path / "d.safetensors"), model, tmp_path, state=model_state)
