"""RandLoRA wrappers for bitsandbytes' ``Linear8bitLt`` (int8) and ``Linear4bit`` (NF4 / FP4) layers.

They subclass randlora-core's :class:`~randlora_core.RandLoraLinear` and only override its base-layer
hooks; the adapter math, autograd, adapter management and merge bookkeeping are core's.

- Forward: the frozen quantized base computes its output as bitsandbytes does, the adapter adds
  ``x @ delta_W^T`` computed from float32 ``lambda`` / ``gamma`` (the QLoRA practice of keeping the
  small trainable tensors in full precision; SPEC 5.2: the adapter is computed in the dtype of
  its tensors), and the sum is cast to the input's dtype. Gradients reach ``lambda``, ``gamma`` and
  the input through the quantized base (bitsandbytes' matmuls are differentiable in the input).
- Merge: dequantize, add delta-W in float32, re-quantize with the layer's own settings.
  Re-quantizing rounds, so a merge is inexact (a :class:`QuantizedMergeWarning` says so).
- Unmerge: the pre-merge quantized tensors are kept while merged (references, no copy: one extra
  quantized weight per merged adapter), so an unmerge reinstalls the original weight bit for bit,
  without accumulating rounding over merge/unmerge cycles. If the weight changed since the merge
  (moved to another device, reloaded), or ``keep_premerge_weights`` is False, it dequantizes,
  subtracts and re-quantizes instead, which is exact only within the quantization error.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import bitsandbytes as bnb
import torch
from torch import nn

from randlora_bnb.quant import (
    WeightSnapshot,
    WeightToken,
    bnb_dequantize_agrees,
    dequantize_weight,
    is_quantized,
    quant_type_of,
    requantize_weight,
    restore_standard_layout,
    restore_weight,
    same_weight,
    snapshot_weight,
    weight_token,
)
from randlora_core import RandLoraLinear
from randlora_spec.errors import MergeError

FLOAT16_MAX = torch.finfo(torch.float16).max


class QuantizedMergeWarning(UserWarning):
    """Merging into (or unmerging from) a quantized weight re-quantizes it, which rounds."""


@contextmanager
def _cpu_repacking_disabled(layer: nn.Module) -> Iterator[None]:
    """Keep ``Linear4bit`` from repacking its weight for bitsandbytes' AVX512-BF16 CPU inference kernel.

    That repacking (eval mode, no gradient, CPU) asserts for ``out_features`` not divisible by 32,
    rounds the blockwise absmax to bfloat16, and leaves a layout whose forward silently returns no
    gradient for the input when training resumes (bitsandbytes 0.50.2). Inside a RandLoRA layer the
    weight therefore stays in the standard layout, which every bitsandbytes matmul accepts.
    """
    flag = getattr(layer, "support_avx512bf16_for_cpu", False)
    if not flag or not isinstance(layer, bnb.nn.Linear4bit):  # only Linear4bit has the flag
        yield
        return
    layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        layer.support_avx512bf16_for_cpu = flag


class RandLoraBnbLinear(RandLoraLinear):
    """Common base of the bitsandbytes wrappers: float32 adapter tensors, quantization-aware hooks.

    Args:
        base_layer: a ``bitsandbytes.nn.Linear8bitLt`` or ``Linear4bit``; held, modified only by merging.
        fan_in_fan_out: ignored: bitsandbytes layers always store their weight ``(out, in)``.

    """

    keep_premerge_weights: bool = True
    """Keep the pre-merge quantized weight while merged, so unmerging restores it exactly (set False to save memory)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        # The (out, in) layout is a property of the layer type (randlora-core derives the same from
        # nn.Linear); core's checkpoint loader compares it with the file and reports a mismatch.
        super().__init__(base_layer, fan_in_fan_out=False)
        # One entry per merged adapter, in merge order: the weight before that merge, and a token of
        # the weight the merge installed (to tell whether it is still the layer's weight).
        self._premerge: list[tuple[WeightSnapshot, WeightToken]] = []

    @property
    def quant_type(self) -> str:
        """``"int8"``, ``"nf4"`` or ``"fp4"``."""
        return quant_type_of(self.get_base_layer())

    def _param_dtype(self) -> torch.dtype:
        """Float32 for lambda / gamma whatever the base's compute dtype (they are tiny; trained in half they lose updates)."""
        return torch.float32

    def _base_forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """The quantized base's output; inputs with several leading axes are flattened to 2-D around the call.

        bitsandbytes' int8 inference matmul handles 2-D and 3-D inputs only, so leading axes are
        merged (a view when possible) and restored afterwards.
        """
        base = self.get_base_layer()
        restore_standard_layout(base)  # no-op unless the weight was repacked before it was wrapped
        flat = x.dim() > 2
        x_in = x.reshape(-1, x.shape[-1]) if flat else x
        with _cpu_repacking_disabled(base):
            out: torch.Tensor = base(x_in, *args, **kwargs)
        return out.reshape(*x.shape[:-1], out.shape[-1]) if flat else out

    def _dense_weight(self) -> torch.Tensor:
        """The dequantized base weight, float32 ``(out, in)``."""
        return dequantize_weight(self.get_base_layer())

    def _apply_delta(self, delta: torch.Tensor, sign: float) -> None:
        base = self.get_base_layer()
        if is_quantized(base):
            action = "merging into" if sign > 0 else "unmerging from"
            warnings.warn(
                f"{action} the {self.quant_type}-quantized layer {self.layer_name!r} re-quantizes its weight: "
                "the result is rounded to the quantization grid, so outputs differ slightly from the unmerged model's",
                QuantizedMergeWarning,
                stacklevel=5,
            )
        dense = dequantize_weight(base)
        dense += sign * delta.to(device=dense.device, dtype=torch.float32)
        requantize_weight(base, dense)

    def _merge_delta(self, delta: torch.Tensor) -> None:
        """Dequantize, add ``delta`` (out, in) in float32, re-quantize with the layer's settings."""
        base = self.get_base_layer()
        before = snapshot_weight(base) if self.keep_premerge_weights else None
        self._apply_delta(delta, 1.0)
        if before is None:
            self._premerge.clear()  # nothing to restore exactly: later unmerges subtract instead
        else:
            self._premerge.append((before, weight_token(base)))

    def _unmerge_delta(self, delta: torch.Tensor) -> None:
        """Reinstall the pre-merge weight if nothing changed it since; else dequantize, subtract, re-quantize."""
        base = self.get_base_layer()
        if self._premerge:
            before, token = self._premerge.pop()
            if same_weight(base, token):
                restore_weight(base, before)
                if self._premerge:  # the restored weight is, bit for bit, the one the previous merge installed
                    self._premerge[-1] = (self._premerge[-1][0], weight_token(base))
                return
            self._premerge.clear()  # the weight was replaced or modified: older snapshots are stale too
        self._apply_delta(delta, -1.0)

    def extra_repr(self) -> str:
        """Sizes, quantization and adapter names."""
        return f"{super().extra_repr()}, quant_type={self.quant_type!r}"


class RandLoraLinear8bitLt(RandLoraBnbLinear):
    """RandLoRA around ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(); any ``threshold``, ``has_fp16_weights``)."""

    def check_merge(self, adapter_names: list[str]) -> None:
        """Core's finiteness check, plus: int8 quantization goes through float16, so merged values must fit it."""
        super().check_merge(adapter_names)
        base = self.get_base_layer()
        if not is_quantized(base):
            return
        with torch.no_grad():
            merged = self._dense_weight()
            for name in adapter_names:
                merged += self.get_delta_weight(name).to(device=merged.device, dtype=torch.float32)
            peak = float(merged.abs().max()) if merged.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise MergeError(
                f"merging adapter(s) {adapter_names} into layer {self.layer_name!r} gives weights up to {peak:.3g}, "
                f"beyond float16's range ({FLOAT16_MAX:.0f}) through which int8 quantization passes; nothing was merged"
            )


class RandLoraLinear4bit(RandLoraBnbLinear):
    """RandLoRA around ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4; any compute dtype, blocksize, storage, nesting).

    On CPU, a layer whose shape trips bitsandbytes' 4-bit CPU dequantization kernel (checked once per
    weight: see :func:`randlora_bnb.quant.bnb_dequantize_agrees`) computes its base output as
    bitsandbytes' CPU path does (dequantize, then a dense matmul in the compute dtype) but with the
    correct dequantized weight.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out)
        self._kernel_check: tuple[WeightToken, bool] | None = None

    def _bnb_kernel_ok(self, base: nn.Module) -> bool:
        token = weight_token(base)
        if self._kernel_check is None or not same_weight(base, self._kernel_check[0]):
            self._kernel_check = (token, bnb_dequantize_agrees(base))
        return self._kernel_check[1]

    def _base_forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """The bitsandbytes forward, or on CPU its dense equivalent where the dequantization kernel is wrong."""
        base = self.get_base_layer()
        restore_standard_layout(base)
        cpu_call = x.device.type == "cpu" and not args and not kwargs
        if not isinstance(base, bnb.nn.Linear4bit) or not cpu_call or not is_quantized(base) or self._bnb_kernel_ok(base):
            return super()._base_forward(x, *args, **kwargs)
        if not base.compute_type_is_set:  # bitsandbytes picks the compute dtype from the first input
            base.set_compute_type(x)
            base.compute_type_is_set = True
        compute = x.to(base.compute_dtype) if base.compute_dtype is not None else x
        weight = dequantize_weight(base).to(compute.dtype)
        bias = base.bias.to(compute.dtype) if base.bias is not None else None
        return nn.functional.linear(compute, weight, bias).to(x.dtype)
