"""The error catalogue of docs/errors.md as data, and the checks every catalogue test shares.

Each row of the table in ``docs/errors.md`` has an id ``ERR-NNN``, the entry point, the bad input,
the exception type and the message the user sees. In the message column, ``…`` stands for a
variable part (a path, a number); the other pieces must appear in the exception's message in that
order. Tests in every package load this module by path (:func:`load`) and call :func:`check` with
the row id, so the table and the tests cannot drift apart: ``docs/tests/test_errors_catalogue.py``
also checks that every row has a test and every test id a row.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
ROW_ID = re.compile(r"ERR-\d{3}")
_ROW = re.compile(r"^\|\s*(ERR-\d{3})\s*\|(.*)\|\s*$")


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


def rows(doc: Path = DOC) -> dict[str, Row]:
    """Every row of the catalogue table, by id (duplicate ids are an error)."""
    out: dict[str, Row] = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        if not _ROW.match(line):
            continue
        cells = _cells(line.strip())[1:-1]
        if len(cells) != 5:
            raise AssertionError(f"{doc}: row needs 5 columns: {line}")
        row_id, entry, bad, exc, message = cells
        if row_id in out:
            raise AssertionError(f"{doc}: duplicate row id {row_id}")
        name = re.search(r"`([^`]+)`", exc)
        out[row_id] = Row(row_id, entry, bad, name[1] if name else exc, _unquote(message), "pending" in exc)
    return out


def check(row_id: str, exc: BaseException) -> None:
    """Assert that ``exc`` is what row ``row_id`` documents: exact type name and message pieces in order."""
    row = rows()[row_id]
    name = type(exc).__name__
    assert name == row.exception, f"{row_id}: documented {row.exception}, raised {name}: {exc}"
    text, position = str(exc), 0
    for piece in row.fragments:
        found = text.find(piece, position)
        assert found >= 0, f"{row_id}: message {text!r} lacks {piece!r} (after position {position})"
        position = found + len(piece)
    if row.exception not in OS_ERRORS and not row.pending:
        from randlora_spec.errors import RandLoraError

        assert isinstance(exc, RandLoraError), f"{row_id}: {name} is not a RandLoraError"


OS_ERRORS = frozenset({"FileNotFoundError", "IsADirectoryError", "NotADirectoryError", "PermissionError", "OSError"})
"""Operating-system errors pass through unchanged (documented rows); every other row is a RandLoraError."""


def tree_state(path: Path) -> list[tuple[str, str]]:
    """Every entry below ``path`` (sorted relative names) with a SHA-256 of each file's bytes."""
    out = []
    for p in sorted(path.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        out.append((str(p.relative_to(path)), digest))
    return out


def model_state(model: object) -> dict[str, object]:
    """Everything observable about a torch model, bit for bit.

    Parameters and buffers (non-persistent ones too) as raw bytes with dtype, shape and
    ``requires_grad``; the module tree (names and types); for a RandLoraModel its adapters, their
    configs, the active and the merged ones.
    """
    import torch

    def raw(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
        flat = t.detach().cpu().contiguous().reshape(-1)
        return str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes()

    state: dict[str, object] = {}
    for name, param in model.named_parameters(remove_duplicate=False):  # type: ignore[attr-defined]
        state[f"param:{name}"] = (*raw(param), param.requires_grad)
    for name, buf in model.named_buffers(remove_duplicate=False):  # type: ignore[attr-defined]
        state[f"buffer:{name}"] = raw(buf)
    state["modules"] = [(n, type(m).__qualname__) for n, m in model.named_modules(remove_duplicate=False)]  # type: ignore[attr-defined]
    if hasattr(model, "peft_config") and isinstance(model.peft_config, dict):
        state["configs"] = {k: getattr(v, "to_json", lambda v=v: repr(v))() for k, v in model.peft_config.items()}
        state["active"] = list(getattr(model, "active_adapters", []))
        state["merged"] = list(getattr(model, "merged_adapters", []))
    return state
