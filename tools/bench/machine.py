"""The machine the benchmark shares: how busy other processes keep it, waiting for quiet, and the facts recorded with results."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from . import ROOT

T = TypeVar("T")


class OthersMeter:
    """How much of the machine's CPU *other* processes used over an interval (from /proc/stat minus our own ticks).

    The machine is shared with other developers; the 1-minute load average reacts slowly and counts
    our own threads, while this is exact for the interval measured. ``share()`` is in [0, 1] of all
    cores. Our own ticks include finished children (the memory server's forks are not running
    while the timing suites run).
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        total = sum(fields[:8])  # guest time is already counted in user
        busy = total - fields[3] - fields[4]
        with open("/proc/self/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        own = sum(int(v) for v in stat[11:15])  # utime, stime, cutime, cstime
        return total, busy, own

    def share(self) -> float:
        """Fraction of all CPU time since construction that other processes used."""
        total, busy, own = self._sample()
        t0, b0, o0 = self.start
        return max(0.0, (busy - b0) - (own - o0)) / max(1, total - t0)


def wait_quiet(max_wait_s: float, threshold: float = 0.10, window_s: float = 2.0) -> float:
    """Sleep until other processes use less than ``threshold`` of the CPU over ``window_s`` (at most ``max_wait_s``).

    Returns the seconds waited.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        meter = OthersMeter()
        time.sleep(window_s)
        if meter.share() < threshold:
            break
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Quiet(Generic[T]):
    """The accepted attempt of :func:`measure_quietly`."""

    result: T
    others: float
    """Share of the CPU other processes used during the accepted attempt."""
    attempts: int
    waited_s: float
    """Seconds spent waiting for quiet over all attempts."""


def measure_quietly(
    measure: Callable[[], T], wait_s: float, max_others: float, retries: int, label: str | None = None
) -> Quiet[T]:
    """Run ``measure`` once the machine is quiet (waiting at most ``wait_s``); again while others used more than ``max_others``.

    At most ``retries`` repetitions; the last attempt is kept whatever its share. ``label`` names the
    measurement in a log line when it is repeated.
    """
    attempts, waited = 0, 0.0
    while True:
        attempts += 1
        waited += wait_quiet(wait_s)
        meter = OthersMeter()
        result = measure()
        others = meter.share()
        if others <= max_others or attempts > retries:
            return Quiet(result, others, attempts, waited)
        if label is not None:
            print(f"  {label}: others used {others:.0%} of the CPU, measuring again", flush=True)


def load() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages."""
    return os.getloadavg()


def load_str(averages: tuple[float, float, float]) -> str:
    """Load averages as ``1.00 / 1.00 / 1.00``."""
    return " / ".join(f"{v:.2f}" for v in averages)


def machine_name() -> str:
    """``cpu-<n>core``: the committed results are named after the machine class, not the host."""
    return f"cpu-{os.cpu_count()}core"


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with the results."""
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
