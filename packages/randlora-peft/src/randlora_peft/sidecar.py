"""The sidecar ``randlora_layers.json``: what our writer leaves next to PEFT's files (PEFT ignores it).

It records what PEFT's files lack: the base-layer shapes, our original config, and the rule and
allocation of the bases. Reading a directory back uses it as a source of layer shapes, and undoes
the PEFT detour where every claim checks out (:func:`restore_from_sidecar`). A sidecar is data
from a directory anyone may have edited: :func:`parse_sidecar` checks every value's type and range
(strict JSON, sizes exact integers in ``[1, MAX_SIZE]``), and nothing it claims is used before it
is verified against the adapter's tensors; bases it asks for are generated only within the budget
of :mod:`randlora_peft.limits`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from randlora_peft.limits import check_bases_budget, flag_value, size_value, strict_json
from randlora_peft.shapes import as_record
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PORTABLE_RULE, TAG_A, TAG_B, BasesShape, basis_kind, num_bases
from randlora_spec.checkpoint import AdapterCheckpoint, LayerRecord
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError, ConfigError

SIDECAR_NAME = "randlora_layers.json"
"""File written next to PEFT's files: the base-layer shapes and the bases' provenance (PEFT ignores it)."""
SIDECAR_FORMAT = "randlora-peft.layers/1"
_LAYER_FIELDS = {"in_features", "out_features", "fan_in_fan_out"}
_SHAPE_FIELDS = ("r", "m_max", "M_max", "nb_max")
_OPTIONAL = {"basis_rule": str, "config": str}
_MATH_FIELDS = ("r", "randlora_alpha", "randlora_dropout", "projection_prng_key", "sparse", "very_sparse", "bias", "init_weights")
"""Config fields that must agree between PEFT's config and the sidecar's copy for the latter to be used."""


@dataclass(frozen=True)
class Sidecar:
    """A parsed, type-checked sidecar (its claims are not verified yet)."""

    source: str
    layers: dict[str, LayerRecord]
    basis_rule: str | None = None
    save_projection: bool = True
    config: str | None = None
    bases_shape: BasesShape | None = None


def sidecar_for(ckpt: AdapterCheckpoint) -> dict[str, Any]:
    """Content of ``randlora_layers.json``: layer shapes, the original config, the bases' rule and allocation."""
    s = ckpt.bases_shape
    return {
        "format": SIDECAR_FORMAT,
        "layers": {
            p: {"in_features": rec.in_features, "out_features": rec.out_features, "fan_in_fan_out": rec.fan_in_fan_out}
            for p, rec in sorted(ckpt.layers.items())
        },
        "basis_rule": ckpt.config.basis_rule,
        "save_projection": ckpt.config.save_projection,
        "config": ckpt.config.to_json(),
        "bases_shape": {"r": s.r, "m_max": s.m_max, "M_max": s.M_max, "nb_max": s.nb_max},
    }


def sidecar_bytes(ckpt: AdapterCheckpoint) -> bytes:
    """The sidecar file of ``ckpt`` as written (indented, sorted keys, trailing newline)."""
    return (json.dumps(sidecar_for(ckpt), indent=2, sort_keys=True) + "\n").encode()


def _layer(path: str, rec: Any, source: str) -> LayerRecord:
    if not path or not isinstance(rec, dict) or set(rec) != _LAYER_FIELDS:
        raise CheckpointError(f"{source}: sidecar record of {path!r} must hold in_features, out_features, fan_in_fan_out")
    return as_record(path, (rec["in_features"], rec["out_features"], rec["fan_in_fan_out"]), f"{source}: layers")


def _bases_shape(raw: Any, source: str) -> BasesShape | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != set(_SHAPE_FIELDS):
        raise CheckpointError(f"{source}: bases_shape must hold exactly {list(_SHAPE_FIELDS)}")
    shape = BasesShape(**{k: size_value(raw[k], f"bases_shape.{k}", source) for k in _SHAPE_FIELDS})
    if shape.nb_max != num_bases(shape.m_max, shape.r) or shape.m_max > shape.M_max:
        raise CheckpointError(f"{source}: bases_shape {raw} is inconsistent (needs nb_max = ceil(m_max / r), m_max <= M_max)")
    return shape


def parse_sidecar(raw: bytes, source: str) -> Sidecar:
    """The sidecar in ``raw``, every value type- and range-checked; :class:`CheckpointError` names the first bad one."""
    data = strict_json(raw, source)
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or not isinstance(data.get("layers"), dict):
        raise CheckpointError(f"{source}: not a {SIDECAR_FORMAT} file")
    for key, kind in _OPTIONAL.items():
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise CheckpointError(f"{source}: {key} must be a string, got {data[key]!r:.60}")
    save_projection = data.get("save_projection", True)
    return Sidecar(
        source=source,
        layers={path: _layer(path, rec, source) for path, rec in data["layers"].items()},
        basis_rule=data.get("basis_rule"),
        save_projection=flag_value(save_projection, "save_projection", source),
        config=data.get("config"),
        bases_shape=_bases_shape(data.get("bases_shape"), source),
    )


def sidecar_layers(sidecar: Sidecar, paths: list[str]) -> dict[str, LayerRecord]:
    """The layer records a sidecar holds; they must be exactly the adapter's layers ``paths``."""
    if sorted(sidecar.layers) != paths:
        raise CheckpointError(f"{sidecar.source}: its layers do not match the adapter's layers")
    return dict(sidecar.layers)


def _original_config(raw: str | None, current: RandLoraConfig) -> RandLoraConfig | None:
    """The sidecar's copy of our config when it parses and agrees with PEFT's on every field that affects the math."""
    if raw is None:
        return None
    try:
        original = RandLoraConfig.parse(raw)
    except ConfigError:
        return None
    return original if all(getattr(original, f) == getattr(current, f) for f in _MATH_FIELDS) else None


def _stored_are_portable(ckpt: AdapterCheckpoint, allocation: BasesShape) -> bool:
    """The stored bases are exactly the portable rule's values in their window of ``allocation``.

    Only the stored window is generated (the rule gives every value from its coordinates; the
    allocation's ``m_max`` sets the sparsity of ``very_sparse`` bases), so this costs what the
    file already holds.
    """
    from randlora_core.bases import generate_basis

    cfg, s = ckpt.config, ckpt.bases_shape
    kind = basis_kind(cfg.sparse, cfg.very_sparse)
    stored = ckpt.bases or ()
    for tag, shape, values in zip((TAG_A, TAG_B), (s.a_shape, s.b_shape), stored, strict=False):
        if values.shape != shape:
            return False
        window = generate_basis(cfg.projection_prng_key, tag, shape, kind, allocation.m_max).numpy()
        if not np.array_equal(values.astype(np.float32), window):
            return False
    return len(stored) == 2


def _portable(ckpt: AdapterCheckpoint, sidecar: Sidecar, allocation: BasesShape) -> AdapterCheckpoint:
    """``ckpt`` under the portable rule at ``allocation``, the bases kept only if the sidecar says they were.

    Without stored bases, a dense or sparse adapter records its own layers' allocation (the stored
    window, whose values the larger allocation's window repeats exactly), which is what readers
    regenerate without question (randlora-core refuses a larger one); ``very_sparse`` keeps the
    allocation, whose ``m_max`` sets its values.
    """
    from randlora_core import generate_bases

    cfg = ckpt.config
    kind = basis_kind(cfg.sparse, cfg.very_sparse)
    fields = {**cfg.model_dump(mode="json"), "basis_rule": PORTABLE_RULE, "save_projection": sidecar.save_projection}
    bases = None
    if sidecar.save_projection:
        a, b = generate_bases(cfg.projection_prng_key, allocation, kind)
        bases = (a.numpy(), b.numpy())
    elif kind != "very_sparse":
        allocation = ckpt.bases_shape
    return AdapterCheckpoint(
        config=RandLoraConfig.parse(fields),
        adapter_name=ckpt.adapter_name,
        layers=ckpt.layers,
        bases_shape=allocation,
        tensors=ckpt.tensors,
        bases=bases,
        biases=ckpt.biases,
        modules_to_save=ckpt.modules_to_save,
        bf16_keys=ckpt.bf16_keys - {spec_ckpt.BASIS_A_KEY, spec_ckpt.BASIS_B_KEY},
    )


def restore_from_sidecar(ckpt: AdapterCheckpoint, sidecar: Sidecar, input_bytes: int) -> AdapterCheckpoint:
    """Undo the PEFT detour where the sidecar allows it, verifying every claim.

    The original config (targeting fields as written, not PEFT's explicit paths) is restored when
    it agrees with PEFT's config on every field that affects the math; the portable rule (and the
    original ``save_projection`` and allocation) when the stored bases are bit-identical to the
    portable rule's. A sidecar whose layers are not the adapter's is stale (PEFT re-saved another
    adapter in the directory) and is ignored. ``input_bytes`` (what was read) bounds the allocation
    the sidecar may ask for.
    """
    if sorted(sidecar.layers) != sorted(ckpt.layers):
        return ckpt
    original = _original_config(sidecar.config, ckpt.config)
    if original is not None:
        # the sidecar holds the canonical JSON, without PEFT's bookkeeping: keep what PEFT's config says
        fields = {**original.model_dump(mode="json"), **ckpt.config.bookkeeping()}
        fields.update(basis_rule=ckpt.config.basis_rule, save_projection=True)
        ckpt.config = RandLoraConfig.parse(fields)
    if sidecar.basis_rule != PORTABLE_RULE or ckpt.bases is None:
        return ckpt
    allocation = sidecar.bases_shape or ckpt.bases_shape
    if allocation.r != ckpt.bases_shape.r or not allocation.covers(ckpt.bases_shape):
        return ckpt
    check_bases_budget(allocation, "the sidecar's bases allocation", sidecar.source, input_bytes)
    if not _stored_are_portable(ckpt, allocation):
        return ckpt
    return _portable(ckpt, sidecar, allocation)
