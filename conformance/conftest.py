"""Conformance suite plumbing: discover drivers, parametrize over golden cases, summarise per driver.

The suite holds no per-implementation code. Drivers come from the ``randlora.conformance``
entry-point group of whatever is installed; ``--driver NAME`` (repeatable) or the environment
variable ``RANDLORA_DRIVERS`` (comma-separated) restricts the run to some of them.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from randlora_spec.driver import discover_drivers
from randlora_spec.golden import GoldenCase, load_cases

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "spec" / "golden"


@dataclass
class DriverTally:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    worst_ratio: float = 0.0  # max over cases of error / allowed bound
    worst_case: str = ""
    failures: list[str] = field(default_factory=list)
    skip_reasons: Counter[str] = field(default_factory=Counter)


RESULTS: dict[str, DriverTally] = defaultdict(DriverTally)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--driver", action="append", default=None, help="run only this driver (repeatable)")
    parser.addoption(
        "--distribution", action="append", default=None, help="run only drivers registered by this distribution (repeatable)"
    )
    parser.addoption("--golden-dir", default=str(GOLDEN_DIR), help="directory holding manifest.json")


def _selected_names(config: pytest.Config) -> set[str] | None:
    names = config.getoption("--driver")
    if names:
        return set(names)
    env = os.environ.get("RANDLORA_DRIVERS", "").strip()
    return {n.strip() for n in env.split(",") if n.strip()} or None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "driver" not in metafunc.fixturenames:
        return
    wanted = _selected_names(metafunc.config)
    dists = set(metafunc.config.getoption("--distribution") or []) or None
    drivers = discover_drivers(wanted, dists)
    found = {d.name for d in drivers}
    if wanted and wanted - found:
        raise pytest.UsageError(f"requested drivers {sorted(wanted - found)} are not installed (found: {sorted(found)})")
    if not drivers:
        raise pytest.UsageError(
            f"no conformance drivers installed (entry-point group randlora.conformance, distributions {dists})"
        )
    cases = load_cases(Path(metafunc.config.getoption("--golden-dir")))
    params = [pytest.param(d, c, id=f"{d.name}:{c.id}") for d in drivers for c in cases]
    metafunc.parametrize(("driver", "case"), params)


@pytest.fixture
def record(request: pytest.FixtureRequest):
    """Attach a case's outcome to the test report; user_properties travel to the xdist controller."""

    def _record(driver_name: str, case: GoldenCase, outcome: str, ratio: float = 0.0, detail: str = "") -> None:
        request.node.user_properties.append(("conformance", (driver_name, case.id, outcome, ratio, detail)))

    return _record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for key, value in report.user_properties:
        if key != "conformance":
            continue
        driver_name, case_id, outcome, ratio, detail = value
        tally = RESULTS[driver_name]
        setattr(tally, outcome, getattr(tally, outcome) + 1)
        if ratio > tally.worst_ratio:
            tally.worst_ratio, tally.worst_case = ratio, case_id
        if outcome == "skipped":
            tally.skip_reasons[detail or "no reason given"] += 1
        elif detail:
            tally.failures.append(f"{case_id}: {detail}")


LEGEND = [
    "legend: worst error/bound = the largest, over a driver's cases, of max|actual - expected| / (atol + rtol * max|expected|),",
    "        the bound SPEC.md section 7 sets for its dtype: below 1 passes, 0 is exact; bases must be bit-identical (0 or inf)",
]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("conformance summary (per implementation)")
    tr.write_line(f"{'implementation':<16}{'passed':>8}{'failed':>8}{'skipped':>9}   worst error/bound (case)")
    for name in sorted(RESULTS):
        t = RESULTS[name]
        tr.write_line(f"{name:<16}{t.passed:>8}{t.failed:>8}{t.skipped:>9}   {t.worst_ratio:.3g} ({t.worst_case or '-'})")
        for line in t.failures[:20]:
            tr.write_line(f"    FAILED {line}")
        # Printed here rather than left to pytest's -rs so they show under -q too.
        for reason, count in sorted(t.skip_reasons.items()):
            tr.write_line(f"    skipped {count}: {reason}")
    for line in LEGEND:
        tr.write_line(line)
