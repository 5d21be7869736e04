"""Saving and loading adapters in checkpoint format v1 (SPEC.md section 6), via ``randlora_spec.checkpoint``.

The file format, its validation (SPEC 6.3) and the atomic write (6.4) are the spec package's; this
module maps between a :class:`~randlora_jax.model.RandLoraModel` and an ``AdapterCheckpoint``:
module paths are dotted NNX paths, lambda/gamma are layout-free, so a file written here loads in
randlora-core and the reverse (SPEC 6.2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from randlora_jax import base_layers, targeting
from randlora_jax.arrays import to_device, to_host
from randlora_jax.bases import generate_bases
from randlora_jax.layer import RandLoraLinear
from randlora_jax.model import RandLoraModel, _opaque, check_adapter_name
from randlora_jax.modules_to_save import ModulesToSaveWrapper, parameters
from randlora_jax.shared import BasesIdentity, RandLoraBases
from randlora_jax.state import build_checkpoint
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PORTABLE_RULE
from randlora_spec.errors import CheckpointError, ConfigError


def save_adapter(model: RandLoraModel, path: str | Path, adapter_name: str | None = None) -> None:
    """Write one adapter of ``model`` to ``path`` atomically (SPEC 6.4), bases stored iff ``save_projection``."""
    spec_ckpt.save(path, build_checkpoint(model, adapter_name))


def _check_fits(root: nnx.Module, ckpt: spec_ckpt.AdapterCheckpoint, source: str) -> None:
    """Every recorded layer, bias and saved parameter exists in ``root`` with the recorded shape."""
    found = {n: m for n, _, m in targeting.modules(root, _opaque)}
    for path, rec in ckpt.layers.items():
        module = found.get(path)
        inner = module.base_layer if isinstance(module, RandLoraLinear) else module
        view = base_layers.describe(inner) if inner is not None else None
        if module is None:
            raise CheckpointError(f"{source}: the model has no module {path!r} recorded in the checkpoint")
        if view is None:
            raise CheckpointError(f"{source}: module {path!r} ({type(module).__name__}) cannot be adapted by RandLoRA")
        if (view.in_features, view.out_features) != (rec.in_features, rec.out_features):
            raise CheckpointError(
                f"{source}: layer {path!r} is {view.in_features}x{view.out_features} (in x out) in the model, "
                f"but {rec.in_features}x{rec.out_features} in the checkpoint"
            )
    for path in ckpt.biases:
        module = found.get(path)
        inner = module.base_layer if isinstance(module, RandLoraLinear) else module
        bias = getattr(inner, "bias", None)
        want = ckpt.tensors[f"{path}.bias"].shape
        if not isinstance(bias, nnx.Param) or tuple(bias.get_value().shape) != want:
            raise CheckpointError(f"{source}: module {path!r} has no bias of shape {want} (the checkpoint stores one)")
    for path, names in ckpt.modules_to_save.items():
        module = found.get(path)
        module = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        params = parameters(module) if isinstance(module, nnx.Module) else {}
        for name in names:
            want = ckpt.tensors[f"{path}.{name}"].shape
            if name not in params or tuple(params[name].get_value().shape) != want:
                raise CheckpointError(f"{source}: module {path!r} has no parameter {name!r} of shape {want} (modules_to_save)")


def _checkpoint_bases(ckpt: spec_ckpt.AdapterCheckpoint) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's bases: stored, or regenerated with the portable rule (SPEC 6.3, after item 25)."""
    if ckpt.bases is not None:
        return np.asarray(ckpt.bases[0], np.float32), np.asarray(ckpt.bases[1], np.float32)
    identity = BasesIdentity.of(ckpt.config)
    a, b = generate_bases(identity.seed, ckpt.bases_shape, identity.kind, identity.basis_rule)
    return to_host(a), to_host(b)


def load_adapter(model: nnx.Module, path: str | Path, adapter_name: str = "default") -> RandLoraModel:
    """Load the adapter at ``path`` into ``model``; returns the :class:`RandLoraModel`.

    ``model`` is a plain module (a new RandLoraModel is built around it, the adapter active) or a
    RandLoraModel (the adapter is added, not activated). The file (SPEC 6.3) and its fit to the
    model are validated first; on any error the model is unchanged.

    Raises:
        CheckpointError: malformed file, or it does not fit the model.
        BasisRuleError: bases absent and their rule cannot be regenerated.

    """
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    check_adapter_name(adapter_name)
    ckpt = spec_ckpt.from_bytes(file.read_bytes(), source)
    root = model.model if isinstance(model, RandLoraModel) else model
    _check_fits(root, ckpt, source)
    a, b = _checkpoint_bases(ckpt)
    identity = BasesIdentity.of(ckpt.config)
    if isinstance(model, RandLoraModel):
        if adapter_name in model.peft_config:
            raise CheckpointError(f"{source}: the model already has an adapter named {adapter_name!r}")
        try:
            model.randlora_bases.check_identity(identity, f"adapter {adapter_name!r}")
        except ConfigError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        if not model.randlora_bases.windows_equal(a, b):
            raise CheckpointError(f"{source}: the checkpoint's bases differ from the model's shared bases")
        target = model
    else:
        regenerable = ckpt.bases is None or ckpt.config.basis_rule == PORTABLE_RULE
        target = RandLoraModel(model, RandLoraBases(identity, to_device(a), to_device(b), regenerable))
    try:
        target._insert(
            adapter_name,
            ckpt.config,
            sorted(ckpt.layers),
            {p: rec.fan_in_fan_out for p, rec in ckpt.layers.items()},
            None,
            ckpt.bases_shape,
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    _assign(target, adapter_name, ckpt)
    if not isinstance(model, RandLoraModel):
        target.set_adapter(adapter_name)
    return target


def _assign(model: RandLoraModel, name: str, ckpt: spec_ckpt.AdapterCheckpoint) -> None:
    """Copy the checkpoint's tensors into the freshly added adapter ``name``."""
    layers = model.randlora_layers()
    for path in ckpt.layers:
        layers[path].set_parameters(name, ckpt.lam(path), ckpt.gamma(path))
    owners = model.bias_owners()
    for path in ckpt.biases:
        bias = owners[path].bias
        bias.set_value(to_device(ckpt.tensors[f"{path}.bias"], bias.get_value().dtype))
    for path, params in model.saved_parameters(name).items():
        for param in ckpt.modules_to_save.get(path, []):
            var = params[param]
            var.set_value(to_device(ckpt.tensors[f"{path}.{param}"], var.get_value().dtype))
