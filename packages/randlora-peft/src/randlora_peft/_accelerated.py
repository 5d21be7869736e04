"""The accelerated PEFT RandLoRA layer class (imports PEFT; loaded lazily by :mod:`randlora_peft.accelerate`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from randlora_core.compute import Compute
from randlora_core.engine import layer_forward
from randlora_core.operands import AdapterCall, BaseCall
from randlora_core.plain import delta_weight
from randlora_core.registry import plain_linear_operands
from randlora_peft._peft import peft_randlora_linear
from randlora_spec.errors import ShapeError
from randlora_spec.geometry import LayerGeometry, shape_of_bases

COMPUTE_ATTR = "randlora_compute"
"""Instance attribute of an accelerated layer holding its compute preference."""

if TYPE_CHECKING:
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.randlora.layer import Linear as _PeftLinear
else:
    _PeftLinear = peft_randlora_linear()  # through import_peft, which keeps PEFT's import quiet
_HALF = (torch.float16, torch.bfloat16)


class AcceleratedRandLoraLinear(_PeftLinear):
    """PEFT's RandLoRA ``Linear`` with its adapter math on randlora-core's layer engine.

    Instances are never constructed: :func:`randlora_peft.accelerate` switches an existing PEFT
    layer's ``__class__`` to this subclass. It owns no state of its own; ``forward`` and
    ``get_delta_weight`` read the very same ``randlora_lambda`` / ``randlora_gamma`` parameters and
    ``randlora_A`` / ``randlora_B`` buffers PEFT created, so ``state_dict``, ``save_pretrained``,
    adapter management and the optimizer's view of the parameters are untouched. Everything else
    (``merge``, ``unmerge``, ``update_layer``, ``set_adapter``, ...) is PEFT's, calling back into the
    ``get_delta_weight`` below.

    ``forward`` gathers the operands (PEFT's base layer call, and per active adapter its windows of
    the bases, lambda, gamma, scaling and dropout) and hands them to
    :func:`randlora_core.engine.layer_forward`, which plans and evaluates the call exactly as for
    randlora-core's own layers (``accelerate(..., compute=...)`` or
    ``randlora_core.compute.compute_override`` choose the path).

    Differences from PEFT's own code path, none of which changes a result PEFT computes correctly
    (beyond float rounding): the scaled basis is rebuilt in backward instead of being kept alive;
    adapters sharing a basis window are summed before the matmuls; each adapter's windows are taken
    from its own rank and number of bases (``A[:r, 0, :m]``, ``B[:M, :nb, :r]``), so adapters of
    different ranks on one layer work.
    """

    randlora_compute: Compute = "auto"
    """The compute preference; :func:`randlora_peft.accelerate` sets it per instance (``COMPUTE_ATTR``)."""

    def _bases(self) -> tuple[BufferDict, BufferDict]:
        """PEFT's shared ``randlora_A`` / ``randlora_B`` dicts (PEFT sets them when it adds the layer's first adapter)."""
        a, b = self.randlora_A, self.randlora_B
        if a is None or b is None:
            raise ShapeError("this PEFT RandLoRA layer holds no bases: it has no adapter")
        return a, b

    def _compute_dtype(self, names: list[str], device: torch.device) -> torch.dtype:
        """PEFT's compute dtype: the promotion of the bases' and lambda's dtypes, float32 for half precision on CPU."""
        bases_b = self._bases()[1]
        dtype = torch.promote_types(bases_b[names[0]].dtype, self.randlora_lambda[names[0]].dtype)
        for name in names[1:]:
            dtype = torch.promote_types(dtype, torch.promote_types(bases_b[name].dtype, self.randlora_lambda[name].dtype))
        return torch.float32 if device.type == "cpu" and dtype in _HALF else dtype

    def adapter_call(self, adapter: str, dtype: torch.dtype, device: torch.device) -> AdapterCall:
        """The operands of ``adapter`` in ``dtype`` on ``device``, windows sliced from PEFT's buffers."""
        bases_a, bases_b = self._bases()
        a_full, b_full = bases_a[adapter], bases_b[adapter]
        lam, gamma = self.randlora_lambda[adapter], self.randlora_gamma[adapter]
        geom = LayerGeometry(self.in_features, self.out_features, int(lam.shape[0]))
        shape_of_bases(a_full.shape, b_full.shape).check_holds(geom, f"adapter {adapter!r}: bases")
        r, m, big_m, nb = geom.r, geom.m, geom.M, geom.nb
        return AdapterCall(
            a_s=a_full[:r, 0, :m].to(device=device, dtype=dtype),
            b_flat=b_full[:big_m, :nb, :r].to(device=device, dtype=dtype).reshape(big_m, nb * r),
            lam=lam.to(device=device, dtype=dtype),
            gamma=gamma.to(device=device, dtype=dtype),
            scaling=float(self.scaling[adapter]),
            window=(a_full.data_ptr(), b_full.data_ptr(), r, nb),
            dropout=self.randlora_dropout[adapter],
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """delta-W of ``adapter`` in the base weight's storage layout (PEFT's contract), via randlora-core."""
        device = self._bases()[1][adapter].device
        op = self.adapter_call(adapter, self._compute_dtype([adapter], device), device)
        delta = delta_weight(op.a_s, op.b_flat, op.lam, op.gamma, op.scaling, self.in_features <= self.out_features)
        return delta.T if self.fan_in_fan_out else delta

    # PEFT's signature: its Linear.forward already departs from nn.Linear.forward(input), so no override matches both.
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """PEFT's forward semantics (disabled / merged / active adapters in order), on randlora-core's engine."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        names = [] if self.disable_adapters or self.merged else [n for n in self.active_adapters if n in self.randlora_lambda]
        base = self.base_layer
        if not names:
            out: torch.Tensor = base(x, *args, **kwargs)
            return out.to(x.dtype)
        weight, bias = plain_linear_operands(base, bool(self.fan_in_fan_out)) if not args and not kwargs else (None, None)
        call = BaseCall(lambda: base(x, *args, **kwargs), weight, bias, bool(self.fan_in_fan_out))
        dtype = self._compute_dtype(names, x.device)
        adapters = [self.adapter_call(n, dtype, x.device) for n in names]
        return layer_forward(x, call, adapters, self.in_features, self.out_features, self.randlora_compute)
