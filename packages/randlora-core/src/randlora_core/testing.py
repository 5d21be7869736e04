"""Small real modules for tests and drivers: one adapted layer, a GPT-2-style Conv1D, layers of every kind, model trees.

The conformance drivers of every torch package build their models from these, and the packages'
tests use them for the same purpose; they are plain ``nn.Module`` code with no test framework in it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


class Conv1DLike(nn.Module):
    """A GPT-2-style Conv1D (weight stored (in, out)), matching randlora-core's duck-typing rule."""

    _randlora_plain_conv1d = True  # forward is exactly x @ W + b, so the fused/dense path may replace it

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.nf = out_features
        self.weight = nn.Parameter(torch.zeros(in_features, out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W (+ bias)`` with W stored (in, out)."""
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


class SingleLayer(nn.Module):
    """A model made of one layer registered as ``layer`` (the target name the drivers and tests use)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output."""
        out: torch.Tensor = self.layer(x)
        return out


def make_layer(in_features: int, out_features: int, bias: bool, fan_in_fan_out: bool, dtype: torch.dtype) -> nn.Module:
    """An ``nn.Linear`` or, with ``fan_in_fan_out``, a :class:`Conv1DLike`, zero-initialised."""
    if fan_in_fan_out:
        return Conv1DLike(in_features, out_features, bias, dtype)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


CONV_CLASSES: dict[str, type[nn.Module]] = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


def make_kind_layer(params: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
    """A zero-initialised base layer of the kind a golden layer case describes (SPEC 8.2 params).

    ``nn.ConvNd`` for a conv ``layer_kind`` (``in_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``), ``nn.Embedding`` for ``embedding`` (``padding_idx``), else :func:`make_layer`.
    """
    kind = params.get("layer_kind", "linear")
    if kind in CONV_CLASSES:
        layer: nn.Module = CONV_CLASSES[kind](
            params["in_channels"],
            params["out_features"],
            tuple(params["kernel_size"]),
            stride=tuple(params["stride"]),
            padding=tuple(params["padding"]),
            dilation=tuple(params["dilation"]),
            groups=params["groups"],
            bias=params["has_bias"],
            dtype=dtype,
        )
    elif kind == "embedding":
        layer = nn.Embedding(params["in_features"], params["out_features"], padding_idx=params["padding_idx"], dtype=dtype)
    else:
        return make_layer(params["in_features"], params["out_features"], params["has_bias"], params["fan_in_fan_out"], dtype)
    with torch.no_grad():
        for param in layer.parameters():
            param.zero_()
    return layer


def attach(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at the dotted ``path`` below ``root``, creating empty parent modules as needed."""
    parent = root
    *parents, leaf = path.split(".")
    for part in parents:
        if part not in parent._modules:
            parent.add_module(part, nn.Module())
        parent = parent.get_submodule(part)
    parent.add_module(leaf, module)


def tree_of(modules: Mapping[str, nn.Module]) -> nn.Module:
    """A module tree holding each of ``modules`` at its dotted path."""
    root = nn.Module()
    for path, module in modules.items():
        attach(root, path, module)
    return root


def build_model(
    layers: Mapping[str, tuple[int, int, bool, bool]],
    dtype: torch.dtype,
    make: Callable[[int, int, bool, bool, torch.dtype], nn.Module] = make_layer,
) -> nn.Module:
    """A module tree with a layer at each dotted path: ``{path: (in, out, has_bias, fan_in_fan_out)}``.

    ``make`` builds each layer from those four values and ``dtype`` (default :func:`make_layer`).
    """
    return tree_of({path: make(*spec, dtype) for path, spec in layers.items()})


def model_state(model: nn.Module) -> dict[str, object]:
    """Everything observable about a torch model, bit for bit.

    Parameters and buffers (non-persistent ones too) as raw bytes with dtype, shape and
    ``requires_grad``; the module tree (names and types); for a RandLoraModel or PEFT model its
    adapters, their configs, the active and the merged ones.
    """

    def raw(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
        if t.is_meta:  # no data (low_cpu_mem_usage): dtype and shape are all there is
            return str(t.dtype), tuple(t.shape), b"meta"
        flat = t.detach().cpu().contiguous().reshape(-1)
        return str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes()

    state: dict[str, object] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        state[f"param:{name}"] = (*raw(param), param.requires_grad)
    for name, buf in model.named_buffers(remove_duplicate=False):
        state[f"buffer:{name}"] = raw(buf)
    state["modules"] = [(n, type(m).__qualname__) for n, m in model.named_modules(remove_duplicate=False)]
    if hasattr(model, "peft_config") and isinstance(model.peft_config, dict):
        state["configs"] = {k: getattr(v, "to_json", lambda v=v: repr(v))() for k, v in model.peft_config.items()}
        state["active"] = list(getattr(model, "active_adapters", []))
        state["merged"] = list(getattr(model, "merged_adapters", []))
    return state
