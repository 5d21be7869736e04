"""Helpers for values that come from untrusted files: strict JSON parsing and short, safe reprs.

Parsers of checkpoint headers and metadata use :func:`parse_json`, whose every failure is a
``ValueError`` (a :class:`CheckpointError` or one of json's own) with a short reason, so callers
turn one exception type into their own message. Error
messages quote hostile values through :func:`brief`, which never fails and never grows with the
value (a 16 MiB name, a list nested 900 deep or an integer of 4,000 digits stays a short text).
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

from randlora_spec.errors import CheckpointError

MAX_JSON_INT_DIGITS = 4300
"""Longest integer (in decimal digits) a JSON text may hold: Python's default int-string limit."""
JSON_INT_LIMIT = 10**MAX_JSON_INT_DIGITS
"""Integers must be below this in magnitude to be written as JSON text and read back."""


def _no_constants(name: str) -> Any:
    raise CheckpointError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CheckpointError(f"duplicate key {brief(key)} in a JSON object")
            seen.add(key)
    return obj


def parse_json(text: str | bytes) -> Any:
    """Parse strict JSON: RFC 8259 only (no ``NaN``/``Infinity``), unique object keys, bounded nesting.

    Raises:
        ValueError: for any defect (invalid UTF-8 or JSON, a duplicate key, nesting deeper than the
            interpreter's recursion limit allows, an integer of more than 4300 digits); the message
            says which.

    """
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except RecursionError:
        raise CheckpointError("JSON nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python's int-string limit, not a JSON error
            raise CheckpointError(f"an integer has more than {MAX_JSON_INT_DIGITS} digits") from None
        raise


class _BriefRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 10
        self.maxstring = self.maxother = 80
        self.maxlong = 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # the repr of a huge int is slow, and past 4300 digits it raises
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_str(self, x: str, level: int) -> str:
        # reprlib keeps the tail of a long string; the head of a key says more.
        return repr(x) if len(x) <= self.maxstring else repr(x[: self.maxstring - 3]) + "..."

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        # reprlib sorts the keys; messages show a mapping in its own order, as repr does.
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in list(x.items())[: self.maxdict]]
        return "{" + ", ".join(items) + (", ...}" if len(x) > self.maxdict else "}")


_BRIEF = _BriefRepr()


def brief(value: object) -> str:
    """A repr of ``value`` for an error message: equal to ``repr`` for short plain values, else abridged."""
    try:
        return _BRIEF.repr(value)
    except Exception:  # a value's own __repr__ may fail; the message must not
        return f"<{type(value).__name__}>"
