"""Every installed driver against every golden case; the cases are data, this file never grows."""

from __future__ import annotations

import numpy as np
import pytest

from randlora_spec.driver import Driver, Unsupported
from randlora_spec.golden import GoldenCase
from randlora_spec.tolerances import check_close


def _compare_exact(actual: np.ndarray, expected: np.ndarray) -> tuple[bool, float]:
    """Bases are float32 by definition and must match bit for bit (NaN-free, same shape)."""
    a = np.asarray(actual)
    if a.dtype != np.float32 or a.shape != expected.shape:
        return False, float("inf")
    same = np.array_equal(a.view(np.uint32), expected.astype(np.float32).view(np.uint32))
    return same, 0.0 if same else float(np.max(np.abs(a.astype(np.float64) - expected)))


def test_golden_case(driver: Driver, case: GoldenCase, record) -> None:
    result = driver.run(case)
    if isinstance(result, Unsupported):
        record(driver.name, case, "skipped", detail=result.reason)
        pytest.skip(f"{driver.name} does not support {case.id}: {result.reason}")
    problems: list[str] = []
    worst = 0.0
    for name, expected in sorted(case.expected.items()):
        if name not in result:
            problems.append(f"{name}: not produced")
            continue
        actual = np.asarray(result[name])
        if case.exact:
            ok, err = _compare_exact(actual, expected)
            ratio = 0.0 if ok else float("inf")
            if not ok:
                problems.append(f"{name}: not bit-identical (dtype {actual.dtype}, shape {actual.shape}, max error {err:.3g})")
        else:
            if actual.shape != expected.shape:
                problems.append(f"{name}: shape {actual.shape}, expected {expected.shape}")
                continue
            ok, err, bound = check_close(actual, expected, driver.tolerance_dtype(case, name))
            ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
            if not ok:
                problems.append(f"{name}: max error {err:.3g} > bound {bound:.3g}")
        worst = max(worst, ratio)
    detail = "; ".join(problems)
    record(driver.name, case, "failed" if problems else "passed", worst, detail)
    assert not problems, f"[{driver.name}] case {case.id}: {detail}"
