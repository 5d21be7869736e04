"""Comparing a driver's outputs with expected values: bit-exact for bases, declared tolerances otherwise.

One comparison serves the conformance suite (against a golden case's stored values) and the
packages' driver tests (against the reference driver's outputs on a case built in the test).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from randlora_spec.driver import Driver, Unsupported
from randlora_spec.golden import GoldenCase
from randlora_spec.tolerances import check_close


@dataclass(frozen=True)
class Comparison:
    """What a comparison found: one line per mismatching output, and the worst ``error / bound``.

    The ratio is 0 for a bit-identical output and ``inf`` for one that is missing, misshapen or not
    bit-identical where it must be.
    """

    problems: list[str] = field(default_factory=list)
    worst_ratio: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every expected output matched."""
        return not self.problems

    @property
    def detail(self) -> str:
        """The problems on one line (empty when :attr:`ok`)."""
        return "; ".join(self.problems)


def _exact(name: str, actual: np.ndarray, expected: np.ndarray) -> str | None:
    """Bases are float32 by definition and must match bit for bit (same dtype and shape)."""
    if actual.dtype == np.float32 and actual.shape == expected.shape:
        if np.array_equal(actual.view(np.uint32), expected.astype(np.float32).view(np.uint32)):
            return None
        err = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    else:
        err = float("inf")
    return f"{name}: not bit-identical (dtype {actual.dtype}, shape {actual.shape}, max error {err:.3g})"


def compare_outputs(
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tolerance_dtype: Callable[[str], str],
    exact: bool = False,
) -> Comparison:
    """Compare every output of ``expected`` (extra outputs in ``actual`` are ignored).

    Args:
        actual: outputs by name, as a driver returns them.
        expected: the values they must match.
        tolerance_dtype: the declared tolerance's name (a dtype such as ``"float32"``) for an output.
        exact: bit-exact float32 comparison (bases) instead of the tolerance.
    """
    problems: list[str] = []
    worst = 0.0
    for name, want in sorted(expected.items()):
        if name not in actual:
            problems.append(f"{name}: not produced")
            worst = float("inf")
            continue
        got = np.asarray(actual[name])
        if exact:
            problem = _exact(name, got, want)
            ratio = 0.0 if problem is None else float("inf")
        elif got.shape != want.shape:
            problem, ratio = f"{name}: shape {got.shape}, expected {want.shape}", float("inf")
        else:
            ok, err, bound = check_close(got, want, tolerance_dtype(name))
            ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
            problem = None if ok else f"{name}: max error {err:.3g} > bound {bound:.3g}"
        if problem is not None:
            problems.append(problem)
        worst = max(worst, ratio)
    return Comparison(problems, worst)


def compare_case(
    driver: Driver, case: GoldenCase, actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray] | None = None
) -> Comparison:
    """Compare ``driver``'s outputs for ``case`` with ``expected`` (default: the case's stored values).

    Tolerances are the ones the driver claims per output; bases cases (``case.exact``) compare bit for bit.
    """
    want = case.expected if expected is None else expected
    return compare_outputs(actual, want, lambda name: driver.tolerance_dtype(case, name), exact=case.exact)


def assert_driver_matches(driver: Driver, case: GoldenCase, expected: Mapping[str, np.ndarray] | None = None) -> None:
    """Run ``driver`` on ``case`` and assert that it supports the case and matches ``expected`` (see :func:`compare_case`).

    ``expected`` defaults to the case's stored values; tests that build their own cases pass the
    reference driver's outputs.
    """
    result = driver.run(case)
    assert not isinstance(result, Unsupported), f"[{driver.name}] case {case.id} unsupported: {result.reason}"
    comparison = compare_case(driver, case, result, expected)
    assert comparison.ok, f"[{driver.name}] case {case.id}: {comparison.detail}"
