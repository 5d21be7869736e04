"""PEFT's adapter status report: :func:`get_layer_status` and :func:`get_model_status`.

The dataclasses have PEFT's fields with PEFT's meaning (``peft.peft_model.TunerLayerStatus`` /
``TunerModelStatus``), so code that inspects a PEFT model's status reads ours the same way. Layers
are the RandLoRA layers and the ``modules_to_save`` wrappers; ``"irregular"`` marks a value that
differs between layers (a model in an inconsistent state). One difference: the model's
``active_adapters`` and ``merged_adapters`` are computed over the RandLoRA layers only. A
``modules_to_save`` wrapper runs one copy and merges nothing, so with several active adapters, or
any merged one, PEFT reports ``"irregular"`` for a model that is in a consistent state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from randlora_core.modules_to_save import ModulesToSaveWrapper
from randlora_spec.errors import AdapterNotFoundError

if TYPE_CHECKING:
    from randlora_core.model import RandLoraModel
    from randlora_core.registry import LayerModule

Irregular = Literal["irregular"]
IRREGULAR: Irregular = "irregular"


@dataclass
class TunerLayerStatus:
    """One adapter layer: its name (path in the base model), type, state, and per adapter ``requires_grad`` and devices."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The whole model: PEFT's summary of every layer's status (``"irregular"`` where layers disagree)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None


def _agree(values: Iterable[bool | Irregular]) -> bool | Irregular:
    """True if all are True, False if all are False, else ``"irregular"``."""
    seen = set(values)
    return seen.pop() if len(seen) == 1 and seen <= {True, False} else IRREGULAR


def _per_adapter(params: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, bool | Irregular], dict[str, list[str]]]:
    """``requires_grad`` agreement and sorted device types, per adapter name, of ``(adapter, parameter)`` pairs."""
    grads: dict[str, list[bool]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for name, param in params:
        grads[name].append(param.requires_grad)
        devices[name].add(param.device.type)
    return {k: _agree(v) for k, v in grads.items()}, {k: sorted(v) for k, v in devices.items()}


def _quantization_backend(layer: nn.Module) -> str | None:
    """``"bnb 8bit"`` / ``"bnb 4bit"`` for randlora-bnb layers (PEFT's names), else ``None``."""
    quant = getattr(layer, "quant_type", None)
    if not isinstance(quant, str):
        return None
    return "bnb 8bit" if quant == "int8" else "bnb 4bit"


def _layer_status(name: str, layer: LayerModule) -> TunerLayerStatus:
    params = [(n, p) for n in layer.randlora_lambda for p in (layer.randlora_lambda[n], layer.randlora_gamma[n])]
    params += list(getattr(layer, "randlora_magnitude", {}).items())
    requires_grad, devices = _per_adapter(params)
    return TunerLayerStatus(
        name=name,
        module_type=f"randlora.{type(layer).__name__}",
        enabled=not layer.disable_adapters,
        active_adapters=list(layer.active_adapters),
        merged_adapters=list(layer.merged_adapters),
        requires_grad=requires_grad,
        available_adapters=sorted(layer.randlora_lambda),
        devices=devices,
        quantization_backend=_quantization_backend(layer),
    )


def _saved_status(name: str, wrapper: ModulesToSaveWrapper) -> TunerLayerStatus:
    params = [(n, p) for n, module in wrapper.modules_to_save.items() for p in module.parameters()]
    requires_grad, devices = _per_adapter(params)
    return TunerLayerStatus(
        name=name,
        module_type=type(wrapper).__name__,
        enabled=not wrapper.disabled,
        active_adapters=[wrapper.active_adapter] if wrapper.active_adapter is not None else [],
        merged_adapters=[],
        requires_grad=requires_grad,
        available_adapters=sorted(wrapper.modules_to_save),
        devices=devices,
        quantization_backend=None,
    )


def get_layer_status(model: RandLoraModel) -> list[TunerLayerStatus]:
    """The status of every RandLoRA layer and ``modules_to_save`` wrapper of ``model``, in model order.

    Raises:
        AdapterNotFoundError: the model holds no adapter layer.

    """
    layers = dict(model.named_randlora_layers())
    saved = dict(model._modules_to_save())
    out = []
    for name, _ in model.model.named_modules():
        if name in layers:
            out.append(_layer_status(name, layers[name]))
        elif name in saved:
            out.append(_saved_status(name, saved[name]))
    if not out:
        raise AdapterNotFoundError("the model holds no adapter layers (add or load an adapter first)")
    return out


def _consistent_list(lists: Iterable[list[str]]) -> list[str] | Irregular:
    """The one list every layer reports, else ``"irregular"`` (``[]`` when there are none)."""
    seen = {tuple(v) for v in lists}
    if len(seen) > 1:
        return IRREGULAR
    return list(seen.pop()) if seen else []


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged somewhere; ``"irregular"`` if one of them is unmerged on a layer holding it."""
    merged = {n for status in layers for n in status.merged_adapters}
    for status in layers:
        if (set(status.available_adapters) - set(status.merged_adapters)) & merged:
            return IRREGULAR
    return sorted(merged)


def get_model_status(model: RandLoraModel) -> TunerModelStatus:
    """PEFT's model status summary for ``model`` (see :class:`TunerModelStatus`)."""
    layers = get_layer_status(model)
    trainable, total = model.trainable_parameters()
    grads: dict[str, list[bool | Irregular]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for status in layers:
        for name, value in status.requires_grad.items():
            grads[name].append(value)
        for name, types in status.devices.items():
            devices[name].update(types)
    backends = {status.quantization_backend for status in layers}
    adapted = [s for s in layers if s.module_type != ModulesToSaveWrapper.__name__]
    enabled = {status.enabled for status in layers}
    return TunerModelStatus(
        base_model_type=type(model.model).__name__,
        adapter_model_type=type(model).__name__,
        peft_types={name: "RANDLORA" for name in model.peft_config},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else IRREGULAR,
        active_adapters=_consistent_list(s.active_adapters for s in adapted),
        merged_adapters=_merged(adapted),
        requires_grad={name: _agree(values) for name, values in grads.items()},
        available_adapters=sorted({n for status in layers for n in status.available_adapters}),
        devices={name: sorted(types) for name, types in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else IRREGULAR,
    )
