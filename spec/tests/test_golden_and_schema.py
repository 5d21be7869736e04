import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from randlora_spec.config import json_schema
from randlora_spec.golden import load_cases

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "spec" / "golden"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_golden_fixtures_are_current_and_regeneration_is_byte_identical():
    make_golden = _tool("make_golden")
    first, second = make_golden.build(), make_golden.build()
    assert first == second
    golden = GOLDEN
    on_disk = {str(p.relative_to(golden)) for p in golden.rglob("*") if p.is_file()}
    assert on_disk == set(first)
    assert all((golden / p).read_bytes() == blob for p, blob in first.items())
    assert make_golden.main(["--check"]) == 0
    assert sum(len(b) for b in first.values()) < 5_000_000


def test_manifest_covers_the_required_cases():
    cases = load_cases(GOLDEN)
    kinds = {c.kind for c in cases}
    assert kinds == {"bases", "forward", "backward", "merge", "checkpoint"}
    assert {c.dtype for c in cases if c.kind == "forward"} == {"float64", "float32"}
    assert {c.params["basis_kind"] for c in cases if c.kind == "bases"} == {"dense", "sparse", "very_sparse"}
    layer = [c for c in cases if c.kind == "forward"]
    assert any(c.params["fan_in_fan_out"] for c in layer)
    assert any(len(c.params["active"]) == 2 for c in layer)
    assert any(c.inputs["x"].ndim == 3 for c in layer)
    assert any(c.params["in_features"] > c.params["out_features"] for c in layer)
    assert any(c.params["in_features"] < c.params["out_features"] for c in layer)
    assert any(not c.params["has_bias"] for c in layer)
    assert any(
        c.params["adapters"][n]["r"] > min(c.params["in_features"], c.params["out_features"])
        for c in layer
        for n in c.params["adapters"]
    )
    ckpts = [c for c in cases if c.kind == "checkpoint"]
    assert {"checkpoint-with-bases", "checkpoint-without-bases"} <= {c.id for c in ckpts}
    assert all(np.isfinite(v).all() for c in cases for v in c.expected.values())


def test_schema_file_is_current():
    committed = json.loads((ROOT / "spec" / "schema" / "randlora-config.schema.json").read_text())
    assert committed == json_schema()
    assert _tool("export_schema").main(["--check"]) == 0


def test_schema_expresses_the_numeric_rules():
    props = json_schema()["properties"]
    assert props["r"]["minimum"] == 1
    assert props["randlora_alpha"]["exclusiveMinimum"] == 0
    assert props["randlora_dropout"]["exclusiveMaximum"] == 1
    assert props["projection_prng_key"]["exclusiveMaximum"] == 2**64


@pytest.mark.parametrize("tool", ["make_golden", "export_schema"])
def test_tool_run_without_its_dependencies_exits_2_with_one_line_naming_the_module(tool):
    # -S keeps site-packages off sys.path, so this interpreter lacks numpy and pydantic exactly as a
    # bare Python outside the golden session's venv does; exit 2 keeps it apart from "fixtures differ" (1).
    command = [sys.executable, "-I", "-S", str(ROOT / "tools" / f"{tool}.py"), "--check"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "'numpy'" in result.stderr
    assert "nox -s golden" in result.stderr
