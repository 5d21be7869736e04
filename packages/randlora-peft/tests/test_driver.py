"""The ``peft`` conformance driver on a selection of golden cases (the full run is ``pytest conformance --driver peft``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from randlora_peft.driver import PeftDenseDriver, PeftDriver, PeftFactoredDriver
from randlora_spec.driver import Driver, Unsupported, discover_drivers
from randlora_spec.golden import GoldenCase, default_golden_dir, load_cases
from randlora_spec.tolerances import check_close


def _golden_dir() -> Path | None:
    try:
        return default_golden_dir()
    except FileNotFoundError:  # an installed (non-editable) spec: use the source checkout's fixtures
        candidate = Path(__file__).resolve().parents[3] / "spec" / "golden"
        return candidate if (candidate / "manifest.json").is_file() else None


GOLDEN = _golden_dir()
CASES = {case.id: case for case in load_cases(GOLDEN)} if GOLDEN is not None else {}

SELECTED = [
    "forward-in-gt-out-float32",
    "backward-fan-in-fan-out-in-gt-out-float32",
    "merge-fan-in-fan-out-float64",
    "backward-sliced-bases-float64",
    "forward-two-adapters-different-r-float32",
    "backward-two-adapters-different-r-float32",
    "merge-two-adapters-different-r-float64",
    "backward-one-of-two-active-float32",
    "forward-input-3d-float32",
    "merge-r-gt-m-float32",
    "checkpoint-without-bases",
    "checkpoint-trainable-biases",
    "checkpoint-bf16-parameters",
]


def test_registered_under_the_conformance_entry_point():
    drivers = {d.name: d for d in discover_drivers({"peft", "peft-dense", "peft-factored"})}
    assert type(drivers["peft"]) is PeftDriver and isinstance(drivers["peft"], Driver)
    assert type(drivers["peft-dense"]) is PeftDenseDriver and type(drivers["peft-factored"]) is PeftFactoredDriver


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
@pytest.mark.parametrize("driver_cls", [PeftDriver, PeftDenseDriver, PeftFactoredDriver], ids=lambda c: c.name)
@pytest.mark.parametrize("case_id", SELECTED)
def test_golden_case(case_id: str, driver_cls: type[PeftDriver]) -> None:
    case: GoldenCase = CASES[case_id]
    driver = driver_cls()
    result = driver.run(case)
    assert not isinstance(result, Unsupported), result
    assert set(result) >= set(case.expected)
    for name, expected in case.expected.items():
        actual = np.asarray(result[name])
        assert actual.shape == expected.shape, name
        ok, err, bound = check_close(actual, expected, driver.tolerance_dtype(case, name))
        assert ok, f"{case_id} {name}: {err:.3g} > {bound:.3g}"


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
def test_bases_cases_are_unsupported_with_a_reason() -> None:
    result = PeftDriver().run(CASES["bases-dense-seed0"])
    assert isinstance(result, Unsupported) and "portable" in result.reason
