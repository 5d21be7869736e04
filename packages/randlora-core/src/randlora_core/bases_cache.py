"""An optional on-disk cache of generated basis tensors, verified by SHA-256 before any value is used.

Off by default. ``RANDLORA_BASES_CACHE=<directory>`` turns it on for every CPU basis of at least
:data:`MIN_BYTES` that :func:`randlora_core.bases.generate_basis` makes (the two tensors of a
7B-sized model's allocation, not the small ones of tests); :func:`set_bases_cache` does the same from
code. A second load of the same model then reads its bases instead of generating them.

An entry is one basis tensor, keyed by everything its values depend on (:class:`BasisKey`: rule,
seed, tag, kind, shape, and ``m_max`` for ``very_sparse``), and stored as two files named by the
key's digest: ``<digest>.f32`` holds the raw little-endian float32 values, ``<digest>.json`` the key
and the SHA-256 of every :data:`PIECE_BYTES` piece of the values. A lookup reads the values straight
into the result tensor (pieces in parallel, no memory beyond the tensor), hashes them and returns
them only if the key, the size and every hash match; anything else (a missing, truncated, corrupted
or tampered file, unreadable JSON) is a miss, and the caller regenerates and rewrites the entry.
:mod:`randlora_core.bases` also compares a few values of every hit with the rule itself, so even a
consistently rewritten entry with wrong values is not trusted. Files are written with the spec's
atomic writer (a reader sees an old entry or a new one, never a torn file), values first, so a crash
leaves at worst values without a matching JSON: a miss.

Size bound (eviction): after each store, entries are deleted least recently used first (the JSON's
modification time, refreshed on each hit) until the values take at most ``max_bytes``
(``RANDLORA_BASES_CACHE_MAX_BYTES``, default :data:`DEFAULT_MAX_BYTES`); a tensor larger than that
is not stored. The cache never fails generation: an unwritable directory or a full disk costs a
warning and the bases are used uncached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

from randlora_spec.atomic_write import atomic_write_bytes
from randlora_spec.errors import ConfigError

CACHE_ENV = "RANDLORA_BASES_CACHE"
MAX_BYTES_ENV = "RANDLORA_BASES_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 8 << 30
"""Default bound on the cached values: room for the bases of two all-linear 70B-sized models."""
MIN_BYTES = 16 << 20
"""Smaller tensors are generated every time: the fused fill makes 16 MiB in well under 0.1 s."""
PIECE_BYTES = 64 << 20
"""Hash granularity: pieces are read and hashed in parallel on ``torch.get_num_threads()`` threads."""
FORMAT = "randlora.bases-cache/1"
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BasisKey:
    """Everything a basis tensor's values depend on under a rule; ``m_max`` only for ``very_sparse``."""

    rule: str
    seed: int
    tag: int
    kind: str
    shape: tuple[int, int, int]
    m_max: int | None

    def digest(self) -> str:
        """The entry's file stem: SHA-256 of the key's canonical JSON."""
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:40]

    def fields(self) -> dict[str, object]:
        """The key as JSON-ready fields."""
        return {**asdict(self), "shape": list(self.shape)}


def _pieces(nbytes: int) -> list[tuple[int, int]]:
    return [(start, min(start + PIECE_BYTES, nbytes)) for start in range(0, nbytes, PIECE_BYTES)]


def _parallel(tasks: list[T], fn: Callable[[T], R]) -> list[R]:
    workers = max(1, min(len(tasks), torch.get_num_threads()))
    if workers == 1:
        return [fn(t) for t in tasks]
    with ThreadPoolExecutor(workers) as pool:  # hashlib and file reads release the GIL
        return list(pool.map(fn, tasks))


def _read_and_hash(path: Path, raw: memoryview, piece: tuple[int, int]) -> str:
    """Read bytes ``piece`` of ``path`` into the same bytes of ``raw``; their SHA-256."""
    view = raw[piece[0] : piece[1]]
    with open(path, "rb", buffering=0) as handle:
        handle.seek(piece[0])
        got = 0
        while got < len(view):
            n = handle.readinto(view[got:])
            if not n:
                raise EOFError(f"{path} ended early")
            got += n
    return hashlib.sha256(view).hexdigest()


class BasesCache:
    """A directory of cached basis tensors (see the module doc for the format and the size bound)."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        """Use ``directory`` (created on the first store) with at most ``max_bytes`` of values."""
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)

    def _paths(self, key: BasisKey) -> tuple[Path, Path]:
        stem = self.directory / key.digest()
        return stem.with_suffix(".f32"), stem.with_suffix(".json")

    def load(self, key: BasisKey) -> torch.Tensor | None:
        """The cached tensor for ``key`` if its entry is complete and every hash matches, else ``None``."""
        values, meta = self._paths(key)
        nbytes = 4 * key.shape[0] * key.shape[1] * key.shape[2]
        try:
            info = json.loads(meta.read_bytes())
            if not self._describes(info, key, nbytes) or values.stat().st_size != nbytes:
                return None
            out = torch.empty(key.shape, dtype=torch.float32)
            raw = out.numpy().data.cast("B")
            if _parallel(_pieces(nbytes), lambda piece: _read_and_hash(values, raw, piece)) != info["sha256"]:
                return None
            os.utime(meta)  # recently used: evicted last
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            return None
        return out

    @staticmethod
    def _describes(info: object, key: BasisKey, nbytes: int) -> bool:
        if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("key") != key.fields():
            return False
        hashes = info.get("sha256")
        return isinstance(hashes, list) and len(hashes) == len(_pieces(nbytes))

    def store(self, key: BasisKey, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (CPU, contiguous float32 of ``key.shape``) as ``key``'s entry, then evict down to the bound."""
        nbytes = tensor.numel() * 4
        if nbytes > self.max_bytes or sys.byteorder != "little":
            return
        raw = tensor.detach().contiguous().numpy().data.cast("B")
        hashes = _parallel(_pieces(nbytes), lambda p: hashlib.sha256(raw[p[0] : p[1]]).hexdigest())
        values, meta = self._paths(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(values, raw)
            atomic_write_bytes(meta, json.dumps({"format": FORMAT, "key": key.fields(), "sha256": hashes}).encode())
            self.evict(keep=key.digest())
        except OSError as exc:
            warnings.warn(f"randlora bases cache: cannot write {values} ({exc}); bases are used uncached", stacklevel=2)

    def discard(self, key: BasisKey) -> None:
        """Delete ``key``'s entry (JSON first, so a reader never pairs the old JSON with new values)."""
        values, meta = self._paths(key)
        meta.unlink(missing_ok=True)
        values.unlink(missing_ok=True)

    def evict(self, keep: str = "") -> None:
        """Delete least recently used entries until the values take at most ``max_bytes`` (never ``keep``)."""
        entries = []
        for meta in self.directory.glob("*.json"):
            values = meta.with_suffix(".f32")
            try:
                entries.append((meta.stat().st_mtime, values.stat().st_size, meta, values))
            except OSError:
                continue  # a half-written or concurrently deleted entry holds no values we count
        total = sum(size for _, size, _, _ in entries)
        for _, size, meta, values in sorted(entries):
            if total <= self.max_bytes:
                break
            if meta.stem != keep:
                meta.unlink(missing_ok=True)
                values.unlink(missing_ok=True)
                total -= size


_configured: BasesCache | None = None


def set_bases_cache(directory: str | os.PathLike[str] | None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Cache large CPU bases in ``directory`` from now on (``None``: back to ``RANDLORA_BASES_CACHE``)."""
    global _configured
    _configured = BasesCache(directory, max_bytes) if directory is not None else None


def active_cache() -> BasesCache | None:
    """The cache set by :func:`set_bases_cache`, else the one ``RANDLORA_BASES_CACHE`` names, else ``None``.

    Raises:
        ConfigError: ``RANDLORA_BASES_CACHE_MAX_BYTES`` is not a non-negative integer.

    """
    if _configured is not None:
        return _configured
    directory = os.environ.get(CACHE_ENV, "").strip()
    if not directory:
        return None
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return BasesCache(directory)
    if not text.isdigit():
        raise ConfigError(f"{MAX_BYTES_ENV} must be a non-negative integer number of bytes, got {text!r}")
    return BasesCache(directory, int(text))
