"""Error catalogue rows for randlora-bnb (docs/errors.md): quantization helpers and quantized RandLoRA layers.

Rows ERR-150 - ERR-153 are *pending* in the catalogue: they document the current exception, which
is not yet a RandLoraError (reported to the package's developer). Every row checks that the model
and the files are unchanged afterwards.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import MLP, adapt, quantized, seeded_linear
from torch import nn

from randlora_core import load_adapter
from randlora_core.testing import SingleLayer, model_state
from randlora_spec.testing import catalogue

ROWS = catalogue.Setups()
row = ROWS.row


@row("ERR-150")
def _quant_type(tmp: Path):
    from randlora_bnb import quantize_linear

    layer = seeded_linear(8, 8)
    return layer, lambda: quantize_linear(layer, "int4")


@row("ERR-151")
def _quant_type_model(tmp: Path):
    from randlora_bnb import quantize_model

    model = MLP()
    return model, lambda: quantize_model(model, "int4")


@row("ERR-152")
def _quantize_non_linear(tmp: Path):
    from randlora_bnb import quantize_linear

    norm = nn.LayerNorm(8)
    return norm, lambda: quantize_linear(norm, "nf4")


@row("ERR-153")
def _dequantize_plain(tmp: Path):
    from randlora_bnb import dequantize_weight

    layer = nn.Linear(4, 4)
    return layer, lambda: dequantize_weight(layer)


@row("ERR-154")
def _wrong_last_dim(tmp: Path):
    model = adapt(quantized(16, 8, "nf4"))
    return model, lambda: model(torch.randn(2, 5))


@row("ERR-155")
def _integer_input(tmp: Path):
    model = adapt(quantized(16, 8, "int8"))
    return model, lambda: model(torch.ones(2, 16, dtype=torch.int64))


@row("ERR-156")
def _safe_merge_nan(tmp: Path):
    model = adapt(quantized(16, 8, "nf4"))
    with torch.no_grad():
        model.model.layer.randlora_lambda["default"][0, 0] = math.nan
    return model, lambda: model.merge_adapter(safe_merge=True)


@row("ERR-157")
def _merge_twice(tmp: Path):
    model = adapt(quantized(16, 8, "int8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    return model, lambda: model.merge_adapter()


@row("ERR-158")
def _load_into_different(tmp: Path):
    path = tmp / "adapter.safetensors"
    adapt(quantized(16, 8, "nf4")).save_adapter(path)
    model = SingleLayer(quantized(16, 12, "nf4"))
    return model, lambda: load_adapter(model, path)


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path) -> None:
    model, call = ROWS[row_id](tmp_path)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)
