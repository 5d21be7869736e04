"""Atomic, durable replacement of a file's contents (SPEC.md 6.4).

A reader of the target sees the old file or the new one, never a torn write, even if the writer is
killed at any moment. The policy for what may stand at the target:

- a regular file: replaced; the new file keeps its permission bits (``0o777`` part of the mode).
  Its owner, extended attributes and other hard links are not carried over (a new inode replaces it);
- nothing: a new file is created with the mode the process umask implies (``0o666 & ~umask``);
- a symbolic link: written through. The link is resolved to its final target and that file is
  replaced atomically in its own directory, so the link keeps pointing at the new contents. A
  dangling link or a loop of links is refused with :class:`CheckpointError`;
- a FIFO, socket or device node: refused with :class:`CheckpointError` (renaming over it would
  silently swap a special file for a regular one);
- a directory: the rename fails with ``IsADirectoryError``, as ``open()`` would.

Operating-system errors (a missing directory, no permission, a full disk) pass through unchanged.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from randlora_spec.errors import CheckpointError

_SPECIAL_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def special_file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` that is neither regular nor a directory is, for messages."""
    return _SPECIAL_KINDS.get(stat.S_IFMT(mode), "a special file")


def _final_target(target: Path) -> Path:
    """``target``, or for a symbolic link the file it finally names (which must exist)."""
    if not target.is_symlink():
        return target
    try:
        return Path(os.path.realpath(target, strict=True))
    except FileNotFoundError:
        raise CheckpointError(f"{target}: is a dangling symbolic link; refusing to write through it") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise CheckpointError(f"{target}: is a loop of symbolic links; refusing to write through it") from None


def _create_temporary(directory: Path, name: str) -> tuple[int, Path]:
    # os.open with 0o666 lets the kernel apply the umask (and any default ACL); mkstemp forces 0o600.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(directory))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically and durably (policy for symlinks and special files: module doc).

    The bytes go to a temporary file ``.<name>.<random>.tmp`` in the same directory as the file
    that is replaced, which is flushed and fsynced, then renamed over it; the directory is fsynced
    so the rename survives a crash. On any failure the temporary file is removed.

    Raises:
        CheckpointError: the target is a FIFO, socket or device node, or a dangling or looping symlink.
        OSError: as raised by the operating system (e.g. ``FileNotFoundError`` for a missing
            directory, ``IsADirectoryError`` for a directory at the target).

    """
    given = Path(path)
    target = _final_target(given)
    try:
        existing: os.stat_result | None = os.lstat(target)
    except FileNotFoundError:
        existing = None
    if existing is not None and not (stat.S_ISREG(existing.st_mode) or stat.S_ISDIR(existing.st_mode)):
        kind = special_file_kind(existing.st_mode)
        shown = given if target == given else f"{given} (-> {target})"
        raise CheckpointError(f"{shown}: is {kind}, not a regular file; refusing to replace it")
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = _create_temporary(directory, target.name)
    try:
        with os.fdopen(fd, "wb") as handle:
            if existing is not None and stat.S_ISREG(existing.st_mode):
                mode = stat.S_IMODE(existing.st_mode) & 0o777
                if hasattr(os, "fchmod"):
                    os.fchmod(handle.fileno(), mode)
                else:  # Windows before Python 3.13
                    os.chmod(tmp, mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
