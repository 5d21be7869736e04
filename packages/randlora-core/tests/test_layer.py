"""RandLoraLinear through the model API: orientations, Conv1D-like layers, dtypes, init, dropout, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import adapted, np64
from torch import nn

from randlora_core import RandLoraConfig, RandLoraLinear, ShapeError, get_randlora_model
from randlora_core.testing import SingleLayer
from randlora_spec import reference
from randlora_spec.tolerances import check_close

SHAPES = [(6, 10, 2), (10, 6, 2), (8, 8, 3), (10, 14, 4), (3, 8, 5)]


def reference_io(layer: RandLoraLinear, x: torch.Tensor, grad_y: torch.Tensor | None = None):
    bases = layer.bases
    a, b = bases.randlora_A.numpy(), bases.randlora_B.numpy()
    adapters = {
        name: reference.Adapter(layer.r[name], layer.scaling[name] * layer.r[name], np64(lam), np64(layer.randlora_gamma[name]))
        for name, lam in layer.randlora_lambda.items()
    }
    base = layer.get_base_layer()
    args = (adapters, layer.active_adapters, a, b, layer.fan_in_fan_out)
    y = reference.forward(np64(x), np64(base.weight), np64(base.bias), *args)
    if grad_y is None:
        return y
    return y, reference.backward(np64(x), np64(grad_y), np64(base.weight), *args)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize(("in_f", "out_f", "r"), SHAPES)
def test_forward_backward_match_reference(in_f: int, out_f: int, r: int, conv1d: bool) -> None:
    model, layer = adapted(in_f, out_f, r, conv1d=conv1d)
    assert layer.fan_in_fan_out is conv1d
    x = torch.randn(2, 3, in_f, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 3, out_f, dtype=torch.float64)
    y = model(x)
    y.backward(grad_y)
    y_ref, (gx_ref, grads) = reference_io(layer, x, grad_y)
    assert check_close(np64(y), y_ref, "float64")[0]
    assert check_close(np64(x.grad), gx_ref, "float64")[0]
    assert check_close(np64(layer.randlora_lambda["default"].grad), grads["default"][0], "float64")[0]
    assert check_close(np64(layer.randlora_gamma["default"].grad), grads["default"][1], "float64")[0]
    # the base stays frozen
    assert layer.get_base_layer().weight.grad is None


@pytest.mark.parametrize("conv1d", [False, True])
def test_delta_weight_storage_layout(conv1d: bool) -> None:
    _, layer = adapted(6, 10, 2, conv1d=conv1d)
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.get_base_layer().weight.shape
    geom = reference.LayerGeometry(6, 10, 2)
    ad = reference.Adapter(2, 4.0, np64(layer.randlora_lambda["default"]), np64(layer.randlora_gamma["default"]))
    a, b = layer.bases.randlora_A.numpy(), layer.bases.randlora_B.numpy()
    assert check_close(np64(delta), reference.delta_weight(geom, ad, a, b, conv1d), "float64")[0]


@pytest.mark.parametrize(
    ("dtype", "name"), [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")]
)
def test_dtypes_on_cpu(dtype: torch.dtype, name: str) -> None:
    model, layer = adapted(12, 20, 4, dtype=torch.float32)
    model.to(dtype)
    assert layer.randlora_lambda["default"].dtype == dtype
    assert layer.bases.randlora_A.dtype == torch.float32
    x = torch.randn(5, 12).to(dtype)
    y = model(x)
    assert y.dtype == dtype
    y_ref = reference_io(layer, x)
    ok, err, bound = check_close(np64(y), y_ref, name)
    assert ok, (err, bound)
    y.float().sum().backward()
    assert layer.randlora_lambda["default"].grad.dtype == dtype


def test_half_adapter_math_runs_in_float32_on_cpu() -> None:
    _, layer = adapted(12, 20, 4, dtype=torch.bfloat16)
    dtype = layer._compute_dtype(["default"], torch.device("cpu"))
    op = layer.adapter_call("default", dtype, torch.device("cpu"))
    assert dtype == torch.float32 and op.a_s.dtype == op.b_flat.dtype == op.lam.dtype == op.gamma.dtype == torch.float32
    assert layer.get_delta_weight("default").dtype == torch.float32


def test_wrong_input_size_names_layer_and_sizes() -> None:
    model, _ = adapted(6, 10, 2)
    with pytest.raises(ShapeError, match=r"'layer'.*in_features=6, got 7"):
        model(torch.randn(3, 7, dtype=torch.float64))


def test_init_weights_true_is_exact_noop() -> None:
    torch.manual_seed(0)
    base = SingleLayer(nn.Linear(10, 14))
    x = torch.randn(4, 10)
    y0 = base(x)
    model = get_randlora_model(base, RandLoraConfig(r=4, target_modules=["layer"]))
    layer = model.model.layer
    assert torch.equal(model(x), y0)
    assert torch.all(layer.randlora_lambda["default"] == 0)
    torch.testing.assert_close(layer.randlora_gamma["default"], torch.full((3, 10), 1 / 10))


def test_init_weights_false() -> None:
    torch.manual_seed(0)
    model = get_randlora_model(SingleLayer(nn.Linear(10, 14)), RandLoraConfig(r=4, target_modules=["layer"], init_weights=False))
    layer = model.model.layer
    assert layer.randlora_lambda["default"].abs().sum() > 0
    torch.testing.assert_close(layer.randlora_gamma["default"], torch.full((3, 10), 1 / 14))


def test_dropout_only_in_training() -> None:
    model, layer = adapted(8, 8, 2, randlora_dropout=0.5)
    assert isinstance(layer.randlora_dropout["default"], nn.Dropout)
    x = torch.randn(64, 8, dtype=torch.float64)
    model.eval()
    y_eval = model(x)
    assert check_close(np64(y_eval), reference_io(layer, x), "float64")[0]
    model.train()
    torch.manual_seed(1)
    assert not torch.allclose(model(x), y_eval)


def test_merge_unmerge_layer_roundtrip() -> None:
    model, layer = adapted(10, 6, 3)
    w0 = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(4, 10, dtype=torch.float64)
    y = model(x)
    layer.merge(["default"])
    assert layer.merged and layer.merged_adapters == ["default"]
    assert check_close(np64(model(x)), np64(y), "float64")[0]
    layer.unmerge()
    assert check_close(np64(layer.get_base_layer().weight), np64(w0), "float64")[0]
    with pytest.warns(UserWarning, match="already unmerged"):
        layer.unmerge()


def test_layer_is_subclassable_hooks() -> None:
    calls = []

    class Traced(RandLoraLinear):
        def _base_forward(self, x, *args, **kwargs):
            calls.append("base")
            return super()._base_forward(x, *args, **kwargs)

    torch.manual_seed(0)
    wrapper = Traced(nn.Linear(4, 6), fan_in_fan_out=False)
    assert (wrapper.in_features, wrapper.out_features) == (4, 6)
    wrapper(torch.randn(2, 4))
    assert calls == ["base"]
    assert np.array_equal(wrapper.get_base_layer().weight.shape, (6, 4))


def test_cpu_autocast_forward_backward() -> None:
    model, layer = adapted(12, 20, 4, dtype=torch.float32)
    x = torch.randn(3, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert layer.randlora_lambda["default"].grad.dtype == torch.float32
    assert x.grad is not None and x.grad.dtype == torch.float32
    y_ref = reference_io(layer, x)
    assert check_close(np64(y), y_ref, "bfloat16")[0]
