"""Forward and backward of the bitsandbytes wrappers on real int8 / NF4 / FP4 layers (CPU)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import QUANTS, adapt, dense_reference, quantized, seeded_linear

from randlora_bnb import (
    RandLoraLinear4bit,
    RandLoraLinear8bitLt,
    bnb_dequantize_agrees,
    dequantize_weight,
    quantize_linear,
    restore_standard_layout,
)
from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.testing import SingleLayer
from randlora_spec.tolerances import check_close

VARIANTS = [
    pytest.param("int8", {}, id="int8"),
    pytest.param("int8", {"threshold": 6.0}, id="int8-threshold"),
    pytest.param("nf4", {"compress_statistics": True}, id="nf4-nested"),
    pytest.param("nf4", {"compress_statistics": False, "compute_dtype": torch.bfloat16}, id="nf4-bf16"),
    pytest.param("fp4", {"compress_statistics": False}, id="fp4"),
    pytest.param("fp4", {"compress_statistics": True, "compute_dtype": torch.bfloat16, "blocksize": 128}, id="fp4-nested-bf16"),
]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: str = "float32") -> None:
    ok, err, bound = check_close(actual.detach().double().numpy(), expected.detach().double().numpy(), dtype)
    assert ok, f"max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("quant", QUANTS)
def test_wraps_with_the_bnb_wrapper_and_starts_as_a_no_op(quant: str) -> None:
    layer = quantized(24, 40, quant)
    x = torch.randn(5, 24)
    with torch.no_grad():
        before = layer(x)
    model = get_randlora_model(SingleLayer(layer), RandLoraConfig(r=4, target_modules=["layer"]))
    wrapper = model.model.layer
    assert type(wrapper) is (RandLoraLinear8bitLt if quant == "int8" else RandLoraLinear4bit)
    assert wrapper.get_base_layer() is layer and wrapper.quant_type == quant
    assert wrapper.randlora_lambda["default"].dtype == torch.float32
    assert not any(p.requires_grad for p in layer.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize(("quant", "options"), VARIANTS)
@pytest.mark.parametrize(("in_f", "out_f"), [(64, 40), (48, 72)])
def test_forward_is_quantized_base_plus_adapter(quant: str, options: dict, in_f: int, out_f: int) -> None:
    layer = quantized(in_f, out_f, quant, **options)
    model = adapt(layer)
    wrapper = model.model.layer
    ref = dense_reference(wrapper)
    x = torch.randn(2, 3, in_f)
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            y_base = model(x)
        contribution = ref(x) - ref.base_layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 3, out_f)
    close(y - y_base, contribution)
    # The base part is bitsandbytes' own computation (int8 at inference also quantizes the input).
    if quant != "int8":
        close(y_base, ref.base_layer(x), "bfloat16" if options.get("compute_dtype") == torch.bfloat16 else "float32")


@pytest.mark.parametrize("quant", QUANTS)
def test_output_dtype_follows_the_input(quant: str) -> None:
    layer = quantized(32, 48, quant, compute_dtype=torch.bfloat16) if quant != "int8" else quantized(32, 48, quant)
    model = adapt(layer)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            assert model(torch.randn(4, 32, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize(("quant", "options"), VARIANTS)
@pytest.mark.parametrize(("in_f", "out_f"), [(64, 40), (48, 72)])
def test_backward_reaches_lambda_gamma_and_the_input(quant: str, options: dict, in_f: int, out_f: int) -> None:
    model = adapt(quantized(in_f, out_f, quant, **options))
    wrapper = model.model.layer
    ref = dense_reference(wrapper)
    x = torch.randn(3, in_f, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad_y = torch.randn(3, out_f)
    model(x).backward(grad_y)
    ref(x_ref).backward(grad_y)
    for name in ("randlora_lambda", "randlora_gamma"):
        close(getattr(wrapper, name)["default"].grad, getattr(ref, name)["default"].grad)
    # Through the quantized base: bitsandbytes multiplies by the dequantized weight (in the compute dtype).
    close(x.grad, x_ref.grad, "bfloat16" if options.get("compute_dtype") == torch.bfloat16 else "float32")
    assert wrapper.get_base_layer().weight.grad is None


@pytest.mark.parametrize("quant", QUANTS)
def test_inference_mode_with_many_leading_axes(quant: str) -> None:
    model = adapt(quantized(32, 20, quant)).eval()
    ref = dense_reference(model.model.layer)
    x = torch.randn(2, 2, 3, 32)
    with torch.no_grad():
        y = model(x)
        with model.disable_adapter():
            y_base = model(x)
        close(y - y_base, ref(x) - ref.base_layer(x))
    assert y.shape == (2, 2, 3, 20)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_cpu_inference_repacking_is_kept_out(quant: str) -> None:
    # out_features 20 is not a multiple of 32: bitsandbytes' AVX512-BF16 repacking would assert.
    model = adapt(quantized(64, 20, quant)).eval()
    base = model.model.layer.get_base_layer()
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    x = torch.randn(2, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0


@pytest.mark.parametrize("compress", [False, True])
def test_a_weight_repacked_before_wrapping_is_restored_exactly(compress: bool) -> None:
    layer = quantized(128, 64, "nf4", compress_statistics=compress)
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    original = dequantize_weight(layer)
    x = torch.randn(3, 128)
    layer.eval()
    with torch.no_grad():
        y_packed = layer(x)  # bitsandbytes repacks in place and computes with bfloat16 statistics
    assert layer.weight.quant_state.packing_format_for_cpu
    assert restore_standard_layout(layer)
    restored = dequantize_weight(layer)
    # Codes unchanged; statistics are the bfloat16-rounded ones the packed kernel used.
    assert torch.allclose(restored, original, rtol=2.0**-8, atol=0)
    close(x @ restored.T + layer.bias, y_packed, "bfloat16")
    model = adapt(layer)
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None


def _decode_4bit(layer: torch.nn.Module) -> torch.Tensor:
    """Independent decoding: nibble codes (high first) times per-block absmax (non-nested state)."""
    state = layer.weight.quant_state
    raw = layer.weight.data.reshape(-1)
    codes = torch.stack([raw >> 4, raw & 0xF], dim=1).reshape(-1).long()[: layer.in_features * layer.out_features]
    table = bnb.functional.get_4bit_type(state.quant_type, device="cpu")
    scale = state.absmax.repeat_interleave(state.blocksize)[: codes.numel()]
    return (table[codes] * scale).reshape(layer.out_features, layer.in_features)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("in_f", [16, 48, 64, 20])
def test_dequantization_is_right_for_every_shape(quant: str, in_f: int) -> None:
    layer = quantized(in_f, 24, quant, compress_statistics=False)
    expected = _decode_4bit(layer)
    assert torch.equal(dequantize_weight(layer), expected)
    if in_f in (64, 20):  # where bitsandbytes' CPU kernel is right, it agrees bit for bit
        assert bnb_dequantize_agrees(layer)
    model = adapt(layer)
    x = torch.randn(4, in_f)
    with torch.no_grad(), model.disable_adapter():
        close(model(x), x @ expected.T + layer.bias)


def test_int8_dequantization_matches_the_layer_state() -> None:
    layer = quantized(32, 24, "int8")
    cb, scb = layer.weight.CB.clone(), layer.weight.SCB.clone()
    expected = cb.float() * scb[:, None] / 127
    torch.testing.assert_close(dequantize_weight(layer), expected, rtol=3e-7, atol=0)
    layer(torch.randn(2, 32))  # the first forward moves CB/SCB into the matmul state
    assert layer.weight.SCB is None
    torch.testing.assert_close(dequantize_weight(layer), expected, rtol=3e-7, atol=0)


def test_quantize_linear_keeps_the_settings() -> None:
    linear = seeded_linear(64, 32, dtype=torch.bfloat16)
    layer = quantize_linear(
        linear, "fp4", compute_dtype=torch.bfloat16, compress_statistics=False, blocksize=128, quant_storage=torch.bfloat16
    )
    state = layer.weight.quant_state
    assert (state.quant_type, state.blocksize, state.nested, state.dtype) == ("fp4", 128, False, torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer.bias, linear.bias)
    int8 = quantize_linear(linear, "int8", has_fp16_weights=False, threshold=4.0)
    assert int8.weight.dtype == torch.int8 and int8.state.threshold == 4.0
    with pytest.raises(ValueError, match="quant_type"):
        quantize_linear(linear, "int4")


def test_quantize_model_replaces_plain_linears_only() -> None:
    from torch import nn

    from randlora_bnb import quantize_model

    model = nn.Sequential(seeded_linear(8, 8), nn.ReLU(), nn.Sequential(seeded_linear(8, 4, seed=1)), seeded_linear(4, 2))
    quantize_model(model, "nf4", skip=["3"])
    assert isinstance(model[0], bnb.nn.Linear4bit) and isinstance(model[2][0], bnb.nn.Linear4bit)
    assert type(model[3]) is nn.Linear
    assert isinstance(quantize_model(seeded_linear(8, 8), "int8"), bnb.nn.Linear8bitLt)
