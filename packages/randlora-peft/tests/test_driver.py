"""The ``peft*`` conformance drivers on a selection of golden cases (the full run is ``pytest conformance --driver peft``)."""

from __future__ import annotations

import pytest

from randlora_peft.driver import PeftDenseDriver, PeftDriver, PeftFactoredDriver, PeftNativeDriver
from randlora_spec.driver import Driver, Unsupported, discover_drivers
from randlora_spec.golden import GoldenCase, load_cases
from randlora_spec.testing import assert_driver_matches
from randlora_spec.testing.checkout import golden_dir


def _cases() -> dict:
    try:
        directory = golden_dir()
    except FileNotFoundError:
        return {}
    return {case.id: case for case in load_cases(directory)}


CASES = _cases()
DRIVERS = [PeftDriver, PeftDenseDriver, PeftFactoredDriver, PeftNativeDriver]

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
NATIVE_INEXPRESSIBLE = {case_id for case_id in SELECTED if "different-r" in case_id}


def test_registered_under_the_conformance_entry_point():
    drivers = {d.name: d for d in discover_drivers({"peft", "peft-dense", "peft-factored", "peft-native"})}
    assert {name: type(d) for name, d in drivers.items()} == {cls.name: cls for cls in DRIVERS}
    assert all(isinstance(d, Driver) for d in drivers.values())


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
@pytest.mark.parametrize(
    ("driver_cls", "case_id"),
    [
        pytest.param(cls, case_id, id=f"{cls.name}:{case_id}")
        for cls in DRIVERS
        for case_id in SELECTED
        if not (cls is PeftNativeDriver and case_id in NATIVE_INEXPRESSIBLE)
    ],
)
def test_golden_case(driver_cls: type[PeftDriver], case_id: str) -> None:
    assert_driver_matches(driver_cls(), CASES[case_id])


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
def test_bases_cases_are_unsupported_with_a_reason() -> None:
    for driver in (PeftDriver(), PeftNativeDriver()):
        result = driver.run(CASES["bases-dense-seed0"])
        assert isinstance(result, Unsupported) and "portable" in result.reason


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
@pytest.mark.parametrize("case_id", sorted(NATIVE_INEXPRESSIBLE))
def test_native_skips_adapters_of_different_nb(case_id: str) -> None:
    """PEFT's layer keeps one num_bases; the accelerated drivers run these cases (test_golden_case)."""
    result = PeftNativeDriver().run(CASES[case_id])
    assert isinstance(result, Unsupported)
    assert "num_bases" in result.reason and "big: r=4, nb=4, small: r=2, nb=8" in result.reason


class _Unguarded(PeftNativeDriver):
    def _inexpressible(self, case: GoldenCase) -> str | None:
        return None


@pytest.mark.skipif(not CASES, reason="golden fixtures not available")
def test_peft_itself_fails_on_adapters_of_different_nb() -> None:
    """The skip above is PEFT's behaviour, not the driver's: run anyway, PEFT's own forward fails (a PEFT fix shows here)."""
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        _Unguarded().run(CASES["forward-two-adapters-different-r-float32"])
