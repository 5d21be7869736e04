#!/usr/bin/env python3
"""Export RandLoraConfig's JSON Schema to spec/schema/randlora-config.schema.json.

``--check`` exits 1 when the committed file differs from what the current schema produces.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "spec" / "src"))

try:
    from randlora_spec.config import json_schema
except ModuleNotFoundError as exc:  # a Python without randlora-spec's dependencies (numpy, pydantic)
    print(
        f"export_schema.py needs the Python module {exc.name!r}: run `nox -s golden`, or `pip install ./spec` first",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

SCHEMA_PATH = ROOT / "spec" / "schema" / "randlora-config.schema.json"


def render() -> str:
    """The schema as committed: sorted keys, two-space indent, trailing newline."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the schema, or compare it with the committed file under ``--check``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        ok = current == text
        print(f"schema check: {'OK' if ok else 'STALE: run python tools/export_schema.py'}")
        return 0 if ok else 1
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
