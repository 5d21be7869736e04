"""Reading a PEFT adapter directory: its files, read once each into one :class:`PeftDirectory`.

Every later step works on that snapshot, so no file is read or parsed twice, whichever steps run.

All files of one snapshot come from one version of the directory, even while a writer replaces it
(our writers swap in a complete new directory, :mod:`randlora_peft.publish`): the directory is
opened once and each file is opened relative to that descriptor (``openat``), so a swap in the
middle cannot hand us files of two versions. If the path names another directory once the files
are read (a swap happened meanwhile, and the old version may be half deleted), the snapshot is
read again from the new one.

Only regular files are read (a FIFO or device in their place is refused without blocking), and
JSON files are size-checked before they are read (:data:`~randlora_peft.limits.MAX_JSON_BYTES`).
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from randlora_peft.layout import PEFT_CONFIG_NAME, PEFT_PICKLE_NAME, PEFT_WEIGHTS_NAME
from randlora_peft.limits import MAX_JSON_BYTES, strict_json
from randlora_peft.sidecar import SIDECAR_NAME
from randlora_spec.errors import CheckpointError

_ATTEMPTS = 8
"""Times a snapshot is read again when the directory is swapped while it is read."""
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _read_fd(fd: int, source: str, limit: int | None) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{source}: not a regular file")
    if limit is not None and st.st_size > limit:
        raise CheckpointError(f"{source}: is {st.st_size} bytes, over the {limit}-byte limit for a JSON file")
    data = io.FileIO(fd, "rb", closefd=False).readall()
    if limit is not None and len(data) > limit:
        raise CheckpointError(f"{source}: grew over the {limit}-byte limit for a JSON file while it was read")
    return data


def read_file(path: str | Path, dir_fd: int | None = None, limit: int | None = None, source: str | None = None) -> bytes:
    """The bytes of a regular file: every file randlora-peft reads is read by this function, once.

    Args:
        path: the file (relative to ``dir_fd`` when given).
        dir_fd: an open directory descriptor ``path`` is relative to.
        limit: refuse files larger than this many bytes, before reading them.
        source: the name used in messages (default: ``path``).

    Raises:
        FileNotFoundError: no such file (callers decide whether that is an error).
        CheckpointError: not a regular file, or over ``limit``.

    """
    fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    try:
        return _read_fd(fd, str(path) if source is None else source, limit)
    finally:
        os.close(fd)


def read_json_file(path: Path, what: str) -> Any:
    """The JSON value in the file at ``path`` (``what`` it is, for messages); strict JSON, 4 MiB at most."""
    try:
        raw = read_file(path, limit=MAX_JSON_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    return strict_json(raw, str(path))


@dataclass
class PeftDirectory:
    """The files of one PEFT adapter directory, read once: config (parsed), weights and sidecar (raw)."""

    path: Path
    config: dict[str, Any]
    weights: bytes | None
    """``adapter_model.safetensors``, or ``None`` when absent."""
    has_pickle: bool
    """``adapter_model.bin`` is present (it is never read)."""
    sidecar: bytes | None
    """``randlora_layers.json``, or ``None`` when absent."""
    config_bytes: int = 0
    """Size of ``adapter_config.json``."""

    @property
    def weights_source(self) -> str:
        """The weights file's path, for messages."""
        return str(self.path / PEFT_WEIGHTS_NAME)

    @property
    def sidecar_source(self) -> str:
        """The sidecar's path, for messages."""
        return str(self.path / SIDECAR_NAME)

    @property
    def size(self) -> int:
        """Bytes of the adapter files read (config, weights and sidecar)."""
        return self.config_bytes + len(self.weights or b"") + len(self.sidecar or b"")


def _open_directory(directory: Path) -> int:
    try:
        return os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(
            f"{directory}: not a directory (expected a PEFT adapter directory with {PEFT_CONFIG_NAME})"
        ) from None


def _member(dir_fd: int, directory: Path, name: str, limit: int | None = None) -> bytes | None:
    try:
        return read_file(name, dir_fd=dir_fd, limit=limit, source=str(directory / name))
    except FileNotFoundError:
        return None


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _config(dir_fd: int, directory: Path) -> tuple[dict[str, Any], int]:
    raw = _member(dir_fd, directory, PEFT_CONFIG_NAME, MAX_JSON_BYTES)
    if raw is None:
        raise CheckpointError(f"{directory}: no {PEFT_CONFIG_NAME}; not a PEFT adapter directory")
    path = directory / PEFT_CONFIG_NAME
    data = strict_json(raw, str(path))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data, len(raw)


def _same_directory(dir_fd: int, directory: Path) -> bool:
    """The path still names the directory that ``dir_fd`` holds open."""
    try:
        now = os.stat(directory)
    except OSError:
        return False
    held = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _snapshot(dir_fd: int, directory: Path) -> PeftDirectory:
    config, config_bytes = _config(dir_fd, directory)
    return PeftDirectory(
        path=directory,
        config=config,
        weights=_member(dir_fd, directory, PEFT_WEIGHTS_NAME),
        has_pickle=_exists(dir_fd, PEFT_PICKLE_NAME),
        sidecar=_member(dir_fd, directory, SIDECAR_NAME, MAX_JSON_BYTES),
        config_bytes=config_bytes,
    )


def read_peft_directory(peft_dir: str | Path) -> PeftDirectory:
    """Read the adapter files of ``peft_dir``, all from one version of it (see the module docstring)."""
    directory = Path(peft_dir)
    for _ in range(_ATTEMPTS):
        dir_fd = _open_directory(directory)
        try:
            try:
                snapshot = _snapshot(dir_fd, directory)
            except CheckpointError:
                if _same_directory(dir_fd, directory):
                    raise
                continue  # swapped while read: what was missing or half written may be complete now
            if _same_directory(dir_fd, directory):
                return snapshot
        finally:
            os.close(dir_fd)
    raise CheckpointError(f"{directory}: the directory was replaced {_ATTEMPTS} times while it was being read")


def read_peft_config(peft_dir: str | Path) -> dict[str, Any]:
    """The raw content of ``adapter_config.json`` in ``peft_dir`` (a JSON object)."""
    directory = Path(peft_dir)
    dir_fd = _open_directory(directory)
    try:
        return _config(dir_fd, directory)[0]
    finally:
        os.close(dir_fd)


def directory_bytes(peft_dir: str | Path) -> int:
    """Bytes of a PEFT adapter directory's adapter files (config, weights and our sidecar, when present)."""
    directory = Path(peft_dir)
    names = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, SIDECAR_NAME)
    return sum((directory / n).stat().st_size for n in names if (directory / n).is_file())
