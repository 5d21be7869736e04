"""Layer kinds and the features a checkpoint needs (SPEC.md 3.10, 3.11, 6.2, 6.3 items 17 and 26).

A layer kind says how a base layer's weight is seen as the ``(O, I)`` matrix RandLoRA updates:
``linear`` (``nn.Linear``, GPT-2 ``Conv1D``), ``conv1d`` / ``conv2d`` / ``conv3d`` (a kernel
``(C_out, C_in / groups, *kernel_size)`` seen as ``(C_out, C_in / groups * prod(kernel_size))``) and
``embedding`` (a table ``(num_embeddings, embedding_dim)`` seen transposed). :class:`LayerRecord`
is what a checkpoint records about one adapted layer; :func:`parse_record` reads one from untrusted
JSON and :meth:`LayerRecord.to_json` writes one, leaving linear records exactly as spec 1.0 wrote
them.

A *feature* is a layer kind, or ``dora`` (the variant of SPEC 3.11). A reader states the features
it can compute; a checkpoint needing another one is refused (:func:`check_features`), never read as
something else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from randlora_spec.errors import CheckpointError
from randlora_spec.geometry import Sides
from randlora_spec.untrusted import JSON_INT_LIMIT, MAX_JSON_INT_DIGITS, brief

LINEAR = "linear"
CONV_KINDS = ("conv1d", "conv2d", "conv3d")
EMBEDDING = "embedding"
LAYER_KINDS = (LINEAR, *CONV_KINDS, EMBEDDING)
DORA = "dora"
ALL_FEATURES = frozenset({*LAYER_KINDS, DORA})
"""Every feature this version of the spec defines."""
BASE_FEATURES = frozenset({LINEAR})
"""The features of spec 1.0: linear layers, no DoRA. The default of every reader and writer here."""

_LINEAR_KEYS = ("in_features", "out_features", "fan_in_fan_out")
_KEYS = {
    LINEAR: {*_LINEAR_KEYS},
    EMBEDDING: {*_LINEAR_KEYS, "kind"},
    **{kind: {*_LINEAR_KEYS, "kind", "kernel_size", "groups"} for kind in CONV_KINDS},
}


def conv_dims(kind: str) -> int:
    """Number of spatial dimensions of a conv kind (``conv2d`` -> 2)."""
    return CONV_KINDS.index(kind) + 1


@dataclass(frozen=True)
class LayerRecord(Sides):
    """The base layer an adapter was trained on: kind, logical sizes and weight layout (SPEC 6.2).

    ``in_features`` / ``out_features`` are ``I`` and ``O`` of the layer's ``(O, I)`` view
    (SPEC 3.10); ``fan_in_fan_out`` says the weight is stored ``(I, O)`` (GPT-2 ``Conv1D``, and
    every embedding table). Conv records also hold the ``kernel_size`` and ``groups`` of the kernel.
    """

    fan_in_fan_out: bool = False
    kind: str = LINEAR
    kernel_size: tuple[int, ...] = ()
    groups: int = 1

    def to_json(self) -> dict[str, Any]:
        """The record as written in metadata ``layers`` (keys in SPEC 6.2 order; linear ones as in spec 1.0)."""
        out: dict[str, Any] = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "fan_in_fan_out": self.fan_in_fan_out,
        }
        if self.kind != LINEAR:
            out["kind"] = self.kind
        if self.kind in CONV_KINDS:
            out["kernel_size"] = list(self.kernel_size)
            out["groups"] = self.groups
        return out


def positive_int(value: Any, what: str, source: str) -> int:
    """``value`` if it is a positive integer (not a boolean) of at most the JSON digit limit, else CheckpointError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{source}: {what} must be a positive integer, got {brief(value)}")
    if value >= JSON_INT_LIMIT:  # only an in-memory checkpoint can hold one: JSON parsing refuses it
        raise CheckpointError(f"{source}: {what} has more than {MAX_JSON_INT_DIGITS} digits")
    return value


def _kind_of(path: str, rec: Any, source: str) -> str:
    if not isinstance(path, str) or not path or not isinstance(rec, dict):
        raise CheckpointError(f"{source}: layer record for {brief(path)} must hold in_features, out_features, fan_in_fan_out")
    kind: str = rec.get("kind", LINEAR)
    if kind not in LAYER_KINDS:
        raise CheckpointError(f"{source}: layer {brief(path)} has kind {brief(kind)}; known kinds are {list(LAYER_KINDS)}")
    if set(rec) != _KEYS[kind] and set(rec) != _KEYS[kind] | {"kind"}:
        raise CheckpointError(f"{source}: layer record for {brief(path)} must hold exactly {sorted(_KEYS[kind])} (kind {kind!r})")
    return kind


def _conv_geometry(path: str, rec: dict[str, Any], kind: str, in_features: int, source: str) -> tuple[tuple[int, ...], int]:
    kernel = rec["kernel_size"]
    if not isinstance(kernel, list) or len(kernel) != conv_dims(kind):
        raise CheckpointError(f"{source}: layer {brief(path)} kernel_size must be a list of {conv_dims(kind)} positive integers")
    sizes = tuple(positive_int(k, f"layer {brief(path)} kernel_size", source) for k in kernel)
    groups = positive_int(rec["groups"], f"layer {brief(path)} groups", source)
    if in_features % math.prod(sizes):
        raise CheckpointError(
            f"{source}: layer {brief(path)} in_features={in_features} is not (C_in / groups) * prod(kernel_size) "
            f"for kernel_size {list(sizes)}"
        )
    return sizes, groups


def parse_record(path: Any, rec: Any, source: str) -> LayerRecord:
    """One record of metadata ``layers``, validated (SPEC 6.3 item 17)."""
    kind = _kind_of(path, rec, source)
    if not isinstance(rec["fan_in_fan_out"], bool):
        raise CheckpointError(f"{source}: layer {brief(path)} fan_in_fan_out must be a boolean")
    in_f = positive_int(rec["in_features"], f"layer {brief(path)} in_features", source)
    out_f = positive_int(rec["out_features"], f"layer {brief(path)} out_features", source)
    if kind != LINEAR and rec["fan_in_fan_out"] != (kind == EMBEDDING):
        raise CheckpointError(
            f"{source}: layer {brief(path)} of kind {kind!r} must have fan_in_fan_out={kind == EMBEDDING} "
            "(its weight is stored (in, out) exactly when it is an embedding table)"
        )
    kernel, groups = _conv_geometry(path, rec, kind, in_f, source) if kind in CONV_KINDS else ((), 1)
    return LayerRecord(in_f, out_f, rec["fan_in_fan_out"], kind, kernel, groups)


def required_features(layers: Mapping[str, LayerRecord], use_dora: bool) -> frozenset[str]:
    """The features a reader needs to compute a checkpoint of ``layers`` (plus ``dora`` with ``use_dora``)."""
    kinds = {rec.kind for rec in layers.values()}
    return frozenset(kinds | ({DORA} if use_dora else set()))


def check_features(layers: Mapping[str, LayerRecord], use_dora: bool, supported: Iterable[str], source: str) -> None:
    """Refuse a checkpoint that needs a feature not in ``supported`` (SPEC 6.3 item 26)."""
    allowed = frozenset(supported)
    missing = sorted(required_features(layers, use_dora) - allowed)
    if missing:
        where = sorted(p for p, rec in layers.items() if rec.kind in missing)[:3]
        detail = f" (layers {brief(where)})" if where else ""
        raise CheckpointError(
            f"{source}: the checkpoint needs {missing}{detail}, but only {sorted(allowed)} are supported here; "
            "refusing it rather than computing something else"
        )
