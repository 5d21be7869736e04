"""One benchmark run: peak memory, timed training steps of every case, the other suites, then the report."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import COMMAND, DEFAULT_OUT
from .bases_suite import bases_rng_suite
from .cases import Case, available_methods, grid
from .machine import environment, load, load_str, measure_quietly
from .memory import MemoryResults, measure_all
from .report import write_report
from .suites import ablation_suite, bases_suite, checkpoint_suite, merge_suite
from .timing import Row, time_case


@dataclass(frozen=True)
class Settings:
    """How a run times its cases (the CLI's flags, with the defaults of a full or a smoke run filled in)."""

    smoke: bool
    repeats: tuple[int, int]
    budget_s: float
    warmup: int
    quiet_wait_s: float
    max_others: float
    retries: int


def output_dir(out: Path | None, smoke: bool) -> Path:
    """``out`` if given; else a fresh temporary directory for a smoke run, ``bench/results`` for a real one."""
    if out is not None:
        return out
    return Path(tempfile.mkdtemp(prefix="randlora-bench-")) if smoke else DEFAULT_OUT


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log the start and the duration of a phase of the run."""
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    yield
    print(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", flush=True)


def time_cases(cases: list[Case], methods: list[str], settings: Settings, mem: MemoryResults) -> tuple[list[Row], float]:
    """Rows of every case (timed when the machine is quiet, re-timed when disturbed) and the seconds waited for quiet."""
    rows: list[Row] = []
    waited = 0.0
    for case in cases:
        t0 = time.perf_counter()
        timed = measure_quietly(
            lambda case=case: time_case(case, methods, settings.repeats, settings.warmup, settings.budget_s),
            settings.quiet_wait_s,
            settings.max_others,
            settings.retries,
            label=case.label,
        )
        waited += timed.waited_s
        for row in timed.result:
            row.others, row.attempts = timed.others, timed.attempts
            got = mem.get((case.label, row.method))
            if got and "error" not in got:
                row.mem_total_mib, row.mem_step_mib = got["total_mib"], got["step_mib"]
        rows += timed.result
        meds = " ".join(f"{r.method}={r.median_ms:.1f}" for r in timed.result)
        print(f"  {case.label} ({time.perf_counter() - t0:.0f}s, others {timed.others:.0%}): {meds}", flush=True)
    return rows, waited


def run(settings: Settings, out: Path, machine: str, only: str | None, memory: bool) -> Path:
    """Measure every case of the grid (those whose label contains ``only``) and every suite; write the report."""
    start, load_start = time.time(), load()
    cases, dropped = grid(settings.smoke)
    if only:
        cases = [c for c in cases if only in c.label]
    methods = available_methods()
    mem: MemoryResults = {}
    if memory:
        with phase("peak memory (forked children)"):
            mem = measure_all(cases[:1] if settings.smoke else cases, methods)
    with phase(f"training steps ({len(cases)} cases x {len(methods)} methods)"):
        rows, waited = time_cases(cases, methods, settings, mem)
    data: dict[str, Any] = {
        "generator": COMMAND,
        "smoke": settings.smoke,
        "repeats": list(settings.repeats),
        "budget_s": settings.budget_s,
        "warmup": settings.warmup,
        "waited_s": waited,
        "retries": settings.retries,
        "max_others": settings.max_others,
        "dropped": dropped,
    }
    with phase("merge, bases, checkpoints"):
        smoke = settings.smoke
        data["merge"] = merge_suite([64] if smoke else [512, 1024, 2048], 1 if smoke else 5)
        small = (64, 8, 8)
        data["bases"] = bases_suite(small if smoke else (4096, 128, 32), small if smoke else (512, 32, 32), 1 if smoke else 3)
        data["checkpoint"] = checkpoint_suite()
        data["bases_rng"] = bases_rng_suite(smoke)
        data["ablation"] = ablation_suite(smoke, 1.0 if smoke else 10.0)
    data.update(environment=environment(), load_start=load_str(load_start), load_end=load_str(load()))
    data["duration_s"] = time.time() - start
    path = write_report(out, machine, data, rows)
    print(f"[bench] wrote {path} ({data['duration_s']:.0f}s)")
    return path
