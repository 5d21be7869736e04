"""The accelerated PEFT RandLoRA layer class (imports PEFT; loaded lazily by :mod:`randlora_peft.accelerate`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from randlora_core.compute import choose_path, current_override
from randlora_core.functional import LayerPlan, adapter_output, delta_weight, linear_forward
from randlora_peft._peft import peft_randlora_linear
from randlora_peft.accelerate import COMPUTE_ATTR
from randlora_spec.errors import ShapeError

_PeftLinear: Any = peft_randlora_linear()
_HALF = (torch.float16, torch.bfloat16)


class AcceleratedRandLoraLinear(_PeftLinear):
    """PEFT's RandLoRA ``Linear`` with its adapter math on randlora-core's kernels.

    Instances are never constructed: :func:`randlora_peft.accelerate` switches an existing PEFT
    layer's ``__class__`` to this subclass. It owns no state of its own; ``forward`` and
    ``get_delta_weight`` read the very same ``randlora_lambda`` / ``randlora_gamma`` parameters and
    ``randlora_A`` / ``randlora_B`` buffers PEFT created, so ``state_dict``, ``save_pretrained``,
    adapter management and the optimizer's view of the parameters are untouched. Everything else
    (``merge``, ``unmerge``, ``update_layer``, ``set_adapter``, ...) is PEFT's, calling back into the
    ``get_delta_weight`` below.

    Where it applies (a plain ``nn.Linear`` / Conv1D base without hooks or extra call arguments,
    frozen weight on the input's device, no active dropout, no autocast, one dtype throughout) the
    whole layer, base plus every active adapter, is one node of randlora-core's
    ``RandLoraLinearFunction``, evaluated ``factored`` (two thin matmuls per basis window) or
    ``dense`` (``delta_W`` folded into the base matmul) as randlora-core's cost model picks for the
    call's token count and widths, or as forced by ``accelerate(..., compute=...)`` or
    ``randlora_core.compute.compute_override``. Otherwise each adapter runs through randlora-core's
    ``RandLoraFunction`` after PEFT's base call, in PEFT's order, with PEFT's dropout.

    Differences from PEFT's own code path, none of which changes a result PEFT computes correctly
    (beyond float rounding): the scaled basis is rebuilt in backward instead of being kept alive;
    adapters sharing a basis window are summed before the matmuls; each adapter's windows are taken
    from its own rank and number of bases (``A[:r, 0, :m]``, ``B[:M, :nb, :r]``), so adapters of
    different ranks on one layer work.
    """

    def _core_operands(self, adapter: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a_s, b_flat, lambda, gamma)`` of ``adapter`` in its compute dtype on ``device``.

        The compute dtype follows PEFT: the promotion of the bases' and lambda's dtypes, with
        half precision computed in float32 on CPU.
        """
        a_full, b_full = self.randlora_A[adapter], self.randlora_B[adapter]
        lam, gamma = self.randlora_lambda[adapter], self.randlora_gamma[adapter]
        dtype = torch.promote_types(b_full.dtype, lam.dtype)
        if device.type == "cpu" and dtype in _HALF:
            dtype = torch.float32
        r, nb = lam.shape
        m = gamma.shape[1]
        big_m = max(self.in_features, self.out_features)
        if a_full.shape[0] < r or a_full.shape[2] < m or b_full.shape[0] < big_m or b_full.shape[1] < nb or b_full.shape[2] < r:
            raise ShapeError(
                f"adapter {adapter!r}: bases A{tuple(a_full.shape)}, B{tuple(b_full.shape)} are too small for "
                f"r={r}, m={m}, M={big_m}, nb={nb}"
            )
        a_s = a_full[:r, 0, :m].to(device=device, dtype=dtype)
        b_flat = b_full[:big_m, :nb, :r].to(device=device, dtype=dtype).reshape(big_m, nb * r)
        return a_s, b_flat, lam.to(device=device, dtype=dtype), gamma.to(device=device, dtype=dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """delta-W of ``adapter`` in the base weight's storage layout (PEFT's contract), via randlora-core."""
        device = self.randlora_B[adapter].device
        a_s, b_flat, lam, gamma = self._core_operands(adapter, device)
        delta = delta_weight(a_s, b_flat, lam, gamma, self.scaling[adapter], self.in_features <= self.out_features)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's forward semantics (disabled / merged / active adapters in order), core's adapter kernel."""
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            names = [n for n in self.active_adapters if n in self.randlora_lambda.keys()]
            fused = self._fused_forward(x, names) if names and not args and not kwargs else None
            if fused is not None:
                result = fused
            else:
                result = self.base_layer(x, *args, **kwargs)
                in_le_out = self.in_features <= self.out_features
                for name in names:
                    a_s, b_flat, lam, gamma = self._core_operands(name, x.device)
                    x_in = self.randlora_dropout[name](x.to(a_s.dtype))
                    result = result + adapter_output(x_in, a_s, b_flat, lam, gamma, self.scaling[name], in_le_out)
        return result.to(previous_dtype)

    def _fused_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
        """The layer output as one ``RandLoraLinearFunction`` node, or ``None`` where that does not apply."""
        base = self.get_base_layer()
        if not (type(base) is nn.Linear or type(base) is Conv1D) or base._forward_hooks or base._forward_pre_hooks:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        weight, bias = base.weight, base.bias
        if weight.requires_grad or weight.device != x.device:
            return None
        for name in names:
            dropout = self.randlora_dropout[name]
            if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
                return None  # the fused node feeds the adapters the base input
        groups: dict[tuple[Any, ...], list[str]] = {}
        operands: dict[str, tuple[torch.Tensor, ...]] = {}
        for name in names:
            ops = self._core_operands(name, x.device)
            a_full, b_full = self.randlora_A[name], self.randlora_B[name]
            key = (a_full.data_ptr(), b_full.data_ptr(), tuple(ops[0].shape), tuple(ops[1].shape), ops[0].dtype)
            groups.setdefault(key, []).append(name)
            operands[name] = ops
        dtypes = {key[-1] for key in groups}
        if len(dtypes) != 1:
            return None
        (dtype,) = dtypes
        if x.dtype != dtype or weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
            return None
        flat: list[torch.Tensor] = []
        scalings: list[tuple[float, ...]] = []
        ks: list[int] = []
        for members in groups.values():
            a_s, b_flat = operands[members[0]][:2]
            flat += [a_s, b_flat]
            for name in members:
                flat += list(operands[name][2:])
            scalings.append(tuple(float(self.scaling[n]) for n in members))
            ks.append(b_flat.shape[1])
        requested = current_override() or getattr(self, COMPUTE_ATTR, "auto")
        if requested in ("factored", "dense"):
            path = requested
        else:
            grad = torch.is_grad_enabled()
            need_x = grad and x.requires_grad
            need_params = grad and (any(t.requires_grad for t in flat) or (bias is not None and bias.requires_grad))
            tokens = x.numel() // self.in_features if self.in_features else 0
            path = choose_path(tokens, self.in_features, self.out_features, ks, dtype, x.device, need_x, need_params)
        plan = LayerPlan(
            in_le_out=self.in_features <= self.out_features,
            weight_in_out=bool(self.fan_in_fan_out),
            scalings=tuple(scalings),
            dense_forward=path != "factored",
            dense_backward=path == "dense",
        )
        return linear_forward(plan, x, weight, bias, flat)
