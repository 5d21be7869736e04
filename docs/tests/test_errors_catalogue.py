"""docs/errors.md and the catalogue tests stay in sync: every row has a test, every tested id a row."""

from __future__ import annotations

import re
from pathlib import Path

from randlora_spec.testing.catalogue import ROW_ID, rows

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"
TEST_DIRS = [ROOT / "spec" / "tests", *sorted((ROOT / "packages").glob("*/tests"))]
BUILTIN_OK = {"FileNotFoundError", "IsADirectoryError"}


def ids_in_tests() -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for directory in TEST_DIRS:
        for path in sorted(directory.glob("test_*.py")):
            for row_id in set(ROW_ID.findall(path.read_text(encoding="utf-8"))):
                found.setdefault(row_id, []).append(path)
    return found


def test_every_row_has_a_test_and_every_test_a_row() -> None:
    documented = set(rows(DOC))
    tested = ids_in_tests()
    assert sorted(documented - tested.keys()) == [], "rows of docs/errors.md without a test"
    assert sorted(tested.keys() - documented) == [], "row ids used by tests but missing from docs/errors.md"
    shared = {k: v for k, v in tested.items() if len(v) > 1}
    assert shared == {}, "a row id is tested in more than one file"


def test_catalogue_is_large_and_well_formed() -> None:
    table = rows(DOC)
    assert len(table) >= 40
    assert all(r.entry_point and r.bad_input and r.message for r in table.values())
    names = {"ConfigError", "BasisRuleError", "CheckpointError", "ShapeError", "DtypeError"}
    names |= {"AdapterNotFoundError", "TargetModuleError", "MergeError"}
    for r in table.values():
        assert r.exception in names | BUILTIN_OK or r.pending, f"{r.id}: {r.exception} is not in the hierarchy"


def test_ids_are_in_order() -> None:
    ids = [m[1] for m in re.finditer(r"^\|\s*(ERR-\d{3})\s*\|", DOC.read_text(encoding="utf-8"), re.M)]
    assert ids == sorted(ids)
