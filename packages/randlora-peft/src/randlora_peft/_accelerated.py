"""The accelerated PEFT RandLoRA layer class (imports PEFT; loaded lazily by :mod:`randlora_peft.accelerate`)."""

from __future__ import annotations

from typing import Any

import torch

from randlora_core.functional import adapter_output, delta_weight
from randlora_peft._peft import peft_randlora_linear
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

    Differences from PEFT's own code path, none of which changes a result PEFT computes correctly:
    the scaled basis is rebuilt in backward instead of being kept alive (randlora-core's
    ``RandLoraFunction``), and each adapter's windows are taken from its own rank and number of
    bases (``A[:r, 0, :m]``, ``B[:M, :nb, :r]``), so adapters of different ranks on one layer work.
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
            result = self.base_layer(x, *args, **kwargs)
            in_le_out = self.in_features <= self.out_features
            for name in self.active_adapters:
                if name not in self.randlora_lambda.keys():
                    continue
                a_s, b_flat, lam, gamma = self._core_operands(name, x.device)
                x_in = self.randlora_dropout[name](x.to(a_s.dtype))
                result = result + adapter_output(x_in, a_s, b_flat, lam, gamma, self.scaling[name], in_le_out)
        return result.to(previous_dtype)
