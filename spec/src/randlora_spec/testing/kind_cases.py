"""Golden-style cases for the layer kinds and DoRA (SPEC.md 3.10, 3.11, 8.2).

As :mod:`randlora_spec.testing.cases` for linear layers: :class:`KindSpec` describes one layer
(a linear layer with DoRA adapters, a convolution or an embedding), :func:`kind_case` builds its
forward, backward or merge case, and :func:`kind_checkpoint_inputs` a checkpoint holding such
layers. Random inputs come from generators seeded by the case id.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from randlora_spec import checkpoint
from randlora_spec.bases import BasisKind, basis_kind, generate_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.geometry import LayerGeometry, allocation, bases_shape_for_layers
from randlora_spec.golden import GoldenCase
from randlora_spec.layer_kinds import CONV_KINDS, EMBEDDING, LINEAR, LayerRecord
from randlora_spec.reference_dora import row_norms, view_of
from randlora_spec.reference_inputs import ConvGeometry
from randlora_spec.testing.cases import case_of, case_params, rng_for


@dataclass(frozen=True)
class KindSpec:
    """One layer of any kind to cover, with its adapters (``dora`` names those using DoRA).

    ``in_features`` is ``I`` of a linear layer or the ``num_embeddings`` of an embedding; a
    convolution derives ``I`` from ``in_channels``, ``kernel_size`` and ``groups``. ``x_shape``
    holds the leading axes of a linear input, the index shape of an embedding input, or the batch
    ``(N,)`` of a convolution (whose input is ``(N, in_channels, *spatial)``).
    """

    name: str
    kind: str
    out_features: int
    adapters: dict[str, int]
    active: tuple[str, ...] = ("default",)
    dora: tuple[str, ...] = ()
    in_features: int = 0
    in_channels: int = 0
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    spatial: tuple[int, ...] = ()
    x_shape: tuple[int, ...] = (5,)
    fan_in_fan_out: bool = False
    has_bias: bool = True
    padding_idx: int | None = None
    seed: int = 0
    basis: BasisKind = "dense"
    notes: str = ""
    alphas: dict[str, float] = field(default_factory=dict)

    @property
    def conv(self) -> ConvGeometry:
        """The convolution of a conv spec."""
        return ConvGeometry(
            self.in_channels, self.out_features, self.kernel_size, self.stride, self.padding, self.dilation, self.groups
        )

    @property
    def logical_in(self) -> int:
        """``I`` of the layer's ``(O, I)`` view."""
        return self.conv.in_features if self.kind in CONV_KINDS else self.in_features

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The stored weight's shape."""
        if self.kind in CONV_KINDS:
            return self.conv.kernel_shape
        if self.kind == EMBEDDING or self.fan_in_fan_out:
            return (self.logical_in, self.out_features)
        return (self.out_features, self.logical_in)

    def kind_params(self) -> dict[str, Any]:
        """The params a kind adds to a case (SPEC 8.2); none for a linear layer."""
        if self.kind in CONV_KINDS:
            return {
                "layer_kind": self.kind,
                "in_channels": self.in_channels,
                "kernel_size": list(self.kernel_size),
                "stride": list(self.stride),
                "padding": list(self.padding),
                "dilation": list(self.dilation),
                "groups": self.groups,
            }
        if self.kind == EMBEDDING:
            return {"layer_kind": EMBEDDING, "padding_idx": self.padding_idx}
        return {}

    def record(self) -> LayerRecord:
        """The checkpoint record of this layer (SPEC 6.2)."""
        fifo = self.kind == EMBEDDING or (self.kind == LINEAR and self.fan_in_fan_out)
        return LayerRecord(self.logical_in, self.out_features, fifo, self.kind, self.kernel_size, self.groups)


def _round(arr: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(arr, dtype=np.dtype(dtype))


def _layer_input(spec: KindSpec, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(x, shape of y)`` of a random input (float64, or int64 indices for an embedding)."""
    x: np.ndarray
    if spec.kind in CONV_KINDS:
        x = rng.standard_normal((*spec.x_shape, spec.in_channels, *spec.spatial))
        return x, (*spec.x_shape, spec.out_features, *spec.conv.out_spatial(spec.spatial))
    if spec.kind == EMBEDDING:
        x = rng.integers(0, spec.in_features, spec.x_shape, dtype=np.int64)
        if spec.padding_idx is not None:
            x.reshape(-1)[0] = spec.padding_idx  # the padding row is looked up at least once
        return x, (*spec.x_shape, spec.out_features)
    return rng.standard_normal((*spec.x_shape, spec.in_features)), (*spec.x_shape, spec.out_features)


def kind_inputs(spec: KindSpec, case_id: str, dtype: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inputs and params of a case of ``spec`` (shared by its forward, backward and merge cases)."""
    rng = rng_for(case_id)
    i_f, o_f = spec.logical_in, spec.out_features
    shape = allocation([(i_f, o_f)], spec.adapters.values())
    a, b = generate_bases(spec.seed, shape, spec.basis)
    weight = rng.standard_normal(spec.weight_shape) / np.sqrt(i_f)
    x, y_shape = _layer_input(spec, rng)
    inputs = {
        "x": x if spec.kind == EMBEDDING else _round(x, dtype),
        "weight": _round(weight, dtype),
        "grad_y": _round(rng.standard_normal(y_shape), dtype),
        "randlora_A": a,
        "randlora_B": b,
    }
    if spec.has_bias:
        inputs["bias"] = _round(0.1 * rng.standard_normal(o_f), dtype)
    norms = row_norms(view_of(weight, spec.kind, spec.fan_in_fan_out))
    adapters: dict[str, dict[str, Any]] = {}
    for name, r in sorted(spec.adapters.items()):
        geom = LayerGeometry(i_f, o_f, r)
        inputs[f"{name}.lambda"] = _round(rng.standard_normal((geom.r, geom.nb)), dtype)
        inputs[f"{name}.gamma"] = _round((1.0 + 0.5 * rng.standard_normal((geom.nb, geom.m))) / geom.M, dtype)
        adapters[name] = {"r": r, "alpha": spec.alphas.get(name, 2.0 * r)}
        if name in spec.dora:
            # Around the initial magnitude (the weight's row norms), so each factor is near but not at 1.
            inputs[f"{name}.magnitude"] = _round(norms * (1.0 + 0.2 * rng.standard_normal(o_f)), dtype)
            adapters[name]["use_dora"] = True
    layout = (i_f, o_f, spec.kind == EMBEDDING or spec.fan_in_fan_out)
    return inputs, case_params(spec, layout, adapters, shape, **spec.kind_params())


def kind_case(spec: KindSpec, kind: str, dtype: str) -> GoldenCase:
    """The ``kind`` case (forward, backward or merge) of ``spec`` in ``dtype``, id ``<kind>-<spec.name>-<dtype>``."""
    return case_of(kind, spec.name, dtype, kind_inputs(spec, f"{spec.name}-{dtype}", dtype))


CHECKPOINT_KIND_LAYERS = {
    "features.0": KindSpec(
        "conv", "conv2d", 8, {}, in_channels=3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), spatial=(5, 5)
    ),
    "features.1": KindSpec(
        "conv-grouped",
        "conv1d",
        6,
        {},
        in_channels=4,
        kernel_size=(3,),
        stride=(2,),
        padding=(0,),
        dilation=(1,),
        groups=2,
        spatial=(9,),
    ),
    "embed": KindSpec("embed", EMBEDDING, 12, {}, in_features=20, padding_idx=0, x_shape=(2, 3), has_bias=False),
    "head": KindSpec("head", LINEAR, 6, {}, in_features=12, x_shape=(2, 3)),
}
"""Layers of the checkpoint cases for kinds: a padded 2-D conv, a grouped strided 1-D conv, an embedding, a linear head."""


def base_layer_params(spec: KindSpec) -> dict[str, Any]:
    """What a checkpoint case says about a base layer beyond its record (SPEC 8.2 ``base_layers``)."""
    if spec.kind in CONV_KINDS:
        return {k: v for k, v in spec.kind_params().items() if k in ("in_channels", "stride", "padding", "dilation")}
    if spec.kind == EMBEDDING:
        return {"padding_idx": spec.padding_idx}
    return {}


def kind_checkpoint_inputs(
    case_id: str, config: RandLoraConfig, layers: Mapping[str, KindSpec] = CHECKPOINT_KIND_LAYERS
) -> tuple[checkpoint.AdapterCheckpoint, dict[str, np.ndarray], dict[str, Any]]:
    """A float32 checkpoint of ``layers`` under ``config`` (DoRA magnitudes with ``use_dora``), its inputs and params."""
    rng = rng_for(case_id)
    records = {path: spec.record() for path, spec in layers.items()}
    shape = bases_shape_for_layers([(rec.in_features, rec.out_features) for rec in records.values()], config.r)
    tensors: dict[str, np.ndarray] = {}
    inputs: dict[str, np.ndarray] = {}
    for path, spec in layers.items():
        geom = LayerGeometry(spec.logical_in, spec.out_features, config.r)
        tensors[path + checkpoint.LAMBDA_SUFFIX] = rng.standard_normal((geom.r, geom.nb)).astype(np.float32)
        tensors[path + checkpoint.GAMMA_SUFFIX] = ((1.0 + 0.5 * rng.standard_normal((geom.nb, geom.m))) / geom.M).astype(
            np.float32
        )
        weight = (rng.standard_normal(spec.weight_shape) / math.sqrt(spec.logical_in)).astype(np.float32)
        if config.use_dora:
            norms = row_norms(view_of(weight, spec.kind, spec.fan_in_fan_out))
            magnitude = norms * (1.0 + 0.2 * rng.standard_normal(spec.out_features))
            tensors[path + checkpoint.MAGNITUDE_SUFFIX] = magnitude.astype(np.float32)
        x, _ = _layer_input(spec, rng)
        inputs[f"{path}.weight"] = weight
        inputs[f"{path}.x"] = x if spec.kind == EMBEDDING else x.astype(np.float32)
        if spec.has_bias:
            inputs[f"{path}.bias"] = (0.1 * rng.standard_normal(spec.out_features)).astype(np.float32)
    ckpt = checkpoint.AdapterCheckpoint(
        config=config,
        adapter_name="default",
        layers=records,
        bases_shape=shape,
        tensors=tensors,
        bases=generate_bases(config.projection_prng_key, shape, basis_kind(config.sparse, config.very_sparse))
        if config.save_projection
        else None,
    )
    params = {
        "layers": {p: rec.to_json() for p, rec in records.items()},
        "base_layers": {p: base_layer_params(spec) for p, spec in layers.items()},
        "basis_rule": config.basis_rule,
        "use_dora": config.use_dora,
    }
    return ckpt, inputs, params


def kind_checkpoint_case(directory: Path, case_id: str, config: RandLoraConfig, **options: Any) -> GoldenCase:
    """A checkpoint case of :func:`kind_checkpoint_inputs`'s file saved under ``directory``, without expected values."""
    ckpt, inputs, params = kind_checkpoint_inputs(case_id, config, **options)
    path = Path(directory) / f"{case_id}.safetensors"
    checkpoint.save(path, ckpt, readable_features=checkpoint.ALL_FEATURES)
    files = {"checkpoint": path}
    return GoldenCase(id=case_id, kind="checkpoint", dtype="float32", params=params, inputs=inputs, expected={}, files=files)
