"""A strict, dependency-free reader and writer of the safetensors container format.

The spec owns its own implementation so that validation (header size limits, offsets that tile the
data buffer exactly, known dtypes) is explicit and testable, and so that spec needs no torch.
Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the raw data buffer.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from randlora_spec.errors import CheckpointError

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Headers larger than this are rejected before parsing (a malformed length must not allocate GBs)."""

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ITEMSIZE = {**{k: v.itemsize for k, v in _NUMPY_DTYPES.items()}, "BF16": 2}
_CODE_FOR_NUMPY = {v: k for k, v in _NUMPY_DTYPES.items()}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns (uint16), round-to-nearest-even, as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0
    return out


def _parse_header(blob: bytes, source: str) -> tuple[dict, int]:
    if len(blob) < 8:
        raise CheckpointError(f"{source}: file is {len(blob)} bytes, too short to be safetensors (needs an 8-byte header length)")
    n = int.from_bytes(blob[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{source}: safetensors header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > len(blob):
        raise CheckpointError(f"{source}: header length {n} runs past the end of the {len(blob)}-byte file (truncated?)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{source}: safetensors header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: safetensors header must be a JSON object")
    return header, 8 + n


def decode(blob: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``(tensors, metadata)``, validating the whole container.

    BF16 tensors come back widened to float32 (exactly). Raises :class:`CheckpointError` on any defect.
    """
    header, start = _parse_header(blob, source)
    data = memoryview(blob)[start:]
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{source}: __metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{source}: tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{source}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{source}: tensor {name!r} has a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= len(data)
        ):
            raise CheckpointError(f"{source}: tensor {name!r} has data_offsets {offsets!r} outside the data buffer")
        count = math.prod(shape)  # exact: a hostile shape must not overflow into a matching length
        if offsets[1] - offsets[0] != count * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{source}: tensor {name!r} byte length does not match shape {shape} and dtype {dtype}")
        spans.append((offsets[0], offsets[1], name))
        raw = data[offsets[0] : offsets[1]]
        if dtype == "BF16":
            tensors[name] = bf16_to_float32(np.frombuffer(raw, dtype="<u2").reshape(shape))
        else:
            tensors[name] = np.frombuffer(raw, dtype=_NUMPY_DTYPES[dtype]).reshape(shape).copy()
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{source}: tensor {name!r} leaves a gap or overlaps in the data buffer")
        position = end
    if position != len(data):
        raise CheckpointError(f"{source}: data buffer has {len(data) - position} trailing bytes not owned by any tensor")
    return tensors, dict(metadata)


def read_dtypes(blob: bytes, source: str = "<bytes>") -> dict[str, str]:
    """The stored dtype code of every tensor (``decode`` widens BF16, so this keeps the original)."""
    header, _ = _parse_header(blob, source)
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "dtype" in v}


def encode(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None, bf16: frozenset[str] = frozenset()
) -> bytes:
    """Serialise to safetensors bytes deterministically (tensors ordered by name).

    Args:
        tensors: name -> array. Arrays must have a dtype safetensors knows.
        metadata: string -> string map stored as ``__metadata__``.
        bf16: names of float32 tensors to store as BF16 (rounded to nearest even).

    """
    header: dict[str, object] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        if name in bf16:
            payload, code = float32_to_bf16(arr.astype(np.float32)).astype("<u2").tobytes(), "BF16"
        else:
            little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
            code = _CODE_FOR_NUMPY.get(little.dtype)
            if code is None:
                raise CheckpointError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors cannot store")
            payload = np.ascontiguousarray(little).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(payload)]}
        chunks.append(payload)
        offset += len(payload)
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # align the data buffer to 8 bytes, as the reference library does
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    The bytes go to a temporary file in the same directory, which is flushed and fsynced, then
    renamed over ``path``; the directory is fsynced so the rename survives a crash. A reader sees
    either the old file or the new one, never a torn write.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
