"""Building golden-style cases: the generator of the committed fixtures and tests' own cases share it.

``tools/make_golden.py`` turns :class:`LayerSpec` objects and :func:`checkpoint_inputs` into the
committed fixtures; driver tests build cases of their own geometry with the same functions and
compare a driver with the reference driver on them. Every random input comes from a generator
seeded by the case id (:func:`rng_for`), so a case never depends on what was built before it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from randlora_spec import checkpoint
from randlora_spec.bases import BasesShape, BasisKind, basis_kind, generate_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.geometry import LayerGeometry, allocation, bases_shape_for_layers
from randlora_spec.golden import GoldenCase

if TYPE_CHECKING:
    from randlora_spec.testing.kind_cases import KindSpec

LAYER_KINDS = ("forward", "backward", "merge")

CHECKPOINT_LAYERS = {
    "encoder.layers.0.q_proj": checkpoint.LayerRecord(12, 20),
    "encoder.layers.0.o_proj": checkpoint.LayerRecord(20, 12),
    "head.c_fc": checkpoint.LayerRecord(16, 16, fan_in_fan_out=True),
}
"""Layers of the checkpoint cases: in < out, in > out, and a square one stored ``(in, out)``."""


def rng_for(case_id: str) -> np.random.Generator:
    """A generator seeded by the case id, so inputs never depend on generation order."""
    return np.random.default_rng(zlib.crc32(case_id.encode()))


@dataclass(frozen=True)
class LayerSpec:
    """One layer geometry to cover, with its adapters and the allocation of the shared bases."""

    name: str
    in_features: int
    out_features: int
    adapters: dict[str, int]  # adapter name -> r
    active: tuple[str, ...] = ("default",)
    fan_in_fan_out: bool = False
    has_bias: bool = True
    x_shape: tuple[int, ...] = (5,)  # leading axes of x
    alloc_extra: tuple[int, int] = (0, 0)  # bases allocated for a larger model: extra (in, out)
    seed: int = 0
    basis: BasisKind = "dense"
    notes: str = ""
    alphas: dict[str, float] = field(default_factory=dict)  # adapter name -> alpha (default 2 r)


def _round(arr: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(arr, dtype=np.dtype(dtype))


def layer_inputs(spec: LayerSpec, case_id: str, dtype: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inputs and params of a layer case (the same inputs serve forward, backward and merge).

    ``case_id`` seeds the random inputs; ``dtype`` (``"float64"`` or ``"float32"``) is the dtype
    of every input but the bases, which are float32 by definition.
    """
    rng = rng_for(case_id)
    i_f, o_f = spec.in_features, spec.out_features
    shape = allocation([(i_f + spec.alloc_extra[0], o_f + spec.alloc_extra[1])], spec.adapters.values())
    a, b = generate_bases(spec.seed, shape, spec.basis)
    weight = rng.standard_normal((o_f, i_f)) / np.sqrt(i_f)
    inputs = {
        "x": _round(rng.standard_normal((*spec.x_shape, i_f)), dtype),
        "weight": _round(weight.T if spec.fan_in_fan_out else weight, dtype),
        "grad_y": _round(rng.standard_normal((*spec.x_shape, o_f)), dtype),
        "randlora_A": a,
        "randlora_B": b,
    }
    if spec.has_bias:
        inputs["bias"] = _round(0.1 * rng.standard_normal(o_f), dtype)
    adapters = {}
    for name, r in sorted(spec.adapters.items()):
        geom = LayerGeometry(i_f, o_f, r)
        inputs[f"{name}.lambda"] = _round(rng.standard_normal((geom.r, geom.nb)), dtype)
        # Non-trivial gamma: around PEFT's 1/M init, but different per element.
        inputs[f"{name}.gamma"] = _round((1.0 + 0.5 * rng.standard_normal((geom.nb, geom.m))) / geom.M, dtype)
        adapters[name] = {"r": r, "alpha": spec.alphas.get(name, 2.0 * r)}
    return inputs, case_params(spec, (i_f, o_f, spec.fan_in_fan_out), adapters, shape)


def case_params(
    spec: LayerSpec | KindSpec, layout: tuple[int, int, bool], adapters: dict[str, Any], shape: BasesShape, **kind: Any
) -> dict[str, Any]:
    """The ``params`` of a layer case: ``layout`` is ``(in, out, fan_in_fan_out)``, ``kind`` the kind's own entries."""
    i_f, o_f, fan_in_fan_out = layout
    common = {"in_features": i_f, "out_features": o_f, "fan_in_fan_out": fan_in_fan_out, "has_bias": spec.has_bias}
    drawn = {"seed": spec.seed, "basis_kind": spec.basis, "bases_shape": shape.__dict__, "notes": spec.notes}
    return {**common, "adapters": adapters, "active": list(spec.active), **kind, **drawn}


def layer_case(spec: LayerSpec, kind: str, dtype: str) -> GoldenCase:
    """The ``kind`` case (forward, backward or merge) of ``spec`` in ``dtype``, without expected values.

    Its id is ``<kind>-<spec.name>-<dtype>``; the three kinds share one set of random inputs and
    each keeps the ones it reads (no ``grad_y`` outside backward, no ``x`` in merge).
    """
    return case_of(kind, spec.name, dtype, layer_inputs(spec, f"{spec.name}-{dtype}", dtype))


def case_of(kind: str, name: str, dtype: str, drawn: tuple[dict[str, np.ndarray], dict[str, Any]]) -> GoldenCase:
    """Case ``<kind>-<name>-<dtype>`` from a layer's drawn ``(inputs, params)``, keeping the inputs ``kind`` reads."""
    inputs, params = drawn
    unread = {"backward": set(), "merge": {"grad_y", "x"}}.get(kind, {"grad_y"})
    kept = {k: v for k, v in inputs.items() if k not in unread}
    return GoldenCase(id=f"{kind}-{name}-{dtype}", kind=kind, dtype=dtype, params=params, inputs=kept, expected={})


def _bf16_representable(values: np.ndarray) -> np.ndarray:
    return np.asarray(values.view(np.uint32) & 0xFFFF0000, np.uint32).view(np.float32)


def checkpoint_inputs(
    case_id: str,
    config: RandLoraConfig,
    layers: Mapping[str, checkpoint.LayerRecord] = CHECKPOINT_LAYERS,
    trained_biases: bool = False,
    bf16: bool = False,
) -> tuple[checkpoint.AdapterCheckpoint, dict[str, np.ndarray]]:
    """A float32 checkpoint of ``layers`` under ``config``, and the inputs of its case.

    Each layer gets random lambda/gamma (in the checkpoint) and a weight, an input ``x`` and a bias
    (case inputs named ``<path>.weight`` etc.; the weight stored ``(in, out)`` for ``fan_in_fan_out``
    layers). With ``trained_biases`` the biases live in the checkpoint instead (``bias="randlora_only"``
    should then be set in ``config``); with ``bf16`` every checkpoint tensor is stored as BF16, its
    values made bf16-representable first so that storing them is lossless.
    """
    rng = rng_for(case_id)
    shape = bases_shape_for_layers([(rec.in_features, rec.out_features) for rec in layers.values()], config.r)
    tensors: dict[str, np.ndarray] = {}
    inputs: dict[str, np.ndarray] = {}
    for path, rec in layers.items():
        geom = LayerGeometry(rec.in_features, rec.out_features, config.r)
        lam = rng.standard_normal((geom.r, geom.nb)).astype(np.float32)
        gamma = ((1.0 + 0.5 * rng.standard_normal((geom.nb, geom.m))) / geom.M).astype(np.float32)
        if bf16:
            lam, gamma = _bf16_representable(lam), _bf16_representable(gamma)
        tensors[path + checkpoint.LAMBDA_SUFFIX], tensors[path + checkpoint.GAMMA_SUFFIX] = lam, gamma
        weight = (rng.standard_normal((rec.out_features, rec.in_features)) / np.sqrt(rec.in_features)).astype(np.float32)
        inputs[f"{path}.weight"] = weight.T.copy() if rec.fan_in_fan_out else weight
        inputs[f"{path}.x"] = rng.standard_normal((2, 3, rec.in_features)).astype(np.float32)
        bias = (0.1 * rng.standard_normal(rec.out_features)).astype(np.float32)
        if trained_biases:
            tensors[f"{path}.bias"] = bias  # the trained bias lives in the checkpoint
        else:
            inputs[f"{path}.bias"] = bias
    kind = basis_kind(config.sparse, config.very_sparse)
    ckpt = checkpoint.AdapterCheckpoint(
        config=config,
        adapter_name="default",
        layers=dict(layers),
        bases_shape=shape,
        tensors=tensors,
        bases=generate_bases(config.projection_prng_key, shape, kind) if config.save_projection else None,
        biases=sorted(layers) if trained_biases else [],
        bf16_keys=frozenset(tensors) if bf16 else frozenset(),
    )
    return ckpt, inputs


def checkpoint_case(directory: Path, case_id: str, config: RandLoraConfig, **options: Any) -> GoldenCase:
    """A checkpoint case: :func:`checkpoint_inputs`'s file saved under ``directory``, without expected values."""
    ckpt, inputs = checkpoint_inputs(case_id, config, **options)
    path = Path(directory) / f"{case_id}.safetensors"
    checkpoint.save(path, ckpt)
    params = {"layers": {p: rec.to_json() for p, rec in ckpt.layers.items()}, "basis_rule": config.basis_rule}
    files = {"checkpoint": path}
    return GoldenCase(id=case_id, kind="checkpoint", dtype="float32", params=params, inputs=inputs, expected={}, files=files)
