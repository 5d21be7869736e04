"""The sidecar ``randlora_layers.json``: what our writer leaves next to PEFT's files (PEFT ignores it).

It records what PEFT's files lack: the base-layer shapes, our original config, and the rule and
allocation of the bases. Reading a directory back uses it as a source of layer shapes, and undoes
the PEFT detour where every claim checks out (:func:`restore_from_sidecar`): a sidecar is data from
a directory anyone may have edited, so nothing in it is taken on trust.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from randlora_peft.shapes import as_record
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PORTABLE_RULE, BasesShape, basis_kind
from randlora_spec.checkpoint import AdapterCheckpoint, LayerRecord
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError, ConfigError

SIDECAR_NAME = "randlora_layers.json"
"""File written next to PEFT's files: the base-layer shapes and the bases' provenance (PEFT ignores it)."""
SIDECAR_FORMAT = "randlora-peft.layers/1"
_LAYER_FIELDS = {"in_features", "out_features", "fan_in_fan_out"}
_SHAPE_FIELDS = {"r", "m_max", "M_max", "nb_max"}
_MATH_FIELDS = ("r", "randlora_alpha", "randlora_dropout", "projection_prng_key", "sparse", "very_sparse", "bias", "init_weights")
"""Config fields that must agree between PEFT's config and the sidecar's copy for the latter to be used."""


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


def check_sidecar(data: Any, source: str) -> dict[str, Any]:
    """``data`` if it is a sidecar of our format, else :class:`CheckpointError`."""
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or not isinstance(data.get("layers"), dict):
        raise CheckpointError(f"{source}: not a {SIDECAR_FORMAT} file")
    return data


def sidecar_layers(data: dict[str, Any], paths: list[str], source: str) -> dict[str, LayerRecord]:
    """The layer records a sidecar holds; they must be exactly the adapter's layers ``paths``."""
    records = {}
    for path, rec in data["layers"].items():
        if not isinstance(rec, dict) or set(rec) != _LAYER_FIELDS:
            raise CheckpointError(f"{source}: sidecar record of {path!r} must hold in_features, out_features, fan_in_fan_out")
        records[path] = as_record(path, (rec["in_features"], rec["out_features"], bool(rec["fan_in_fan_out"])))
    if sorted(records) != paths:
        raise CheckpointError(f"{source}: its layers do not match the adapter's layers")
    return records


def _original_config(raw: Any, current: RandLoraConfig) -> RandLoraConfig | None:
    """The sidecar's copy of our config when it parses and agrees with PEFT's on every field that affects the math."""
    if not isinstance(raw, str):
        return None
    try:
        original = RandLoraConfig.parse(raw)
    except ConfigError:
        return None
    return original if all(getattr(original, f) == getattr(current, f) for f in _MATH_FIELDS) else None


def _claimed_allocation(raw: Any, stored: BasesShape) -> BasesShape | None:
    """The sidecar's bases allocation when it is well formed and covers the stored one, else ``None``."""
    if not isinstance(raw, dict) or set(raw) != _SHAPE_FIELDS:
        return stored
    try:
        claimed = BasesShape(**{k: int(v) for k, v in raw.items()})
    except (TypeError, ValueError):
        return None
    return claimed if claimed.r == stored.r and claimed.covers(stored) else None


def _portable_bases_match(ckpt: AdapterCheckpoint, allocation: BasesShape) -> tuple[np.ndarray, np.ndarray] | None:
    """The portable rule's bases at ``allocation`` if the stored bases are exactly their window, else ``None``."""
    from randlora_core import generate_bases

    cfg = ckpt.config
    a_gen, b_gen = generate_bases(cfg.projection_prng_key, allocation, basis_kind(cfg.sparse, cfg.very_sparse))
    s = ckpt.bases_shape
    a_win, b_win = a_gen[:, :, : s.m_max].numpy(), b_gen[: s.M_max, : s.nb_max, :].numpy()
    a, b = ckpt.bases or (None, None)
    if a is None or b is None or a.shape != a_win.shape or b.shape != b_win.shape:
        return None
    if not (np.array_equal(a.astype(np.float32), a_win) and np.array_equal(b.astype(np.float32), b_win)):
        return None
    return a_gen.numpy(), b_gen.numpy()


def restore_from_sidecar(ckpt: AdapterCheckpoint, sidecar: dict[str, Any]) -> AdapterCheckpoint:
    """Undo the PEFT detour where the sidecar allows it, verifying every claim.

    The original config (targeting fields as written, not PEFT's explicit paths) is restored when
    it agrees with PEFT's config on every field that affects the math; the portable rule (and the
    original ``save_projection``) when the stored bases are bit-identical to the portable rule's.
    """
    layers = sidecar.get("layers")
    if not isinstance(layers, dict) or sorted(layers) != sorted(ckpt.layers):
        return ckpt  # a stale sidecar (PEFT re-saved another adapter here): trust nothing in it
    original = _original_config(sidecar.get("config"), ckpt.config)
    if original is not None:
        # the sidecar holds the canonical JSON, without PEFT's bookkeeping: keep what PEFT's config says
        fields = {**original.model_dump(mode="json"), **ckpt.config.bookkeeping()}
        fields.update(basis_rule=ckpt.config.basis_rule, save_projection=True)
        ckpt.config = RandLoraConfig.parse(fields)
    if sidecar.get("basis_rule") != PORTABLE_RULE or ckpt.bases is None:
        return ckpt
    allocation = _claimed_allocation(sidecar.get("bases_shape"), ckpt.bases_shape)
    generated = _portable_bases_match(ckpt, allocation) if allocation is not None else None
    if allocation is None or generated is None:
        return ckpt
    save_projection = bool(sidecar.get("save_projection", True))
    fields = {**ckpt.config.model_dump(mode="json"), "basis_rule": PORTABLE_RULE, "save_projection": save_projection}
    return AdapterCheckpoint(
        config=RandLoraConfig.parse(fields),
        adapter_name=ckpt.adapter_name,
        layers=ckpt.layers,
        bases_shape=allocation,
        tensors=ckpt.tensors,
        bases=generated if save_projection else None,
        biases=ckpt.biases,
        modules_to_save=ckpt.modules_to_save,
        bf16_keys=ckpt.bf16_keys - {spec_ckpt.BASIS_A_KEY, spec_ckpt.BASIS_B_KEY},
    )
