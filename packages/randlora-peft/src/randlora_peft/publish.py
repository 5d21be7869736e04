"""Putting converted output in place atomically: a whole PEFT directory, or one checkpoint file.

A PEFT adapter is three files that must agree, so replacing them one by one (each atomically)
still leaves moments, and after a crash a state, where the directory holds some files of the old
adapter and some of the new one: it loads without error and computes neither. Instead
:func:`publish_directory` builds the complete new directory as a hidden sibling
``.<name>.<random>.tmp``, fsyncs every file and the directory, and then swaps it in with one
``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+; ext4, xfs, btrfs, tmpfs, overlayfs): the path names
the old complete directory until that instant and the new complete directory after it. The old
version then sits at the hidden name and is deleted. A new DST is put in place with
``renameat2(RENAME_NOREPLACE)``, so a DST that appeared meanwhile is never clobbered without
``overwrite``. Readers that open the files of one directory through one directory descriptor
(:mod:`randlora_peft.directory`) therefore see the old adapter or the new one, never a mix; a
crash at any point leaves DST as it was or complete and new (plus, at worst, a hidden sibling that
is safe to delete when no conversion runs).

Where ``renameat2`` is unavailable (another OS, or a file system without the flags), the swap falls
back to two renames, DST -> ``.<name>.<random>.old`` then the new directory -> DST: between them
DST does not exist (a reader gets "not a directory"; never a mix), and a crash exactly there
leaves the old version at the ``.old`` name.

Entries of the old directory other than the ones written (PEFT's README.md, subdirectories of
other adapters) are carried into the new one as hard links (copies where links are impossible).
New files and directories get the mode the umask implies; a replaced file or directory keeps its
permission bits. Operating-system errors (no permission, a full disk) pass through; whatever
fails, the temporary directory is removed and DST is left as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from randlora_spec.errors import CheckpointError

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL), getattr(errno, "EOPNOTSUPP", errno.EINVAL))
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


class _Renameat2UnsupportedError(Exception):
    """``renameat2`` with the requested flag is not available here."""


class _TargetExistsError(Exception):
    """The target exists and may not be replaced."""


def _renameat2_function() -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:  # pragma: no cover - no C library to load (not Linux/glibc)
        return None


_RENAMEAT2 = _renameat2_function()


def renameat2(dir_fd: int, src: str, dst: str, flags: int) -> None:
    """``renameat2(dir_fd, src, dir_fd, dst, flags)``; raises ``OSError`` as the system call fails.

    Raises:
        _Renameat2UnsupportedError: the C library or the file system does not support it.

    """
    if _RENAMEAT2 is None:
        raise _Renameat2UnsupportedError
    if _RENAMEAT2(dir_fd, os.fsencode(src), dir_fd, os.fsencode(dst), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        raise _Renameat2UnsupportedError
    raise OSError(code, os.strerror(code), dst)


@contextlib.contextmanager
def created_parents(target: Path) -> Iterator[None]:
    """Create the missing parent directories of ``target``; remove the ones created if the block fails."""
    missing = []
    parent = target.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in missing:  # deepest first; one that is no longer empty stays
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def _exists_error(target: Path) -> CheckpointError:
    return CheckpointError(f"{target} exists; pass --overwrite to replace it")


def _mode_of(dir_fd: int, name: str) -> int | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode)


def write_new_file(dir_fd: int, name: str, data: bytes, mode: int | None = None) -> None:
    """Create ``name`` (which must not exist) in ``dir_fd`` holding ``data``, fsynced; ``mode`` or the umask's."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666, dir_fd=dir_fd)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(dir_fd: int, name: str, make: bool) -> str:
    for _ in range(100):
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        if not make:
            return tmp
        try:
            os.mkdir(tmp, 0o777, dir_fd=dir_fd)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary name", name)  # pragma: no cover


def _carry(parent: Path, old: str, new: str, skip: set[str]) -> None:
    """Hard-link (else copy) the entries of ``parent/old`` not in ``skip`` into ``parent/new``."""
    for entry in os.scandir(parent / old):
        if entry.name in skip:
            continue
        target = parent / new / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
            for directory, _, _ in os.walk(target):  # the new entries must survive a power loss too
                _fsync_directory(directory)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            _link_or_copy(entry.path, target)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _swap(dir_fd: int, tmp: str, name: str, overwrite: bool) -> str | None:
    """Put ``tmp`` at ``name``; returns where the old version now is (``None`` if there was none)."""
    for _ in range(100):
        try:
            renameat2(dir_fd, tmp, name, RENAME_NOREPLACE)
            return None
        except FileExistsError:
            if not overwrite:
                raise _TargetExistsError from None
        try:
            renameat2(dir_fd, tmp, name, RENAME_EXCHANGE)
            return tmp
        except FileNotFoundError:
            continue  # removed between the two calls: try again as a new DST
    raise CheckpointError(f"{name}: it kept appearing and disappearing while being replaced")  # pragma: no cover


def _swap_without_renameat2(dir_fd: int, tmp: str, name: str, overwrite: bool) -> str | None:
    if _mode_of(dir_fd, name) is None:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # an empty directory that appeared would be replaced
        return None
    if not overwrite:
        raise _TargetExistsError
    old = _temporary_name(dir_fd, name, make=False).removesuffix(".tmp") + ".old"
    os.rename(name, old, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return old


def _put_in_place(dir_fd: int, tmp: str, name: str, overwrite: bool) -> str | None:
    try:
        return _swap(dir_fd, tmp, name, overwrite)
    except _Renameat2UnsupportedError:
        return _swap_without_renameat2(dir_fd, tmp, name, overwrite)


def _remove_tree(parent: Path, dir_fd: int, name: str) -> None:
    """Remove the tree ``name`` in ``parent`` (open as ``dir_fd``), ignoring errors; by path before Python 3.11."""
    if sys.version_info >= (3, 11):
        shutil.rmtree(name, dir_fd=dir_fd, ignore_errors=True)
    else:  # shutil.rmtree has no dir_fd before Python 3.11
        shutil.rmtree(parent / name, ignore_errors=True)


def _fill(parent: Path, dir_fd: int, tmp: str, name: str, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into the new directory ``tmp``, with the old version's modes and other entries."""
    old_fd = None
    if _mode_of(dir_fd, name) is not None:
        old_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    tmp_fd = os.open(tmp, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        if old_fd is not None:
            os.chmod(tmp_fd, stat.S_IMODE(os.fstat(old_fd).st_mode))
        for member, data in files.items():
            write_new_file(tmp_fd, member, data, _mode_of(old_fd, member) if old_fd is not None else None)
        if old_fd is not None:
            _carry(parent, name, tmp, set(files))
        os.fsync(tmp_fd)
    finally:
        os.close(tmp_fd)
        if old_fd is not None:
            os.close(old_fd)


def _resolved(target: Path) -> Path:
    if not target.is_symlink():
        return target
    real = Path(os.path.realpath(target))
    if not real.is_dir():
        raise CheckpointError(f"{target}: is a symbolic link to something that is not a directory; refusing to write through it")
    return real


def publish_directory(files: Mapping[str, bytes], target: str | Path, overwrite: bool = True) -> Path:
    """Make ``target`` a directory holding ``files`` (name -> bytes), atomically (see the module docstring).

    Args:
        files: the files to write, by name.
        target: the directory; its missing parents are created (and removed again on failure).
        overwrite: replace an existing ``target``; when false an existing one raises :class:`CheckpointError`.

    Returns:
        ``target``.

    """
    given = Path(target)
    path = _resolved(given)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{given}: exists and is not a directory")
    with created_parents(path):
        dir_fd = os.open(path.absolute().parent, _DIR_FLAGS)
        try:
            tmp = _temporary_name(dir_fd, path.name, make=True)
            try:
                _fill(path.absolute().parent, dir_fd, tmp, path.name, files)
                old = _put_in_place(dir_fd, tmp, path.name, overwrite)
                os.fsync(dir_fd)
            except BaseException as exc:
                _remove_tree(path.absolute().parent, dir_fd, tmp)
                if isinstance(exc, _TargetExistsError):
                    raise _exists_error(given) from None
                raise
            if old is not None:
                _remove_tree(path.absolute().parent, dir_fd, old)
        finally:
            os.close(dir_fd)
    return given


def publish_file(data: bytes, target: str | Path, overwrite: bool = True) -> Path:
    """Make ``target`` a file holding ``data``, atomically: a hidden temporary file, fsynced, renamed into place.

    Never replaces an existing file unless ``overwrite``; a new file gets the umask's mode, a
    replaced one keeps its permission bits. Missing parents are created (and removed on failure).
    """
    given = Path(target)
    path = Path(os.path.realpath(given)) if given.is_symlink() else given
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(given))
    with created_parents(path):
        dir_fd = os.open(path.absolute().parent, _DIR_FLAGS)
        try:
            tmp = _temporary_name(dir_fd, path.name, make=False)
            try:
                write_new_file(dir_fd, tmp, data, _mode_of(dir_fd, path.name))
                _put_file(dir_fd, tmp, path.name, overwrite)
                os.fsync(dir_fd)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
                if isinstance(exc, _TargetExistsError):
                    raise _exists_error(given) from None
                raise
        finally:
            os.close(dir_fd)
    return given


def _put_file(dir_fd: int, tmp: str, name: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    try:
        renameat2(dir_fd, tmp, name, RENAME_NOREPLACE)
    except FileExistsError:
        raise _TargetExistsError from None
    except _Renameat2UnsupportedError:
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # fails if name exists
        except FileExistsError:
            raise _TargetExistsError from None
        os.unlink(tmp, dir_fd=dir_fd)
