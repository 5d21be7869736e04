"""What a wrapper hands the layer engine for one call: the base layer and each active adapter.

:class:`~randlora_core.layer.RandLoraLinear` (and every wrapper built on it) and randlora-peft's
accelerated PEFT layers gather these from their own state; :func:`randlora_core.engine.layer_forward`
plans and evaluates the call from them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from torch import nn

from randlora_core.inference_cache import InferenceCache
from randlora_core.sparse import SparseWindow


@dataclass(frozen=True)
class AdapterCall:
    """One active adapter's operands for a call, in the call's compute dtype on the input's device.

    Attributes:
        a_s: the window ``A[:r, 0, :m]``, (r, m).
        b_flat: the window ``B[:M, :nb, :r]`` flattened to (M, nb*r).
        lam: lambda (r, nb).
        gamma: gamma (nb, m).
        scaling: ``alpha / r``.
        window: adapters with equal ``window`` read the same ``a_s`` / ``b_flat``.
        dropout: the adapter's dropout module (``None`` for none).
        key: identifies the adapter's current values (parameters and bases, with their version
            counters) for the inference cache; ``None`` keeps the call out of the cache.
        sparse: the window's compressed structure when the bases are ternary and sparse enough
            (:mod:`randlora_core.sparse`); offers the engine the ``sparse`` path.

    """

    a_s: torch.Tensor
    b_flat: torch.Tensor
    lam: torch.Tensor
    gamma: torch.Tensor
    scaling: float
    window: Hashable
    dropout: nn.Module | None = None
    key: Hashable | None = None
    sparse: SparseWindow | None = None

    @property
    def own_input(self) -> bool:
        """Whether active dropout gives this adapter an input of its own."""
        d = self.dropout
        return d is not None and d.training and not isinstance(d, nn.Identity) and getattr(d, "p", 1.0) > 0


@dataclass(frozen=True)
class BaseCall:
    """The frozen base layer of a call.

    Attributes:
        forward: computes the base layer's own output for the call's input (with its extra arguments).
        weight: the weight, when ``forward`` is exactly ``x @ W^T + bias`` (``x @ W + bias`` if
            ``weight_in_out``) and may be replaced by the fused node; else ``None``.
        bias: the bias of that expression (may train), or ``None``.
        weight_in_out: the weight is stored ``(I, O)`` (``fan_in_fan_out``).

    """

    forward: Callable[[], torch.Tensor]
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight_in_out: bool = False
    cache: InferenceCache | None = None
    """The model's inference cache, used for calls without gradients (:mod:`randlora_core.inference_cache`)."""
    owner: int = 0
    """The layer's identity in ``cache``."""


@dataclass(frozen=True)
class LayerInput:
    """One call of a wrapper: the input, the base layer's other arguments, and ``base(x)`` when already known.

    Mixed-adapter batches compute the base output once and hand it to every adapter's pass in ``base_out``.
    """

    x: torch.Tensor
    args: tuple[object, ...] = ()
    kwargs: dict[str, object] = field(default_factory=dict)
    base_out: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """Whether the base layer is called with ``x`` alone (so the engine may run its matmul itself)."""
        return not self.args and not self.kwargs
