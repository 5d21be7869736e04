"""Shared helpers: real bitsandbytes layers on CPU (no mocks), small models, quantization-step bounds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.model import RandLoraModel
from randlora_core.testing import SingleLayer

# bitsandbytes is imported inside the helpers, not here: pytest imports conftest before it captures
# logs, and importing bitsandbytes logs that an optional CPU kernel package is missing.

QUANTS = ("int8", "nf4", "fp4")
FP16_REL = 2.0**-11  # int8 quantization reads the weight as float16 first


def seeded_linear(in_f: int, out_f: int, seed: int = 0, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) * 0.5)
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return linear.to(dtype)


def quantized(in_f: int, out_f: int, quant: str, seed: int = 0, bias: bool = True, **options: object) -> nn.Module:
    from randlora_bnb import quantize_linear

    if quant != "int8":
        options.setdefault("compute_dtype", torch.float32)
    return quantize_linear(seeded_linear(in_f, out_f, seed, bias), quant, **options)


class MLP(nn.Module):
    """Three linear layers (two hidden), enough for targeting and training tests."""

    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.up = seeded_linear(d_in, hidden, seed)
        self.mid = seeded_linear(hidden, hidden, seed + 1)
        self.down = seeded_linear(hidden, d_out, seed + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def adapt(layer: nn.Module, r: int = 4, alpha: float = 8.0, seed: int = 3, **config: object) -> RandLoraModel:
    """A RandLoraModel around ``SingleLayer(layer)`` with one adapter whose lambda/gamma are random (not a no-op)."""
    model = get_randlora_model(SingleLayer(layer), RandLoraConfig(r=r, randlora_alpha=alpha, target_modules=["layer"], **config))
    randomize(model, seed)
    return model


def randomize(model: RandLoraModel, seed: int = 3, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.named_randlora_layers():
            for name in layer.randlora_lambda:
                lam, gamma = layer.randlora_lambda[name], layer.randlora_gamma[name]
                lam.copy_(torch.randn(lam.shape, generator=gen) * scale)
                gamma.copy_(torch.randn(gamma.shape, generator=gen) * scale / gamma.shape[1] ** 0.5)


def dense_reference(wrapper: nn.Module) -> nn.Module:
    """randlora-core's plain RandLoraLinear on an nn.Linear holding the dequantized weight, same adapters and bases."""
    from randlora_bnb import dequantize_weight
    from randlora_core import RandLoraLinear

    base = wrapper.get_base_layer()
    linear = nn.Linear(wrapper.in_features, wrapper.out_features, bias=base.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(dequantize_weight(base))
        if base.bias is not None:
            linear.bias.copy_(base.bias.float())
    ref = RandLoraLinear(linear)
    for name in wrapper.randlora_lambda:
        config = RandLoraConfig(r=wrapper.r[name], randlora_alpha=wrapper.scaling[name] * wrapper.r[name])
        ref.update_layer(name, config, wrapper.bases)
        with torch.no_grad():
            ref.randlora_lambda[name].copy_(wrapper.randlora_lambda[name])
            ref.randlora_gamma[name].copy_(wrapper.randlora_gamma[name])
    ref.set_adapter(list(wrapper.active_adapters))
    return ref


def max_code_gap(quant: str) -> float:
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type(quant, device="cpu").sort().values
    return float((code[1:] - code[:-1]).max())


def half_step(dense: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Per-element bound on the rounding error when ``module``'s scheme quantizes ``dense`` (out, in).

    int8: half of absmax/127 per row, plus float16 rounding of the value. 4-bit: half the largest
    code gap times the block's absmax, plus the error of 8-bit-quantized (nested) statistics.
    """
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear8bitLt):
        row = dense.abs().amax(dim=1, keepdim=True)
        return row / 254.0 + dense.abs() * FP16_REL + 1e-7
    weight = module.weight
    blocksize = weight.blocksize
    flat = dense.reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    bound = (absmax * max_code_gap(weight.quant_type) / 2).expand_as(blocks).reshape(-1)[: flat.numel()]
    # Nested statistics are 8-bit blockwise-quantized (blocks of 256 absmax values around their mean):
    # their error is below 0.5% of the largest absmax (measured), so 1% of the tensor's absmax is safe.
    nested = 0.01 * float(absmax.max()) if weight.compress_statistics else 0.0
    return bound.reshape(dense.shape) + nested + 1e-6


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
