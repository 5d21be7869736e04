"""Bounded cost for untrusted input: strict values, size limits, and a budget for the bases we generate.

Sizes recorded in files (the sidecar's layer sizes and bases allocation, our checkpoint's layer
records, a ``--layer-shapes`` file) are claims: a file of a few bytes can claim a layer of a
billion columns, and generating bases for it would take gigabytes. So every allocation of bases
made on the strength of such claims is checked first, in O(1), against a budget proportional to
what backs it: the bytes of the input read, or the weights of layers a model (or the caller's
explicit ``layer_shapes``) vouches for, with a floor for small models. A refusal costs nothing
beyond reading the input once.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

from randlora_spec.bases import BasesShape
from randlora_spec.checkpoint import LayerRecord
from randlora_spec.errors import CheckpointError
from randlora_spec.untrusted import parse_json

MAX_JSON_BYTES = 4 * 1024 * 1024
"""Largest JSON side file read (``adapter_config.json``, the sidecar, a layer-shapes file); checked before reading."""
MAX_SIZE = 2**24
"""Largest layer size, rank or allocation extent accepted from a file (the largest vocabularies are about 2**18)."""
BASES_FLOOR_BYTES = 256 * 1024 * 1024
"""Bases up to this size may always be generated (small models)."""
BASES_PER_INPUT_BYTE = 16
"""Bases may take this many bytes per byte of input read."""
BASES_PER_WEIGHT_BYTE = 4
"""...or this many per float32 byte of the weights of the layers a model vouches for (PEFT needs at most about 3)."""


def strict_json(raw: bytes, source: str) -> Any:
    """The JSON value in ``raw``, strict JSON of at most :data:`MAX_JSON_BYTES`.

    Strict as :func:`randlora_spec.untrusted.parse_json` is: UTF-8, no ``NaN`` or ``Infinity``,
    unique keys, bounded nesting.
    """
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{source}: is {len(raw)} bytes, over the {MAX_JSON_BYTES}-byte limit for a JSON file")
    try:
        return parse_json(raw)
    except ValueError as exc:  # CheckpointError, json's errors and UnicodeDecodeError all are
        raise CheckpointError(f"{source}: not valid JSON ({exc})") from None


def size_value(value: Any, what: str, source: str) -> int:
    """``value`` as a size in ``[1, MAX_SIZE]``: an integer, not a bool, float or string."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or not 1 <= number <= MAX_SIZE:
        raise CheckpointError(f"{source}: {what} must be an integer in [1, {MAX_SIZE}], got {value!r:.60}")
    return number


def flag_value(value: Any, what: str, source: str) -> bool:
    """``value`` as a boolean: ``True`` or ``False`` only (numpy booleans too)."""
    if value is True or value is False or type(value).__name__ == "bool_":
        return bool(value)
    raise CheckpointError(f"{source}: {what} must be true or false, got {value!r:.60}")


def bases_bytes(shape: BasesShape) -> int:
    """Bytes of a float32 pair of bases at allocation ``shape`` (exact; no overflow)."""
    return 4 * (shape.r * shape.m_max + shape.M_max * shape.nb_max * shape.r)


def weight_bytes(layers: Iterable[LayerRecord]) -> int:
    """Float32 bytes of the weights of ``layers``."""
    return 4 * sum(rec.in_features * rec.out_features for rec in layers)


def check_bases_budget(
    shape: BasesShape, what: str, source: str, input_bytes: int, vouched_bytes: int = 0, remedy: str = ""
) -> None:
    """Refuse to allocate bases at ``shape`` for ``what`` unless the input or a model backs that much memory.

    Args:
        shape: the allocation about to be generated (or recorded for a later reader to generate).
        what: what asks for it, for the message.
        source: the file the claim comes from, for the message.
        input_bytes: bytes of the input read.
        vouched_bytes: float32 bytes of the weights of layers a model or the caller vouches for.
        remedy: what the user can do if the sizes are real, appended to the message.

    """
    need = bases_bytes(shape)
    allowed = max(BASES_FLOOR_BYTES, BASES_PER_INPUT_BYTE * input_bytes, BASES_PER_WEIGHT_BYTE * vouched_bytes)
    if need > allowed:
        raise CheckpointError(
            f"{source}: {what} needs bases of {need:,} bytes (allocation r={shape.r}, m_max={shape.m_max}, "
            f"M_max={shape.M_max}, nb_max={shape.nb_max}), over the {allowed:,} bytes this input can justify; "
            f"refusing to allocate them{remedy}"
        )
