"""Numerical tolerances, declared once per dtype and used by every test and driver (SPEC.md section 7).

A result ``actual`` matches ``expected`` when ``max|actual - expected| <= atol + rtol * max|expected|``.
The bound is norm-wise (relative to the largest expected magnitude) because RandLoRA outputs are
sums over many terms: single elements near zero carry cancellation error that says nothing about
the implementation's correctness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from randlora_spec.errors import DtypeError, ShapeError


@dataclass(frozen=True)
class Tolerance:
    """A norm-wise tolerance: ``max abs error <= atol + rtol * max|expected|``."""

    rtol: float
    atol: float

    def bound(self, expected: np.ndarray) -> float:
        """The largest admissible max-abs error against ``expected``."""
        scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
        return self.atol + self.rtol * scale


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-10, atol=1e-12),
    "float32": Tolerance(rtol=2e-5, atol=1e-6),
    "bfloat16": Tolerance(rtol=3e-2, atol=1e-3),
    "float16": Tolerance(rtol=4e-3, atol=1e-4),
    # Quantized bases: the adapter contribution is computed in the compute dtype, but merging
    # re-quantizes the weight once per merged adapter (up to two in the goldens), so merged
    # weights are compared against the reference merge of the dequantized weight within two
    # roundings of the largest magnitude: int8 1/254 each (+ float16 rounding), nf4 and fp4 half
    # their largest code gap (0.304 / 2 and 0.333 / 2) each, plus nested-statistics error.
    "int8": Tolerance(rtol=1e-2, atol=1e-4),
    "nf4": Tolerance(rtol=3.2e-1, atol=1e-3),
    "fp4": Tolerance(rtol=3.5e-1, atol=1e-3),
}


def tolerance(dtype: str) -> Tolerance:
    """The declared tolerance for ``dtype`` (a name such as ``"float32"``)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise DtypeError(f"no tolerance is declared for dtype {dtype!r}; known: {sorted(TOLERANCES)}") from None


def max_abs_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected|`` in float64; shapes must match exactly."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ShapeError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    return float(np.max(np.abs(a - e))) if a.size else 0.0


def check_close(actual: np.ndarray, expected: np.ndarray, dtype: str) -> tuple[bool, float, float]:
    """Compare with the declared tolerance; returns ``(ok, max_abs_error, bound)``."""
    err = max_abs_error(actual, expected)
    bound = tolerance(dtype).bound(np.asarray(expected, np.float64))
    return bool(np.isfinite(err) and err <= bound), err, bound
