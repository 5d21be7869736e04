"""Step timing: interleaved rounds in rotating order, and the per-method row of one case."""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from .cases import Case, lora_rank
from .core_internals import chosen_paths
from .models import adapt, build_base, make_input, make_step, trainable_count

T = TypeVar("T")


@dataclass
class Row:
    """Measurements of one method on one case."""

    suite: str
    case: dict[str, Any]
    method: str
    times_ms: list[float] = field(default_factory=list)
    trainable: int = 0
    lora_rank: int | None = None
    paths: str = ""
    mem_total_mib: float | None = None
    mem_step_mib: float | None = None
    load: float = 0.0
    others: float = 0.0
    """Share of the CPU other processes used while this case was timed (accepted attempt)."""
    attempts: int = 1

    @property
    def median_ms(self) -> float:
        """Median step time."""
        return statistics.median(self.times_ms) if self.times_ms else math.nan


def rotated(items: Sequence[T], k: int) -> list[T]:
    """``items`` starting at index ``k`` (modulo its length), wrapping around."""
    k %= len(items)
    return [*items[k:], *items[:k]]


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    more: Callable[[int, float], bool],
    warmup: int = 1,
    setup: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every function, timed in rounds of one call each, in an order that rotates every round.

    Rounds continue while ``more(rounds done, seconds since the start)``; the first ``warmup`` rounds
    are not recorded. ``setup`` runs untimed before every call. Interleaving makes a burst of load
    from other processes hit every function alike.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rep = 0
    while more(rep, time.perf_counter() - start):
        for name in rotated(names, rep):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fns[name]()
            if rep >= warmup:
                samples[name].append(time.perf_counter() - t0)
        rep += 1
    return samples


def repeat_times(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_case(case: Case, methods: list[str], repeats: tuple[int, int], warmup: int, budget_s: float) -> list[Row]:
    """Time every method on ``case`` with rotating order; returns one row per method.

    The number of repeats adapts to the case: as many rounds (one step of every method each) as fit
    in ``budget_s`` judged from the warm-up round, clamped to ``repeats = (min, max)``, so cheap cases
    get more samples against the noise of a shared machine and expensive ones stay affordable.
    """
    base, targets, forward = build_base(case)
    x, probe = make_input(case)
    steps, rows = {}, {}
    for method in methods:
        model = adapt(method, base, targets, case)
        steps[method] = make_step(model, forward, x, probe)
        rows[method] = Row(
            suite=case.suite,
            case=asdict(case),
            method=method,
            trainable=trainable_count(model),
            lora_rank=lora_rank(case) if method == "peft-lora" else None,
            paths=chosen_paths(case) if method == "core-auto" else "",
            load=os.getloadavg()[0],
        )
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        for method in methods:
            steps[method]()
    round_s = (time.perf_counter() - t0) / max(1, warmup)
    repeats_n = max(repeats[0], min(repeats[1], int(budget_s / max(round_s, 1e-9))))
    gc.collect()
    gc.disable()  # a collection inside one method's step would be charged to it alone
    try:
        samples = interleaved(steps, lambda rep, _: rep < repeats_n, warmup=0)
    finally:
        gc.enable()
    for method, seconds in samples.items():
        rows[method].times_ms = [s * 1e3 for s in seconds]
    del steps, base, x, probe
    gc.collect()
    return [rows[m] for m in methods]
