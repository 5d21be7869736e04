"""Running a function in a forked child process: its exit status or killing signal, and what it printed.

Forking keeps the parent's imports (torch, PEFT), so a child costs milliseconds, not the seconds a
fresh interpreter takes; that is what lets the crash tests run dozens of trials on a 2-core machine.
The children run little torch work (tiny tensors, one thread), so no OpenMP pool is involved.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Result:
    """How a forked child ended."""

    status: int | None
    """Exit status, or ``None`` when a signal killed it."""
    signal: int | None
    """The signal that killed it, or ``None``."""
    stdout: str
    stderr: str


def run_forked(fn: Callable[[], int], timeout: float = 120.0) -> Result:
    """Run ``fn`` in a forked child (its return value is the exit status); SIGKILL it after ``timeout`` seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = os.fdopen(1, "w", closefd=False)
                sys.stderr = os.fdopen(2, "w", closefd=False)
                code = fn()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        status = _wait(pid, timeout)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if os.WIFSIGNALED(status):
        return Result(None, os.WTERMSIG(status), *text)
    return Result(os.WEXITSTATUS(status), None, *text)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.01)


def start_forked(fn: Callable[[], int]) -> int:
    """Start ``fn`` in a forked child with its output discarded; returns the pid (reap it with :func:`wait_forked`)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = fn()
        finally:
            os._exit(code)
    return pid


def wait_forked(pid: int, timeout: float = 120.0) -> int:
    """The exit status of a child from :func:`start_forked` (-signal when killed)."""
    status = _wait(pid, timeout)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_at_event(module_file: str, k: int) -> Callable[[], None]:
    """A profile hook that SIGKILLs this process at the ``k``-th call event made from code in ``module_file``.

    Every Python and C call made by that module's code counts (``os.write``, ``os.fsync``, the
    renames), so ``k`` picks a point in its sequence of system-level steps deterministically.
    """
    count = 0

    def hook(frame: object, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call") and frame.f_code.co_filename == module_file:  # type: ignore[attr-defined]
            count += 1
            if count == k:
                os.kill(os.getpid(), signal.SIGKILL)

    def install() -> None:
        sys.setprofile(hook)

    install.count = lambda: count  # type: ignore[attr-defined]
    return install
