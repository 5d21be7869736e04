"""Every installed driver against every golden case; the cases are data, this file never grows."""

from __future__ import annotations

import pytest

from randlora_spec.driver import Driver, Unsupported
from randlora_spec.golden import GoldenCase
from randlora_spec.testing import compare_case


def test_golden_case(driver: Driver, case: GoldenCase, record) -> None:
    result = driver.run(case)
    if isinstance(result, Unsupported):
        record(driver.name, case, "skipped", detail=result.reason)
        pytest.skip(f"{driver.name} does not support {case.id}: {result.reason}")
    comparison = compare_case(driver, case, result)
    record(driver.name, case, "passed" if comparison.ok else "failed", comparison.worst_ratio, comparison.detail)
    assert comparison.ok, f"[{driver.name}] case {case.id}: {comparison.detail}"
