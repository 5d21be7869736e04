"""Save and load one adapter in checkpoint format v1 (SPEC.md section 6), via :mod:`randlora_spec.checkpoint`.

A file holds lambda/gamma of every adapted layer in their parameter dtype (bfloat16 as ``BF16``),
the shared bases once when ``save_projection`` is set (the adapter's own window of the model's
allocation), trainable biases and ``modules_to_save`` copies. Loading validates the whole file
(the spec's checks) and that the model has every recorded layer with the recorded sizes and
layout, every bias and every saved parameter, before it changes anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from randlora_core.bases import covers, generate_bases
from randlora_core.model import RandLoraModel, _layout, is_randlora_layer
from randlora_core.modules_to_save import ModulesToSaveWrapper
from randlora_core.registry import load_plugins, wrapper_for
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape, bases_shape_for_layers, basis_kind, num_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import AdapterNotFoundError, CheckpointError, ConfigError

_NUMPY_FOR = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """``(array, is_bf16)``: the tensor's values in a dtype that stores them exactly."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy(), True
    if t.dtype in _NUMPY_FOR:
        return t.numpy().copy(), False
    return t.to(torch.float32).numpy(), False


def build_checkpoint(model: RandLoraModel, adapter_name: str | None = None) -> spec_ckpt.AdapterCheckpoint:
    """The :class:`~randlora_spec.checkpoint.AdapterCheckpoint` for one adapter of ``model``."""
    if adapter_name is None:
        if not model.active_adapters:
            raise AdapterNotFoundError("no active adapter to save; pass adapter_name")
        adapter_name = model.active_adapters[0]
    if adapter_name not in model.peft_config:
        raise AdapterNotFoundError(f"adapter {adapter_name!r} not found; the model has {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    layers, tensors, bf16 = {}, {}, set()
    for path, layer in model.named_randlora_layers():
        if adapter_name not in layer.randlora_lambda:
            continue
        layers[path] = spec_ckpt.LayerRecord(layer.in_features, layer.out_features, bool(layer.fan_in_fan_out))
        for suffix, param in (
            (spec_ckpt.LAMBDA_SUFFIX, layer.randlora_lambda[adapter_name]),
            (spec_ckpt.GAMMA_SUFFIX, layer.randlora_gamma[adapter_name]),
        ):
            tensors[path + suffix], is_bf16 = _to_numpy(param)
            if is_bf16:
                bf16.add(path + suffix)
    if not layers:
        raise CheckpointError(f"adapter {adapter_name!r} has no layers in the model (were they unloaded?)")
    biases = model._bias_params(adapter_name)
    for path, bias in biases.items():
        tensors[path + ".bias"], is_bf16 = _to_numpy(bias)
        if is_bf16:
            bf16.add(path + ".bias")
    saved: dict[str, list[str]] = {}
    for path in model._saved[adapter_name]:
        wrapper = model.model.get_submodule(path)
        assert isinstance(wrapper, ModulesToSaveWrapper)
        saved[path] = []
        for name, param in wrapper.modules_to_save[adapter_name].named_parameters():
            tensors[f"{path}.{name}"], is_bf16 = _to_numpy(param)
            saved[path].append(name)
            if is_bf16:
                bf16.add(f"{path}.{name}")
    bases_module = model.randlora_bases
    assert bases_module is not None
    shape = _bases_shape(config, list(layers.values()), bases_module.shape)
    bases = None
    if config.save_projection:
        a = bases_module.randlora_A[: shape.r, :, : shape.m_max].detach().cpu().numpy().copy()
        b = bases_module.randlora_B[: shape.M_max, : shape.nb_max, : shape.r].detach().cpu().numpy().copy()
        bases = (a, b)
    return spec_ckpt.AdapterCheckpoint(
        config=config,
        adapter_name=adapter_name,
        layers=layers,
        bases_shape=shape,
        tensors=tensors,
        bases=bases,
        biases=sorted(biases),
        modules_to_save=saved,
        bf16_keys=frozenset(bf16),
    )


def _bases_shape(config: RandLoraConfig, records: list[spec_ckpt.LayerRecord], have: BasesShape) -> BasesShape:
    """The allocation recorded for an adapter: its own (SPEC 3.1) when the model's bases hold it.

    very_sparse values depend on m_max, so the model's m_max is recorded (regeneration then
    reproduces them). Bases injected with a tighter allocation than the formula's fall back to the
    tightest allocation that holds every window.
    """
    r = config.r
    if config.very_sparse:
        big_m = max(have.m_max, *(rec.M for rec in records))
        return BasesShape(r=r, m_max=have.m_max, M_max=big_m, nb_max=num_bases(have.m_max, r))
    shape = bases_shape_for_layers([(rec.in_features, rec.out_features) for rec in records], r)
    if covers(have, shape):
        return shape
    m_max = max(rec.m for rec in records)
    return BasesShape(r=r, m_max=m_max, M_max=max(rec.M for rec in records), nb_max=num_bases(m_max, r))


def save_adapter(model: RandLoraModel, path: str | Path, adapter_name: str | None = None) -> None:
    """Write one adapter of ``model`` (default: the first active one) to ``path`` atomically."""
    spec_ckpt.save(path, build_checkpoint(model, adapter_name))


def _base_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module.get_base_layer() if is_randlora_layer(module) else module


def _check_fits(model: nn.Module, ckpt: spec_ckpt.AdapterCheckpoint, source: str) -> None:
    """Every recorded layer, bias and saved parameter exists in ``model`` with the recorded shape."""
    for path, rec in ckpt.layers.items():
        module = _base_module(model, path)
        if module is None:
            raise CheckpointError(f"{source}: the model has no module {path!r} recorded in the checkpoint")
        top = model.get_submodule(path)
        wrapper_cls = type(top) if is_randlora_layer(top) else wrapper_for(module)
        if wrapper_cls is None:
            raise CheckpointError(f"{source}: module {path!r} ({type(module).__name__}) cannot be adapted by RandLoRA")
        layer = top if is_randlora_layer(top) else wrapper_cls(module, rec.fan_in_fan_out)
        layout = layer.fan_in_fan_out if is_randlora_layer(top) else _layout(module)
        if (layer.in_features, layer.out_features) != (rec.in_features, rec.out_features):
            raise CheckpointError(
                f"{source}: layer {path!r} is {layer.in_features}x{layer.out_features} (in x out) in the model, "
                f"but {rec.in_features}x{rec.out_features} in the checkpoint"
            )
        if layout is not None and layout != rec.fan_in_fan_out:
            raise CheckpointError(
                f"{source}: layer {path!r} stores its weight with fan_in_fan_out={layout}, "
                f"the checkpoint says {rec.fan_in_fan_out}"
            )
    for path in ckpt.biases:
        module = _base_module(model, path)
        bias = module._parameters.get("bias") if module is not None else None
        want = ckpt.tensors[path + ".bias"].shape
        if bias is None or tuple(bias.shape) != want:
            got = "no bias" if bias is None else f"bias of shape {tuple(bias.shape)}"
            raise CheckpointError(f"{source}: module {path!r} has {got}; the checkpoint stores a bias of shape {want}")
    for path, names in ckpt.modules_to_save.items():
        module = _base_module(model, path)
        if module is None:
            raise CheckpointError(f"{source}: the model has no module {path!r} (modules_to_save)")
        params = dict(module.named_parameters())
        for name in names:
            want = ckpt.tensors[f"{path}.{name}"].shape
            if name not in params or tuple(params[name].shape) != want:
                raise CheckpointError(f"{source}: module {path!r} has no parameter {name!r} of shape {want} (modules_to_save)")


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> RandLoraModel:
    """Load the adapter stored at ``path`` into ``model`` and return the :class:`RandLoraModel`.

    ``model`` is a plain module (a new RandLoraModel is built around it, the adapter active) or a
    RandLoraModel (the adapter is added, not activated, as PEFT's ``load_adapter``). The file and its
    fit to the model are fully validated first; on any error the model is unchanged.

    Raises:
        CheckpointError: malformed file, or it does not fit the model.
        BasisRuleError: bases absent and their rule cannot be regenerated.

    """
    load_plugins()
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    ckpt = spec_ckpt.from_bytes(p.read_bytes(), source)
    target = model.model if isinstance(model, RandLoraModel) else model
    _check_fits(target, ckpt, source)
    if ckpt.bases is not None:
        stored = (torch.from_numpy(np.ascontiguousarray(ckpt.bases[0], np.float32)),)
        stored += (torch.from_numpy(np.ascontiguousarray(ckpt.bases[1], np.float32)),)
    else:  # from_bytes has checked that the rule is the portable one; torch regenerates it much faster
        cfg = ckpt.config
        stored = generate_bases(cfg.projection_prng_key, ckpt.bases_shape, basis_kind(cfg.sparse, cfg.very_sparse))
    wrapped = model if isinstance(model, RandLoraModel) else RandLoraModel(model)  # no adapter yet: unchanged
    try:
        saved = wrapped._resolve_saved(ckpt.config)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    unsaved = sorted(set(ckpt.modules_to_save) - set(saved))
    if unsaved:
        raise CheckpointError(f"{source}: modules_to_save tensors for {unsaved} do not match the config's modules_to_save")
    layer_paths = sorted(ckpt.layers)
    wrapped._add_adapter(adapter_name, ckpt.config, paths=layer_paths, stored_bases=stored, warn=False)  # type: ignore[arg-type]
    with torch.no_grad():
        for lpath in layer_paths:
            layer = wrapped.model.get_submodule(lpath)
            for param, values in (
                (layer.randlora_lambda[adapter_name], ckpt.lam(lpath)),
                (layer.randlora_gamma[adapter_name], ckpt.gamma(lpath)),
            ):
                param.copy_(torch.from_numpy(np.ascontiguousarray(values)))
        for bpath in ckpt.biases:
            module = _base_module(wrapped.model, bpath)
            assert module is not None
            module._parameters["bias"].copy_(torch.from_numpy(np.ascontiguousarray(ckpt.tensors[bpath + ".bias"])))
        for mpath, names in ckpt.modules_to_save.items():
            copy = wrapped.model.get_submodule(mpath).modules_to_save[adapter_name]
            params = dict(copy.named_parameters())
            for name in names:
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(ckpt.tensors[f"{mpath}.{name}"])))
    return wrapped
