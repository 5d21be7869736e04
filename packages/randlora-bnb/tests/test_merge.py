"""Merging into quantized weights: re-quantization error bounds, exact unmerge, safe_merge, merge_and_unload."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import QUANTS, adapt, half_step, quantized

from randlora_bnb import QuantizedMergeWarning, RandLoraBnbLinear, dequantize_weight, requantize_weight
from randlora_core import MergeError, RandLoraConfig, get_randlora_model
from randlora_core.testing import SingleLayer


def within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    excess = ((actual - expected).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the quantization bound by {excess:.3g}"


@pytest.fixture
def no_snapshots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RandLoraBnbLinear, "keep_premerge_weights", False)


@pytest.mark.parametrize(("quant", "compress"), [("int8", False), ("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_requantizing_merge_and_unmerge_stay_within_a_quantization_step(quant: str, compress: bool, no_snapshots: None) -> None:
    options = {} if quant == "int8" else {"compress_statistics": compress}
    model = adapt(quantized(96, 40, quant, **options))
    wrapper = model.model.layer
    base = wrapper.get_base_layer()
    start = dequantize_weight(base)
    delta = wrapper.get_delta_weight("default").detach()
    target = start + delta
    with pytest.warns(QuantizedMergeWarning, match="re-quantizes"):
        model.merge_adapter()
    merged = dequantize_weight(base)
    within(merged, target, half_step(target, base))
    with pytest.warns(QuantizedMergeWarning, match="unmerging"):
        model.unmerge_adapter()
    unmerged = dequantize_weight(base)
    # Two roundings: of start + delta (at the merged weight's scale), then of merged - delta.
    within(unmerged, start, half_step(merged, base) + half_step(merged - delta, base))
    assert base is model.model.layer.get_base_layer() and wrapper.merged_adapters == []


@pytest.mark.parametrize("quant", QUANTS)
def test_unmerge_restores_the_original_weight_bit_for_bit(quant: str) -> None:
    model = adapt(quantized(64, 48, quant))
    base = model.model.layer.get_base_layer()
    start = dequantize_weight(base)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y_adapter = model(x)
        with model.disable_adapter():
            y_base = model(x)
    for _ in range(3):  # no drift over merge/unmerge cycles
        model.merge_adapter()
        assert not torch.equal(dequantize_weight(base), start)
        with torch.no_grad():
            y_merged = model(x)
        # The merged layer is the quantized base with the adapter folded in: close to the adapter model.
        scale = y_adapter.abs().max()
        assert (y_merged - y_adapter).abs().max() < (0.02 if quant == "int8" else 0.25) * scale
        model.unmerge_adapter()
        assert torch.equal(dequantize_weight(base), start)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(x), y_base)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_two_adapters_merge_in_order_and_unmerge_exactly(quant: str) -> None:
    layer = quantized(64, 48, quant)
    model = get_randlora_model(SingleLayer(layer), RandLoraConfig(r=4, target_modules=["layer"]), adapter_name="a")
    model.add_adapter("b", RandLoraConfig(r=2, target_modules=["layer"]))
    from conftest import randomize

    randomize(model, seed=9)
    start = dequantize_weight(layer)
    model.merge_adapter(["a", "b"])
    assert model.merged_adapters == ["a", "b"]
    model.unmerge_adapter()
    assert torch.equal(dequantize_weight(layer), start)


@pytest.mark.parametrize("quant", QUANTS)
def test_a_weight_replaced_while_merged_is_unmerged_by_subtraction(quant: str) -> None:
    model = adapt(quantized(64, 32, quant))
    wrapper = model.model.layer
    base = wrapper.get_base_layer()
    start = dequantize_weight(base)
    delta = wrapper.get_delta_weight("default").detach()
    model.merge_adapter()
    requantize_weight(base, dequantize_weight(base))  # someone rewrote the weight: the snapshot is stale
    merged = dequantize_weight(base)
    with pytest.warns(QuantizedMergeWarning):
        model.unmerge_adapter()
    within(dequantize_weight(base), start, 2 * half_step(merged, base) + half_step(merged - delta, base))


@pytest.mark.parametrize("quant", QUANTS)
def test_safe_merge_with_nan_leaves_the_model_unchanged(quant: str) -> None:
    model = adapt(quantized(32, 24, quant))
    wrapper = model.model.layer
    base = wrapper.get_base_layer()
    weight, data = base.weight, base.weight.data.clone()
    with torch.no_grad():
        wrapper.randlora_lambda["default"][0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    assert base.weight is weight and torch.equal(base.weight.data, data)
    assert model.merged_adapters == [] and wrapper.merged_adapters == []
    with pytest.raises(MergeError):
        model.merge_and_unload(safe_merge=True)
    assert model.model.layer is wrapper and base.weight is weight


def test_safe_merge_refuses_int8_weights_beyond_float16() -> None:
    model = adapt(quantized(32, 24, "int8"))
    wrapper = model.model.layer
    with torch.no_grad():
        wrapper.randlora_lambda["default"].fill_(1e6)
    weight = wrapper.get_base_layer().weight
    with pytest.raises(MergeError, match="float16"):
        model.merge_adapter(safe_merge=True)
    assert wrapper.get_base_layer().weight is weight and not wrapper.merged


@pytest.mark.parametrize("quant", QUANTS)
def test_merge_and_unload_returns_the_quantized_modules(quant: str) -> None:
    layer = quantized(64, 48, quant)
    expected_type = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    model = adapt(layer)
    target = dequantize_weight(layer) + model.model.layer.get_delta_weight("default").detach()
    x = torch.randn(4, 64)
    with torch.no_grad():
        y_adapter = model(x)
    plain = model.merge_and_unload()
    assert plain.layer is layer and type(plain.layer) is expected_type
    within(dequantize_weight(layer), target, half_step(target, layer))
    with torch.no_grad():
        y = plain(x)
    assert (y - y_adapter).abs().max() < (0.02 if quant == "int8" else 0.25) * y_adapter.abs().max()


@pytest.mark.parametrize(
    "options",
    [
        {"compress_statistics": False, "blocksize": 128, "quant_storage": torch.bfloat16},
        {"compress_statistics": True, "blocksize": 32},
    ],
    ids=["bs128-bf16storage", "nested-bs32"],
)
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_requantization_keeps_the_layer_settings(quant: str, options: dict, no_snapshots: None) -> None:
    layer = quantized(64, 32, quant, **options)
    before = layer.weight.quant_state
    model = adapt(layer)
    model.merge_adapter()
    for current in (layer.weight, model.model.layer.get_base_layer().weight):
        state = current.quant_state
        assert (state.quant_type, state.blocksize, state.nested, state.dtype) == (
            before.quant_type,
            before.blocksize,
            before.nested,
            before.dtype,
        )
        assert current.dtype == layer.quant_storage and current.compress_statistics == options["compress_statistics"]
        assert layer.quant_state is state
    model.unmerge_adapter()
    assert layer.weight.quant_state.blocksize == options["blocksize"]


def test_int8_with_fp16_weights_merges_in_float() -> None:
    layer = quantized(32, 24, "int8", has_fp16_weights=True)
    assert layer.weight.dtype == torch.float32  # quantized on the fly by each matmul
    model = adapt(layer)
    start = dequantize_weight(layer)
    delta = model.model.layer.get_delta_weight("default").detach()
    model.merge_adapter()
    torch.testing.assert_close(dequantize_weight(layer), start + delta)
    model.unmerge_adapter()
    torch.testing.assert_close(dequantize_weight(layer), start, rtol=0, atol=1e-6)


def test_int8_threshold_and_state_survive_merging() -> None:
    layer = quantized(64, 32, "int8", threshold=6.0)
    model = adapt(layer)
    x = torch.randn(3, 64)
    model(x)  # moves CB/SCB into the matmul state
    model.merge_adapter()
    assert layer.state.threshold == 6.0 and layer.weight.dtype == torch.int8
    with torch.no_grad():
        model(x)
    assert layer.state.CB.data_ptr() == layer.weight.data_ptr() and layer.state.SCB is not None
    model.unmerge_adapter()
    with torch.no_grad():
        model(x)
