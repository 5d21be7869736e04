"""One adapter of a :class:`~randlora_jax.model.RandLoraModel` as an in-memory ``AdapterCheckpoint`` (SPEC 6).

Below the model module: the model's own ``save_adapter`` writes through it, and
:mod:`randlora_jax.checkpoint` (files, loading) builds on both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from randlora_jax.arrays import to_device, to_host
from randlora_jax.bases import generate_bases
from randlora_jax.shared import covers
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape, bases_shape_for_layers, num_bases
from randlora_spec.errors import ConfigError

if TYPE_CHECKING:
    from randlora_jax.model import RandLoraModel

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _host(value: object) -> tuple[np.ndarray, bool]:
    """A float32/float64 host copy of a parameter, and whether it was bfloat16 (stored as BF16)."""
    array = to_device(value)
    is_bf16 = array.dtype == jnp.bfloat16
    if array.dtype in _HALF:
        array = array.astype(jnp.float32)
    return np.asarray(array), bool(is_bf16)


def _adapter_bases_shape(model: RandLoraModel, name: str, records: dict[str, spec_ckpt.LayerRecord]) -> BasesShape:
    """The allocation for this adapter's ``r`` over its layers (SPEC 6.2); very_sparse keeps the model's ``m_max``."""
    config = model.peft_config[name]
    shape = bases_shape_for_layers([(rec.in_features, rec.out_features) for rec in records.values()], config.r)
    if config.very_sparse:
        m_max = model.randlora_bases.shape.m_max
        shape = BasesShape(r=config.r, m_max=m_max, M_max=max(shape.M_max, m_max), nb_max=num_bases(m_max, config.r))
    return shape


def _window(model: RandLoraModel, shape: BasesShape) -> tuple[np.ndarray, np.ndarray]:
    """The model's bases cut to ``shape`` (or generated for it when the model's do not cover it)."""
    bases = model.randlora_bases
    if covers(bases.shape, shape):
        a = to_host(bases.randlora_A.get_value())[: shape.r, :, : shape.m_max]
        b = to_host(bases.randlora_B.get_value())[: shape.M_max, : shape.nb_max, : shape.r]
        return a, b
    full = generate_bases(bases.identity.seed, shape, bases.identity.kind, bases.identity.basis_rule)
    return to_host(full[0]), to_host(full[1])


def build_checkpoint(model: RandLoraModel, adapter_name: str | None = None) -> spec_ckpt.AdapterCheckpoint:
    """The checkpoint of one adapter (default: the first active one), validated when written.

    Raises:
        AdapterNotFoundError: unknown adapter.
        ConfigError: no adapter named and none active.

    """
    name = adapter_name if adapter_name is not None else model.active_adapter
    if name is None:
        raise ConfigError("adapter_name: no adapter is active; name the adapter to save")
    paths = model.adapter_layers(name)
    config = model.peft_config[name]
    layers = model.randlora_layers()
    records, tensors, bf16 = {}, {}, set()
    for path in paths:
        layer = layers[path]
        records[path] = spec_ckpt.LayerRecord(layer.in_features, layer.out_features, layer.fan_in_fan_out)
        for suffix, store in ((spec_ckpt.LAMBDA_SUFFIX, layer.randlora_lambda), (spec_ckpt.GAMMA_SUFFIX, layer.randlora_gamma)):
            tensors[path + suffix], half = _host(store[name].get_value())
            bf16 |= {path + suffix} if half else set()
    owners = model.bias_owners()
    biases = model.trained_biases(name)
    for path in biases:
        tensors[f"{path}.bias"], half = _host(owners[path].bias.get_value())
        bf16 |= {f"{path}.bias"} if half else set()
    saved: dict[str, list[str]] = {}
    for path, params in model.saved_parameters(name).items():
        saved[path] = sorted(params)
        for param, var in params.items():
            tensors[f"{path}.{param}"], half = _host(var.get_value())
            bf16 |= {f"{path}.{param}"} if half else set()
    shape = _adapter_bases_shape(model, name, records)
    bases = _window(model, shape) if spec_ckpt.stores_bases(config) else None
    return spec_ckpt.AdapterCheckpoint(
        config, name, records, shape, tensors, bases=bases, biases=biases, modules_to_save=saved, bf16_keys=frozenset(bf16)
    )
