"""The error catalogue of docs/errors.md as data, and the checks every catalogue test shares.

Each row of the table in ``docs/errors.md`` has an id ``ERR-NNN``, the entry point, the bad input,
the exception type and the message the user sees. In the message column, ``…`` stands for a
variable part (a path, a number); the other pieces must appear in the exception's message in that
order. Each package's catalogue test registers one setup per row (:class:`Setups`) and calls
:func:`check_row`, so the table and the tests cannot drift apart;
``docs/tests/test_errors_catalogue.py`` also checks that every row has a test and every test id a row.

Malformed tables and failed checks are reported with ``assert``: this module serves test runs.
"""

from __future__ import annotations

import functools
import hashlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from randlora_spec.errors import RandLoraError
from randlora_spec.testing.checkout import errors_doc

ROW_ID = re.compile(r"ERR-\d{3}")
_ROW = re.compile(r"^\|\s*(ERR-\d{3})\s*\|(.*)\|\s*$")

OS_ERRORS = frozenset({"FileNotFoundError", "IsADirectoryError", "NotADirectoryError", "PermissionError", "OSError"})
"""Operating-system errors pass through unchanged (documented rows); every other row is a RandLoraError."""


@dataclass(frozen=True)
class Row:
    """One row of the catalogue."""

    id: str
    entry_point: str
    bad_input: str
    exception: str
    message: str
    pending: bool = False
    """The package is still under development: the documented exception is not yet a RandLoraError."""

    @property
    def fragments(self) -> list[str]:
        """The fixed pieces of the message, in order."""
        return [piece for piece in self.message.split("…") if piece]


def _cells(line: str) -> list[str]:
    # Split on '|' outside backticks (messages may contain '|').
    cells, current, in_code = [], "", False
    for ch in line:
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(current)
            current = ""
        else:
            current += ch
    cells.append(current)
    return [c.strip() for c in cells]


def _unquote(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if len(cell) >= 2 and cell[0] == cell[-1] == "`" else cell


@functools.lru_cache(maxsize=4)
def _rows(doc: Path) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        if not _ROW.match(line):
            continue
        cells = _cells(line.strip())[1:-1]
        assert len(cells) == 5, f"{doc}: row needs 5 columns: {line}"
        row_id, entry, bad, exc, message = cells
        assert row_id not in out, f"{doc}: duplicate row id {row_id}"
        name = re.search(r"`([^`]+)`", exc)
        out[row_id] = Row(row_id, entry, bad, name[1] if name else exc, _unquote(message), "pending" in exc)
    return out


def rows(doc: Path | None = None) -> dict[str, Row]:
    """Every row of the catalogue table, by id (duplicate ids are an error); ``doc`` defaults to docs/errors.md."""
    return dict(_rows((doc or errors_doc()).resolve()))


def check(row_id: str, exc: BaseException, doc: Path | None = None) -> None:
    """Assert that ``exc`` is what row ``row_id`` documents: exact type name and message pieces in order."""
    row = rows(doc)[row_id]
    name = type(exc).__name__
    assert name == row.exception, f"{row_id}: documented {row.exception}, raised {name}: {exc}"
    text, position = str(exc), 0
    for piece in row.fragments:
        found = text.find(piece, position)
        assert found >= 0, f"{row_id}: message {text!r} lacks {piece!r} (after position {position})"
        position = found + len(piece)
    if row.exception not in OS_ERRORS and not row.pending:
        assert isinstance(exc, RandLoraError), f"{row_id}: {name} is not a RandLoraError"


def tree_state(path: Path) -> list[tuple[str, str]]:
    """Every entry below ``path`` (sorted relative names) with a SHA-256 of each file's bytes."""
    out = []
    for p in sorted(path.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        out.append((str(p.relative_to(path)), digest))
    return out


def check_row(
    row_id: str,
    call: Callable[[], object],
    model: Any | None,
    directory: Path,
    state: Callable[[Any], object] | None = None,
) -> None:
    """Run ``call``: it must raise what row ``row_id`` documents and leave ``model`` and ``directory`` as they were.

    ``model`` (or ``None`` when the call involves none) is compared through ``state``, a snapshot
    of everything observable about it (``randlora_core.testing.model_state`` for torch models:
    this package knows no framework); every file under ``directory`` with :func:`tree_state`.
    Warnings the call emits on its way to the error are ignored: the error is the result.
    """
    assert model is None or state is not None, "check_row: pass state= to compare a model"
    model_state = state or (lambda _model: None)
    before_model = model_state(model) if model is not None else None
    before_files = tree_state(directory)
    raised: BaseException | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except Exception as exc:  # any exception: the row says which one it must be
            raised = exc
    assert raised is not None, f"{row_id}: no exception was raised"
    check(row_id, raised)
    if model is not None:
        assert model_state(model) == before_model, f"{row_id}: the model changed"
    assert tree_state(directory) == before_files, f"{row_id}: files changed"


Setup = Callable[..., tuple[Any, Callable[[], object]]]
"""A row's setup: builds the model and files (under a directory it is given) and returns ``(model, call)``."""


class Setups(dict[str, Setup]):
    """The setups of one test file by row id; ``@setups.row("ERR-NNN")`` registers a function."""

    def row(self, row_id: str) -> Callable[[Setup], Setup]:
        """Decorator registering ``fn`` as the setup of ``row_id`` (each id once)."""

        def register(fn: Setup) -> Setup:
            assert ROW_ID.fullmatch(row_id) and row_id not in self, f"bad or repeated row id {row_id}"
            self[row_id] = fn
            return fn

        return register
