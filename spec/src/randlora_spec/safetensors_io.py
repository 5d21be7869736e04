"""A strict, dependency-free reader and writer of the safetensors container format.

The spec owns its own implementation so that validation (header size limits, offsets that tile the
data buffer exactly, known dtypes) is explicit and testable, and so that spec needs no torch.
Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the raw data buffer.

Reading is split in two. :func:`read_header` (bytes) and :func:`open_safetensors` (a file) check
the whole container (SPEC 6.3 items 1-11) from the header alone and describe every tensor by a
:class:`TensorInfo`; no tensor byte is copied or decoded before that succeeds, so refusing a file
costs memory in proportion to its header. Tensors are then read one at a time, each into a single
freshly allocated array (:meth:`SafetensorsFile.read`): files are read with seek and read, never
memory-mapped.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from randlora_spec.atomic_write import atomic_write_bytes, special_file_kind
from randlora_spec.errors import CheckpointError
from randlora_spec.untrusted import brief, parse_json

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Headers larger than this are rejected before parsing (a malformed length must not allocate GBs)."""
MAX_NDIM = 32
"""Most dimensions a tensor may have: what numpy 1.x can represent (numpy 2 allows 64)."""
_MAX_EXTENT = 2**63
"""A tensor whose non-zero dimensions multiply (times the item size) to this cannot be represented."""

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


def dtype_code(dtype: np.dtype) -> str | None:
    """The safetensors code of a numpy dtype (any byte order), or None when the format has none."""
    return _CODE_FOR_NUMPY.get(np.dtype(dtype).newbyteorder("<"))


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


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What a tensor is, independent of where it is stored: its safetensors dtype code and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorInfo(TensorSpec):
    """One validated header entry: dtype code, shape and byte span ``[begin, end)`` in the data buffer."""

    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated container header: every tensor's :class:`TensorInfo` and the string metadata."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    """Offset of the data buffer from the start of the file: ``8 + N``."""

    @property
    def dtypes(self) -> dict[str, str]:
        """The stored dtype code of every tensor (readers widen BF16 to float32, so this keeps the original)."""
        return {name: info.dtype for name, info in self.tensors.items()}


def header_length(prefix: bytes | bytearray | memoryview, size: int, source: str) -> int:
    """Check the 8-byte length prefix of a ``size``-byte container (SPEC 6.3 items 1-3); returns N."""
    if size < 8:
        raise CheckpointError(f"{source}: file is {size} bytes, too short to be safetensors (needs an 8-byte header length)")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{source}: safetensors header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise CheckpointError(f"{source}: header length {n} runs past the end of the {size}-byte file (truncated?)")
    return n


def check_ndim(name: str, ndim: int, source: str) -> None:
    """Refuse a tensor of more than :data:`MAX_NDIM` dimensions (SPEC 6.3 item 8)."""
    if ndim > MAX_NDIM:
        raise CheckpointError(f"{source}: tensor {brief(name)} has {ndim} dimensions; at most {MAX_NDIM} are supported")


def _capped_product(factors: list[int], start: int, cap: int) -> int:
    """``start * prod(factors)``, or ``cap`` as soon as it reaches ``cap``; linear in the factors' size."""
    total = start
    for factor in factors:
        total *= factor
        if total >= cap:
            return cap
    return total


def _tensor_info(name: str, entry: object, data_length: int, source: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{source}: tensor {brief(name)} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise CheckpointError(f"{source}: tensor {brief(name)} has unsupported dtype {brief(dtype)}")
    # ``type(x) is int``: JSON numbers that are integers parse to exact ints; booleans are not integers.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{source}: tensor {brief(name)} has a malformed shape {brief(shape)}")
    check_ndim(name, len(shape), source)
    if (
        not (isinstance(offsets, list) and len(offsets) == 2 and type(offsets[0]) is type(offsets[1]) is int)
        or not 0 <= offsets[0] <= offsets[1] <= data_length
    ):
        raise CheckpointError(f"{source}: tensor {brief(name)} has data_offsets {brief(offsets)} outside the data buffer")
    span = offsets[1] - offsets[0]
    # Exact and bounded: a hostile shape must neither overflow into a matching length nor cost time.
    nbytes = 0 if 0 in shape else _capped_product(shape, _ITEMSIZE[dtype], span + 1)
    if nbytes != span:
        raise CheckpointError(f"{source}: tensor {brief(name)} byte length does not match shape {brief(shape)} and dtype {dtype}")
    if nbytes == 0 and _capped_product([d for d in shape if d], _ITEMSIZE[dtype], _MAX_EXTENT) >= _MAX_EXTENT:
        raise CheckpointError(f"{source}: tensor {brief(name)} has shape {brief(shape)}, too large for any array library")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def parse_header(
    text: bytes | bytearray | memoryview, data_length: int, source: str
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate header JSON of a container with ``data_length`` data bytes (SPEC 6.3 items 4-11).

    Returns ``(tensors, metadata)``. Checks every entry and that the spans tile the data buffer, all
    before any tensor byte is looked at. Work and memory are linear in the header's size.
    """
    try:
        header = parse_json(str(text, "utf-8"))  # decodes the buffer in place, without a bytes copy
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        raise CheckpointError(f"{source}: safetensors header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{source}: __metadata__ must map strings to strings")
    tensors = {name: _tensor_info(name, entry, data_length, source) for name, entry in header.items()}
    position = 0
    for begin, end, name in sorted((info.begin, info.end, name) for name, info in tensors.items()):
        if begin != position:
            raise CheckpointError(f"{source}: tensor {brief(name)} leaves a gap or overlaps in the data buffer")
        position = end
    if position != data_length:
        raise CheckpointError(f"{source}: data buffer has {data_length - position} trailing bytes not owned by any tensor")
    return tensors, metadata


class _Container:
    """A validated container whose tensors are read on request, each into one new array."""

    header: SafetensorsHeader
    source: str

    def _fill(self, out: memoryview, offset: int, what: str) -> None:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new, writable array (BF16 widened to float32 exactly).

        Raises:
            KeyError: the container has no tensor ``name``.
            CheckpointError: the file ended before the tensor's bytes (it changed after it was opened).

        """
        info = self.header.tensors[name]
        raw = np.empty(info.shape, dtype=np.dtype("<u2") if info.dtype == "BF16" else _NUMPY_DTYPES[info.dtype])
        self._fill(raw.reshape(-1).view(np.uint8).data, self.header.data_start + info.begin, f"tensor {brief(name)}")
        return bf16_to_float32(raw) if info.dtype == "BF16" else raw

    def close(self) -> None:
        """Release what the container holds open (nothing for bytes); later reads may fail."""

    def __enter__(self) -> _Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsBuffer(_Container):
    """A container held in memory (bytes): header validated on construction, tensors copied out on read."""

    def __init__(self, blob: bytes | bytearray | memoryview, source: str = "<bytes>") -> None:
        """Validate the container in ``blob``; raises :class:`CheckpointError` on any defect."""
        self.source = source
        self._view = memoryview(blob).cast("B")
        n = header_length(self._view[:8], len(self._view), source)
        tensors, metadata = parse_header(self._view[8 : 8 + n], len(self._view) - 8 - n, source)
        self.header = SafetensorsHeader(tensors, metadata, 8 + n)

    def _fill(self, out: memoryview, offset: int, what: str) -> None:
        out[:] = self._view[offset : offset + len(out)]


def _require_regular(mode: int, source: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{source}: no such checkpoint file")
    raise CheckpointError(f"{source}: is {special_file_kind(mode)}, not a regular file")


class SafetensorsFile(_Container):
    """A container file, opened once: header read with bounded reads and validated, tensors read on request.

    Use as a context manager or call :meth:`close`. Not safe for concurrent use from several threads.
    """

    def __init__(self, path: str | os.PathLike[str], source: str | None = None) -> None:
        """Open and validate ``path``; see :func:`open_safetensors`."""
        self.source = source = str(path) if source is None else source
        try:
            _require_regular(os.stat(path).st_mode, source)  # no open() of FIFOs or devices at all
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise CheckpointError(f"{source}: no such checkpoint file") from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise CheckpointError(f"{source}: no such checkpoint file (a loop of symbolic links)") from None
        self._file = io.FileIO(fd, "rb", closefd=True)
        try:
            st = os.fstat(fd)
            _require_regular(st.st_mode, source)  # it may have been swapped since the stat above
            prefix = bytearray(8)
            self._fill(memoryview(prefix)[: min(8, st.st_size)], 0, "the header length")
            n = header_length(bytes(prefix), st.st_size, source)
            text = bytearray(n)
            self._fill(memoryview(text), 8, "the header")
            tensors, metadata = parse_header(text, st.st_size - 8 - n, source)
            self.header = SafetensorsHeader(tensors, metadata, 8 + n)
        except BaseException:
            self._file.close()
            raise

    def _fill(self, out: memoryview, offset: int, what: str) -> None:
        self._file.seek(offset)
        done = 0
        while done < len(out):
            got = self._file.readinto(out[done:])
            if not got:
                raise CheckpointError(f"{self.source}: the file ended while reading {what} (was it changed after it was opened?)")
            done += got

    def close(self) -> None:
        """Close the file; later reads fail."""
        self._file.close()


def open_safetensors(path: str | os.PathLike[str], source: str | None = None) -> SafetensorsFile:
    """Open the container file at ``path`` and validate its header (SPEC 6.3 items 1-11) before reading data.

    The header length is read first (8 bytes) and checked against :data:`MAX_HEADER_BYTES` and the
    file's size; then exactly N bytes of header are read and validated. ``source`` names the file
    in messages (default: the path).

    Raises:
        CheckpointError: no such file (or a directory), not a regular file, or any container defect.

    """
    return SafetensorsFile(path, source)


def read_header(blob: bytes | bytearray | memoryview, source: str = "<bytes>") -> SafetensorsHeader:
    """Validate the container in ``blob`` from its header alone and describe it (no tensor is decoded)."""
    return SafetensorsBuffer(blob, source).header


def decode(blob: bytes | bytearray | memoryview, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``(tensors, metadata)``, validating the whole container first.

    BF16 tensors come back widened to float32 (exactly). Raises :class:`CheckpointError` on any defect.
    """
    container = SafetensorsBuffer(blob, source)
    return {name: container.read(name) for name in container.header.tensors}, dict(container.header.metadata)


def read_dtypes(blob: bytes | bytearray | memoryview, source: str = "<bytes>") -> dict[str, str]:
    """The stored dtype code of every tensor (``decode`` widens BF16, so this keeps the original)."""
    return read_header(blob, source).dtypes


def _stored_form(name: str, arr: np.ndarray, as_bf16: bool) -> tuple[np.ndarray, str]:
    """The little-endian array whose bytes store ``arr``, and its safetensors dtype code."""
    if as_bf16:
        return float32_to_bf16(arr.astype(np.float32)).astype("<u2"), "BF16"
    code = dtype_code(arr.dtype)
    if code is None:
        raise CheckpointError(f"tensor {brief(name)} has dtype {arr.dtype}, which safetensors cannot store")
    return np.ascontiguousarray(arr.astype(_NUMPY_DTYPES[code], copy=False)), code


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
    chunks: list[memoryview] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        payload, code = _stored_form(name, arr, name in bf16)
        chunks.append(payload.reshape(-1).view(np.uint8).data)  # a view: each tensor's bytes are copied once, by join
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + payload.nbytes]}
        offset += payload.nbytes
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # align the data buffer to 8 bytes, as the reference library does
    return b"".join([len(text).to_bytes(8, "little"), text, *chunks])


__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_NDIM",
    "SafetensorsBuffer",
    "SafetensorsFile",
    "SafetensorsHeader",
    "TensorInfo",
    "TensorSpec",
    "atomic_write_bytes",
    "bf16_to_float32",
    "check_ndim",
    "decode",
    "dtype_code",
    "encode",
    "float32_to_bf16",
    "header_length",
    "open_safetensors",
    "parse_header",
    "read_dtypes",
    "read_header",
]
