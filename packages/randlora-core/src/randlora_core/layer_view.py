"""The hooks that see a RandLoRA layer's base weight as the ``(O, I)`` matrix of SPEC 3.10.

:class:`LinearView` gives them for linear layers (``nn.Linear``, Conv1D-like ``(in, out)``
storage); the other layer kinds (:mod:`randlora_core.conv`, :mod:`randlora_core.embedding`)
override them. The adapter math (:mod:`randlora_core.dora` included) reads and writes the weight
only through these hooks, so it is the same for every kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from randlora_spec.errors import DtypeError, ShapeError
from randlora_spec.layer_kinds import LayerRecord


class LinearView:
    """The ``(O, I)`` view hooks of a linear RandLoRA layer (mixed into :class:`~randlora_core.layer.RandLoraLinear`).

    Relies on the layer's ``_dense_weight``, ``get_base_layer``, ``fan_in_fan_out``,
    ``in_features``, ``out_features`` and ``layer_name``.
    """

    fan_in_fan_out: bool
    in_features: int
    out_features: int
    layer_name: str

    if TYPE_CHECKING:  # the layer's own methods, declared for the type checker

        def _dense_weight(self) -> torch.Tensor: ...

        def _base_weight(self) -> torch.Tensor: ...

    def _weight_view(self) -> torch.Tensor:
        """The base weight seen as ``(O, I)`` (a view of the dense weight, not a copy)."""
        weight = self._dense_weight()
        return weight.T if self.fan_in_fan_out else weight

    def _view_to_storage(self, view: torch.Tensor) -> torch.Tensor:
        """An ``(O, I)`` matrix in the weight's storage layout."""
        return view.T if self.fan_in_fan_out else view

    def _set_weight_view(self, view: torch.Tensor) -> None:
        """Overwrite the base weight with ``view`` (``(O, I)``), cast to the weight's dtype (DoRA merges)."""
        weight = self._base_weight()
        with torch.no_grad():  # in place on the parameter, so its version counter (caches) sees the change
            weight.copy_(self._view_to_storage(view).to(device=weight.device, dtype=weight.dtype))

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's map with ``weight`` (storage layout) in place of its own: ``x @ W^T (+ bias)``."""
        if self.fan_in_fan_out:
            return x @ weight + bias if bias is not None else x @ weight
        return nn.functional.linear(x, weight, bias)

    def _check_input(self, x: torch.Tensor) -> None:
        """Refuse an input the layer cannot take: not floating point, or a last axis other than in_features."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise DtypeError(f"layer {self.layer_name!r} needs a floating-point input tensor, got {got}")
        if x.shape[-1] != self.in_features:
            raise ShapeError(
                f"layer {self.layer_name!r} expects inputs whose last dimension is in_features={self.in_features}, "
                f"got {x.shape[-1]} (input shape {tuple(x.shape)})"
            )

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The output in its final dtype: the input's (SPEC 5.3)."""
        return y.to(x.dtype)

    def layer_record(self) -> LayerRecord:
        """What a checkpoint records about this layer (SPEC 6.2)."""
        return LayerRecord(self.in_features, self.out_features, bool(self.fan_in_fan_out))
