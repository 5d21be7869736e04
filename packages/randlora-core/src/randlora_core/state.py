"""The in-memory checkpoint seam: a model's adapter <-> :class:`~randlora_spec.checkpoint.AdapterCheckpoint`.

:func:`build_checkpoint` reads one adapter out of a model; :func:`apply_checkpoint_to` adds one to
a :class:`~randlora_core.model.RandLoraModel`. Neither touches a file: saving and loading
(:mod:`randlora_core.checkpoint`), randlora-peft's PEFT bridge and the CLI all go through here,
so every path gets the same validation, done completely before the model changes.

A checkpoint holds lambda/gamma (and a DoRA adapter's magnitudes) of every adapted layer in their
parameter dtype (bfloat16 as ``BF16``) with each layer's kind (SPEC 6.2), the shared bases once when
``save_projection`` is set (the adapter's own window of the model's allocation), trainable biases
and ``modules_to_save`` copies. randlora-core computes every layer kind and DoRA
(:data:`FEATURES`), so it reads and writes all of them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from randlora_core.bases import generate_bases
from randlora_core.conv import conv_features
from randlora_core.modules_to_save import ModulesToSaveWrapper
from randlora_core.planning import adaptable, check_path, plan_adapter, resolve_saved
from randlora_core.registry import build_wrapper, is_randlora_layer, layout_of, linear_features, load_plugins, wrapper_for
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import basis_kind
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import AdapterNotFoundError, CheckpointError, ConfigError
from randlora_spec.geometry import RANK_CEILING, BasesShape, bases_shape_for_layers, num_bases, rank_is_bounded
from randlora_spec.layer_kinds import ALL_FEATURES

if TYPE_CHECKING:
    from randlora_core.model import RandLoraModel
    from randlora_core.registry import RandLoraLayer

FEATURES = ALL_FEATURES
"""The layer kinds and variants randlora-core computes: every one the spec defines."""

_NUMPY_FOR = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a sharded ``DTensor`` (FSDP2, tensor parallel) the gathered full tensor.

    Gathering is a collective: with sharded parameters every rank must build the checkpoint.
    """
    # A DTensor can only exist once its module is imported; importing it ourselves costs ~0.8 s on
    # the first save of every process that never uses it.
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """``(array, is_bf16)``: the tensor's values in a dtype that stores them exactly (DTensors gathered first)."""
    t = _full_tensor(t.detach()).cpu()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy(), True
    if t.dtype in _NUMPY_FOR:
        return t.numpy().copy(), False
    return t.to(torch.float32).numpy(), False


class _Tensors:
    """Collects a checkpoint's tensors and remembers which were bfloat16."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.bf16: set[str] = set()

    def add(self, key: str, t: torch.Tensor) -> None:
        self.arrays[key], is_bf16 = _to_numpy(t)
        if is_bf16:
            self.bf16.add(key)


def _collect_layers(model: RandLoraModel, adapter_name: str, tensors: _Tensors) -> dict[str, spec_ckpt.LayerRecord]:
    """Each adapted layer's record, its lambda and gamma added to ``tensors``."""
    layers = {}
    for path, layer in model.named_randlora_layers():
        if adapter_name not in layer.randlora_lambda:
            continue
        if layer.randlora_lambda[adapter_name].is_meta:
            raise CheckpointError(
                f"adapter {adapter_name!r} has no weights to save: it was created with low_cpu_mem_usage=True and "
                "never loaded (its lambda/gamma are on the meta device)"
            )
        record = getattr(layer, "layer_record", None)
        layers[path] = (
            record()
            if record is not None
            else spec_ckpt.LayerRecord(layer.in_features, layer.out_features, bool(layer.fan_in_fan_out))
        )
        tensors.add(path + spec_ckpt.LAMBDA_SUFFIX, layer.randlora_lambda[adapter_name])
        tensors.add(path + spec_ckpt.GAMMA_SUFFIX, layer.randlora_gamma[adapter_name])
        if adapter_name in getattr(layer, "randlora_magnitude", {}):
            tensors.add(path + spec_ckpt.MAGNITUDE_SUFFIX, layer.randlora_magnitude[adapter_name])
    if not layers:
        raise CheckpointError(f"adapter {adapter_name!r} has no layers in the model (were they unloaded?)")
    return layers


def _collect_saved(model: RandLoraModel, adapter_name: str, tensors: _Tensors) -> dict[str, list[str]]:
    """Parameter names of each ``modules_to_save`` copy, the parameters added to ``tensors``."""
    saved: dict[str, list[str]] = {}
    for path in model._saved[adapter_name]:
        wrapper = model.model.get_submodule(path)
        assert isinstance(wrapper, ModulesToSaveWrapper)
        saved[path] = []
        for name, param in wrapper.modules_to_save[adapter_name].named_parameters():
            tensors.add(f"{path}.{name}", param)
            saved[path].append(name)
    return saved


def build_checkpoint(model: RandLoraModel, adapter_name: str | None = None) -> spec_ckpt.AdapterCheckpoint:
    """The :class:`~randlora_spec.checkpoint.AdapterCheckpoint` for one adapter (default: the first active one).

    Parameters sharded as ``DTensor`` (``torch.distributed.fsdp.fully_shard``) are gathered to full
    tensors; that is a collective, so with a sharded model call this on every rank (and write the
    file on one, e.g. ``randlora_spec.checkpoint.save(path, ckpt)`` on rank 0).
    """
    if adapter_name is None:
        if not model.active_adapters:
            raise AdapterNotFoundError("no active adapter to save; pass adapter_name")
        adapter_name = model.active_adapters[0]
    if adapter_name not in model.peft_config:
        raise AdapterNotFoundError(f"adapter {adapter_name!r} not found; the model has {list(model.peft_config)}")
    config = model.peft_config[adapter_name]
    tensors = _Tensors()
    layers = _collect_layers(model, adapter_name, tensors)
    biases = model._bias_params(adapter_name)
    for path, bias in biases.items():
        tensors.add(path + ".bias", bias)
    saved = _collect_saved(model, adapter_name, tensors)
    bases_module = model.randlora_bases
    assert bases_module is not None
    shape = _recorded_shape(config, list(layers.values()), bases_module.shape)
    bases = None
    if spec_ckpt.stores_bases(config, bases_module.regenerable):
        a = bases_module.randlora_A[: shape.r, :, : shape.m_max].detach().cpu().numpy().copy()
        b = bases_module.randlora_B[: shape.M_max, : shape.nb_max, : shape.r].detach().cpu().numpy().copy()
        bases = (a, b)
    return spec_ckpt.AdapterCheckpoint(
        config=config,
        adapter_name=adapter_name,
        layers=layers,
        bases_shape=shape,
        tensors=tensors.arrays,
        bases=bases,
        biases=sorted(biases),
        modules_to_save=saved,
        bf16_keys=frozenset(tensors.bf16),
    )


def _recorded_shape(config: RandLoraConfig, records: list[spec_ckpt.LayerRecord], have: BasesShape) -> BasesShape:
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
    if have.covers(shape):
        return shape
    m_max = max(rec.m for rec in records)
    return BasesShape(r=r, m_max=m_max, M_max=max(rec.M for rec in records), nb_max=num_bases(m_max, r))


def base_module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` seen through RandLoRA and ``modules_to_save`` wrappers, or ``None``."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(module, ModulesToSaveWrapper):
        return module.original_module
    return module.get_base_layer() if is_randlora_layer(module) else module


def _check_path(root: nn.Module, path: str, source: str) -> None:
    wrapper = check_path(root, path)
    if wrapper is not None:
        raise CheckpointError(
            f"{source}: path {path!r} lies inside the RandLoRA wrapper {wrapper!r}; checkpoints name modules by their "
            "path in the base model"
        )


def _check_layer(root: nn.Module, path: str, rec: spec_ckpt.LayerRecord, source: str) -> None:
    _check_path(root, path, source)
    module = base_module(root, path)
    if module is None:
        raise CheckpointError(f"{source}: the model has no module {path!r} recorded in the checkpoint")
    top = root.get_submodule(path)
    layer: RandLoraLayer
    layout: bool | None
    if is_randlora_layer(top):
        layer, layout = top, top.fan_in_fan_out
    else:
        wrapper_cls = wrapper_for(module)
        if wrapper_cls is None:
            raise CheckpointError(f"{source}: module {path!r} ({type(module).__name__}) cannot be adapted by RandLoRA")
        layer, layout = build_wrapper(wrapper_cls, module, rec.fan_in_fan_out), layout_of(module)
    _check_kind(layer, path, rec, source)
    if (layer.in_features, layer.out_features) != (rec.in_features, rec.out_features):
        raise CheckpointError(
            f"{source}: layer {path!r} is {layer.in_features}x{layer.out_features} (in x out) in the model, "
            f"but {rec.in_features}x{rec.out_features} in the checkpoint"
        )
    if layout is not None and layout != rec.fan_in_fan_out:
        raise CheckpointError(
            f"{source}: layer {path!r} stores its weight with fan_in_fan_out={layout}, the checkpoint says {rec.fan_in_fan_out}"
        )


def _check_kind(layer: RandLoraLayer, path: str, rec: spec_ckpt.LayerRecord, source: str) -> None:
    """The model's layer is of the recorded kind (SPEC 3.10), with the recorded kernel size and groups."""
    record = getattr(layer, "layer_record", None)
    have = record() if record is not None else spec_ckpt.LayerRecord(layer.in_features, layer.out_features)
    if have.kind != rec.kind:
        raise CheckpointError(
            f"{source}: layer {path!r} is a {have.kind} layer in the model, but a {rec.kind} layer in the checkpoint"
        )
    if (have.kernel_size, have.groups) != (rec.kernel_size, rec.groups):
        raise CheckpointError(
            f"{source}: layer {path!r} has kernel_size {list(have.kernel_size)} and groups {have.groups} in the model, "
            f"but kernel_size {list(rec.kernel_size)} and groups {rec.groups} in the checkpoint"
        )


def _check_saved(root: nn.Module, path: str, names: list[str], header: spec_ckpt.CheckpointHeader, source: str) -> None:
    _check_path(root, path, source)
    module = base_module(root, path)
    if module is None:
        raise CheckpointError(f"{source}: the model has no module {path!r} (modules_to_save)")
    params = dict(module.named_parameters())
    for name in names:
        want = header.tensors[f"{path}.{name}"].shape
        if name not in params or tuple(params[name].shape) != want:
            raise CheckpointError(f"{source}: module {path!r} has no parameter {name!r} of shape {want} (modules_to_save)")


def check_fits(root: nn.Module, header: spec_ckpt.CheckpointHeader, source: str) -> None:
    """Every recorded layer, bias and saved parameter exists in ``root`` with the recorded shape and layout.

    Needs only the checkpoint's validated header, so a file is checked against the model before
    any of its tensor data is read.
    """
    for path, rec in header.layers.items():
        _check_layer(root, path, rec, source)
    for path in header.biases:
        _check_path(root, path, source)
        module = base_module(root, path)
        bias = module._parameters.get("bias") if module is not None else None
        want = header.tensors[path + ".bias"].shape
        if bias is None or tuple(bias.shape) != want:
            got = "no bias" if bias is None else f"bias of shape {tuple(bias.shape)}"
            raise CheckpointError(f"{source}: module {path!r} has {got}; the checkpoint stores a bias of shape {want}")
    for path, names in header.modules_to_save.items():
        _check_saved(root, path, names, header, source)
    _check_sizes(root, header, source)


def _largest_side(root: nn.Module) -> int:
    """The largest in/out size of any module RandLoRA could adapt in ``root`` (0 if none)."""
    sides = [0]
    for _, module in root.named_modules():
        features = _sides(module) if adaptable(module) else None
        if features is not None:
            sides.append(max(features))
    return max(sides)


def _sides(module: nn.Module) -> tuple[int, int] | None:
    """``(I, O)`` of a module of any built-in kind (SPEC 3.10), else ``None``."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return linear_features(module) or conv_features(module)


def _check_sizes(root: nn.Module, header: spec_ckpt.CheckpointHeader, source: str) -> None:
    """A checkpoint may not ask for more bases than adapting its (existing) layers of ``root`` would allocate.

    Stored bases cost what the file holds; absent ones are regenerated, so their recorded
    allocation is bounded by the recorded layers' own (SPEC 3.1), and for very_sparse, whose
    m_max may be the saving model's, by the largest layer of this model.
    """
    r, shape = header.config.r, header.bases_shape
    own = bases_shape_for_layers([(rec.in_features, rec.out_features) for rec in header.layers.values()], r)
    if not rank_is_bounded(r, own.M_max):
        raise CheckpointError(
            f"{source}: r={r} is larger than every adapted layer's larger side (at most {own.M_max}) and than {RANK_CEILING}"
        )
    if header.bases_stored:
        return
    if header.config.very_sparse:
        fits = shape.m_max <= max(own.M_max, _largest_side(root)) and shape.M_max <= max(shape.m_max, own.M_max)
    else:
        fits = own.covers(shape)
    if not fits:
        raise CheckpointError(
            f"{source}: bases_shape {shape} is larger than the allocation its layers need ({own}); regenerating it "
            f"would cost {shape.elements} values"
        )


def checkpoint_bases(ckpt: spec_ckpt.AdapterCheckpoint) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's bases as float32 tensors: the stored ones, or regenerated by the portable rule."""
    if ckpt.bases is not None:
        a, b = ckpt.bases
        return torch.from_numpy(np.ascontiguousarray(a, np.float32)), torch.from_numpy(np.ascontiguousarray(b, np.float32))
    # The spec's validation has refused absent bases under any other rule; torch generates much faster than numpy.
    cfg = ckpt.config
    return generate_bases(cfg.projection_prng_key, ckpt.bases_shape, basis_kind(cfg.sparse, cfg.very_sparse))


def apply_checkpoint_to(
    model: RandLoraModel,
    ckpt: spec_ckpt.AdapterCheckpoint,
    adapter_name: str = "default",
    source: str = "<checkpoint>",
    *,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> None:
    """Add the adapter ``ckpt`` holds to ``model`` as ``adapter_name`` (not activated unless it is the first).

    ``ckpt`` and its fit to the model are validated completely first; on any error the model is
    unchanged. ``autocast_adapter_dtype``: float32 lambda/gamma on float16/bfloat16 layers;
    ``low_cpu_mem_usage``: the new lambda/gamma are the checkpoint's values, never initialised first.
    """
    load_plugins()
    check_fits(model.model, spec_ckpt.validate(ckpt, source=source, supported_features=FEATURES), source)
    try:
        saved = resolve_saved(model.model, ckpt.config)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    unsaved = sorted(set(ckpt.modules_to_save) - set(saved))
    if unsaved:
        raise CheckpointError(f"{source}: modules_to_save tensors for {unsaved} do not match the config's modules_to_save")
    layer_paths = sorted(ckpt.layers)
    options = {"autocast_adapter_dtype": autocast_adapter_dtype, "low_cpu_mem_usage": low_cpu_mem_usage}
    plan = plan_adapter(model, adapter_name, ckpt.config, layer_paths, checkpoint_bases(ckpt), warn=False, **options)
    wrappers = {path: layer for path, layer, _ in plan.layers}
    values = values_for(model.model, wrappers, ckpt, source, adapter_name, autocast_adapter_dtype)
    model._commit(plan)
    write_values(model.model, adapter_name, values)


Slot = tuple[str, str, str]
"""``(kind, module path, name)``: kind ``layer`` (name ``randlora_lambda``/``randlora_gamma``), ``bias`` or ``saved``."""


def _lambda_like(layer: RandLoraLayer, adapter_name: str, autocast_adapter_dtype: bool) -> tuple[torch.dtype, torch.device]:
    """``(dtype, device)`` of the layer's lambda/gamma for ``adapter_name``: the existing ones', or those a new adapter gets."""
    lam = layer.randlora_lambda[adapter_name] if adapter_name in layer.randlora_lambda else None
    if lam is None or lam.is_meta:
        dtype = lam.dtype if lam is not None else layer.adapter_dtype(autocast_adapter_dtype)
        return dtype, layer._param_device()
    return lam.dtype, lam.device


def values_for(
    root: nn.Module,
    wrappers: Mapping[str, RandLoraLayer],
    ckpt: spec_ckpt.AdapterCheckpoint,
    source: str,
    adapter_name: str = "",
    autocast_adapter_dtype: bool = True,
) -> dict[Slot, torch.Tensor]:
    """Every value the checkpoint sets, already in its parameter's dtype and device and checked finite there.

    ``wrappers`` are the RandLoRA layers (by path) that receive lambda/gamma: those of an existing
    ``adapter_name`` keep their dtype, a new adapter's follow ``autocast_adapter_dtype``. A value
    finite on disk can overflow in a narrower parameter dtype (float64 1e300 into float32); that
    is found before the model changes.
    """
    values: dict[Slot, torch.Tensor] = {}

    def put(slot: Slot, array: np.ndarray, like: tuple[torch.dtype, torch.device]) -> None:
        value = torch.from_numpy(np.ascontiguousarray(array)).to(device=like[1], dtype=like[0])
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: {slot[1]}.{slot[2]} overflows to Inf in the model's dtype {like[0]}")
        values[slot] = value

    for path in sorted(ckpt.layers):
        like = _lambda_like(wrappers[path], adapter_name, autocast_adapter_dtype)
        put(("layer", path, "randlora_lambda"), ckpt.lam(path), like)
        put(("layer", path, "randlora_gamma"), ckpt.gamma(path), like)
        magnitude = ckpt.magnitude(path)
        if magnitude is not None:
            put(("layer", path, "randlora_magnitude"), magnitude, like)
    for path in ckpt.biases:
        bias = _base_param(root, path, "bias")
        put(("bias", path, "bias"), ckpt.tensors[path + ".bias"], (bias.dtype, bias.device))
    for path, names in ckpt.modules_to_save.items():
        for name in names:
            param = _base_param(root, path, name)
            put(("saved", path, name), ckpt.tensors[f"{path}.{name}"], (param.dtype, param.device))
    return values


def _base_param(root: nn.Module, path: str, name: str) -> torch.Tensor:
    module = base_module(root, path)
    assert module is not None
    return dict(module.named_parameters())[name]


def write_values(root: nn.Module, adapter_name: str, values: dict[Slot, torch.Tensor]) -> None:
    """Copy prepared :func:`values_for` into the adapter's parameters, in place (the parameters stay the same objects).

    Empty lambda/gamma (meta device, ``low_cpu_mem_usage``) cannot hold values: they are replaced
    by new parameters with the same ``requires_grad``.
    """
    with torch.no_grad():
        for slot, value in values.items():
            target = _destination(root, adapter_name, slot)
            if target.is_meta:
                container = getattr(root.get_submodule(slot[1]), slot[2])
                container[adapter_name] = nn.Parameter(value, requires_grad=target.requires_grad)
            else:
                target.copy_(value)


def _destination(root: nn.Module, adapter_name: str, slot: Slot) -> torch.Tensor:
    """The parameter a checkpoint value goes to, once the adapter is committed."""
    kind, path, name = slot
    if kind == "layer":
        return root.get_parameter(f"{path}.{name}.{adapter_name}")
    if kind == "bias":
        return _base_param(root, path, "bias")
    return root.get_parameter(f"{path}.modules_to_save.{adapter_name}.{name}")
