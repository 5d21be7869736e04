"""RandLoRA on convolutions: ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (SPEC.md 3.10).

A kernel ``(C_out, C_in / groups, *k)`` is seen as the ``(O, I)`` matrix ``W.reshape(C_out, -1)``,
so ``I = (C_in / groups) * prod(k)`` and ``O = C_out``; the update is ``delta_W`` reshaped back to
the kernel's shape, and the layer computes the base convolution (its stride, padding, dilation,
groups and padding mode) with the kernel ``W + update``. Any ``groups`` works, and merging is an
exact kernel addition.

Two evaluation paths, as ``compute`` selects (SPEC 2.1):

- *dense* (``auto`` and ``dense``): one convolution with the kernel ``W + sum_a update_a`` built
  per call; a conv kernel is small next to its activations, so this costs about the base call.
  With active dropout each adapter's update runs on its own dropped-out input instead;
- *factored* (``factored``): per adapter, a convolution with the ``r * nb`` kernels of ``S_flat``
  (or ``B_flat^T`` when ``I > O``), repeated per group, then a grouped ``1 x ... x 1`` convolution
  with the other factor.

Gradients come from autograd through these torch ops.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from randlora_core.compute import resolve_compute
from randlora_core.layer import RandLoraLinear
from randlora_core.operands import LayerInput
from randlora_core.plain import scaled_basis
from randlora_core.registry import _register_builtin, has_forward_hooks
from randlora_spec.errors import DtypeError, ShapeError
from randlora_spec.layer_kinds import LayerRecord

ConvLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d
"""The base layers :class:`RandLoraConv` wraps."""
CONV_TYPES: dict[type[nn.Module], str] = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
_CONV_FN = {"conv1d": nn.functional.conv1d, "conv2d": nn.functional.conv2d, "conv3d": nn.functional.conv3d}


def conv_features(module: nn.Module) -> tuple[int, int] | None:
    """``(I, O)`` of the ``(O, I)`` view of a convolution's kernel, or ``None`` for another module."""
    weight = getattr(module, "weight", None)
    if not isinstance(module, tuple(CONV_TYPES)) or not isinstance(weight, torch.Tensor):
        return None
    return int(weight[0].numel()), int(weight.shape[0])


class RandLoraConv(RandLoraLinear):
    """RandLoRA wrapper around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (see the module docstring).

    Args:
        base_layer: the convolution to adapt (held, changed only by merging).
        fan_in_fan_out: ignored: a kernel's layout is fixed (``(C_out, ...)``).

    """

    layer_kind = "conv2d"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)
        self.layer_kind = next(kind for cls, kind in CONV_TYPES.items() if isinstance(base_layer, cls))

    def get_base_layer(self) -> ConvLayer:
        """The wrapped convolution."""
        return cast("ConvLayer", self.base_layer)  # the constructor accepts nothing else (CONV_TYPES)

    def _features(self, base_layer: nn.Module) -> tuple[int, int]:
        features = conv_features(base_layer)
        if features is None:
            raise ShapeError(f"cannot read the kernel of {type(base_layer).__name__}")
        return features

    # -- the (O, I) view ----------------------------------------------------------------------------

    def _weight_view(self) -> torch.Tensor:
        weight = self._dense_weight()
        return weight.reshape(weight.shape[0], -1)

    def _view_to_storage(self, view: torch.Tensor) -> torch.Tensor:
        return view.reshape(self.get_base_layer().weight.shape)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base convolution (padding mode included) with the kernel ``weight``."""
        out: torch.Tensor = self.get_base_layer()._conv_forward(x, weight, bias)
        return out

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise DtypeError(f"layer {self.layer_name!r} needs a floating-point input tensor, got {got}")
        base = self.get_base_layer()
        dims = len(base.kernel_size)
        if x.dim() not in (dims + 1, dims + 2) or x.shape[-dims - 1] != base.in_channels:
            raise ShapeError(
                f"layer {self.layer_name!r} ({type(base).__name__}) expects inputs (N, {base.in_channels}, *spatial) or "
                f"({base.in_channels}, *spatial) with {dims} spatial axes, got shape {tuple(x.shape)}"
            )

    def layer_record(self) -> LayerRecord:
        """The record of SPEC 6.2: sizes of the view, kind, kernel size and groups."""
        base = self.get_base_layer()
        return LayerRecord(self.in_features, self.out_features, False, self.layer_kind, tuple(base.kernel_size), base.groups)

    # -- plain adapters -----------------------------------------------------------------------------

    def _plain_adapted(self, call: LayerInput, names: list[str]) -> torch.Tensor:
        """``base(x)`` plus the adapters, dense (one convolution with ``W + updates``) unless ``factored`` is asked."""
        x = call.x
        dtype = self._compute_dtype(names, x.device)
        own = [self._own_dropout(n) for n in names]
        compute = resolve_compute(self._requested_compute(names))
        base_layer = self.get_base_layer()
        if compute == "factored" or any(own) or not call.plain or has_forward_hooks(base_layer):
            base = self._base_output(call)
            outs = [self._one_adapter(x.to(dtype), n, dtype, compute == "factored") for n in names]
            extra = sum(outs[1:], outs[0])
            return self._finish(x, base + extra.to(base.dtype))
        weight = base_layer.weight
        views = [self.delta_view(n, dtype, x.device) for n in names]
        update = self._view_to_storage(sum(views[1:], views[0])).to(weight.dtype)
        bias = base_layer.bias
        return self._finish(x, self._apply_weight(x.to(weight.dtype), weight + update, bias))

    def _own_dropout(self, name: str) -> bool:
        d = self.randlora_dropout[name]
        return d.training and getattr(d, "p", 0.0) > 0

    def _one_adapter(self, x: torch.Tensor, name: str, dtype: torch.dtype, factored: bool) -> torch.Tensor:
        """One adapter's output on its (dropped-out) input: its update as a kernel, or factored."""
        x_in = self.randlora_dropout[name](x)
        if not factored:
            return self._apply_weight(x_in, self._view_to_storage(self.delta_view(name, dtype, x.device)), None)
        op = self.adapter_call(name, dtype, x.device)
        s = scaled_basis(op.a_s, op.lam, op.gamma)  # (K, m)
        first, second = (s, op.b_flat) if self.in_features <= self.out_features else (op.b_flat.T, s.T)
        base = self.get_base_layer()
        k, groups = first.shape[0], base.groups
        kernel = first.reshape(k, *base.weight.shape[1:]).repeat(groups, *([1] * (base.weight.dim() - 1)))
        h = self._apply_weight(x_in, kernel, None)
        pointwise = second.reshape(self.out_features, k, *([1] * (base.weight.dim() - 2)))
        out: torch.Tensor = _CONV_FN[self.layer_kind](h, pointwise, groups=groups) * op.scaling
        return out

    def extra_repr(self) -> str:
        """Kind, sizes and adapter names."""
        return (
            f"kind={self.layer_kind}, in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.r)}"
        )


for _cls in CONV_TYPES:
    _register_builtin(_cls, RandLoraConv)
