"""Putting converted files in place so that a failure leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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
