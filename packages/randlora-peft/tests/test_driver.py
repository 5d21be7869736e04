"""The PEFT conformance drivers on a selection of golden cases (the full run is ``pytest conformance --driver peft``)."""

from __future__ import annotations

import pytest

from randlora_peft.driver import PeftDenseDriver, PeftDriver, PeftFactoredDriver
from randlora_spec.driver import Driver, Unsupported, discover_drivers
from randlora_spec.golden import load_cases
from randlora_spec.testing import assert_driver_matches
from randlora_spec.testing.checkout import golden_dir


def _cases() -> dict:
    try:
        directory = golden_dir()
    except FileNotFoundError:
        return {}
    return {case.id: case for case in load_cases(directory)}


CASES = _cases()
DRIVERS = [PeftDriver, PeftDenseDriver, PeftFactoredDriver]

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
    assert {name: type(d) for name, d in drivers.items()} == {cls.name: cls for cls in DRIVERS}
    assert all(isinstance(d, Driver) for d in drivers.values())


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
@pytest.mark.parametrize(
    ("driver_cls", "case_id"),
    [pytest.param(cls, case_id, id=f"{cls.name}:{case_id}") for cls in DRIVERS for case_id in SELECTED],
)
def test_golden_case(driver_cls: type[PeftDriver], case_id: str) -> None:
    assert_driver_matches(driver_cls(), CASES[case_id])


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
def test_bases_cases_are_unsupported_with_a_reason() -> None:
    result = PeftDriver().run(CASES["bases-dense-seed0"])
    assert isinstance(result, Unsupported) and "portable" in result.reason

