"""Peak memory of one training step, measured in children forked from a server with a pinned mmap threshold.

``tracemalloc`` does not see torch's allocations, so each (configuration, method) runs in a fresh
child process forked from a "memory server" that has imported everything but allocated nothing.
The server runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` pinned, so every tensor buffer is its own
``mmap`` and freeing it returns the pages at once: the resident set size (RSS) then tracks live
tensor memory instead of what malloc keeps cached. The child builds the model and the input,
resets the kernel's RSS high-water mark (``/proc/self/clear_refs``), runs one training step and
reads ``VmHWM``: "step peak" is the high-water mark above the RSS after building, "total" is above
the RSS before the model was built (so weights, bases and the adapter's own buffers count too).
"""

from __future__ import annotations

import gc
import json
import os
import select
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .cases import Case, LlamaCase, StackCase, case_from
from .models import build_step

MIB = 1024 * 1024
PACKAGE_DIR = Path(__file__).resolve().parent
MemoryResults = dict[tuple[str, str], dict[str, Any]]
"""``(case label, method) -> {"total_mib", "step_mib"}`` or ``{"error"}``."""


def read_status(key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style value from ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure_memory(task: dict[str, Any]) -> dict[str, Any]:
    """Runs in a forked child: RSS high-water marks of one training step of one method."""
    case = case_from(task["suite"], task["case"])
    # One-time lazy initialisation (TorchScript compilation of core's Philox, PEFT's and
    # transformers' first-use setup) is a per-process cost, not a per-model one: pay it first, on a
    # tiny case of the same suite and method, before the baseline is read. (Not in the server: a
    # fork after torch has run kernels can deadlock in the child.)
    tiny = StackCase("rect", 16, 8, 4) if isinstance(case, StackCase) else LlamaCase(64, 16, 4, layers=1, seq=16)
    build_step(task["method"], tiny)()
    gc.collect()
    rss0 = read_status("VmRSS")
    step = build_step(task["method"], case)  # the base model it was copied from is freed on return
    gc.collect()
    rest = read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    # One step: its peak (in backward, with activations, gradients and temporaries alive) is the
    # steady state's; the AdamW state it creates afterwards is 2 x the adapter parameters, small.
    step()
    peak = read_status("VmHWM")
    return {"total_mib": (peak - rss0) / MIB, "step_mib": (peak - rest) / MIB}


def memory_server() -> int:
    """Read one JSON task per stdin line, measure it in a forked child, answer one JSON line."""
    # Import the heavy modules once, here, so that each fork starts instantly. No torch op runs in
    # this process, so no OpenMP thread pool exists yet and forking is safe.
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import randlora_core  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_in_child(json.loads(line))), flush=True)
    return 0


def _in_child(task: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure_memory` in a forked child; its answer, or ``{"error": ...}``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = measure_memory(task)
        except BaseException as exc:  # reported to the parent, never raised in a forked child
            result = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    answer = json.loads(b"".join(chunks) or b'{"error": "child died"}')
    if status != 0 and "error" not in answer:
        answer["error"] = f"child exit status {status}"
    return answer


class MemoryClient:
    """Starts :func:`memory_server` in a subprocess with the pinned malloc settings."""

    def __init__(self) -> None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [sys.executable, str(PACKAGE_DIR), "--memory-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._expect_line(timeout=300)

    def _expect_line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("memory server did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("memory server exited")
        return json.loads(line)

    def measure(self, case: Case, method: str) -> dict[str, Any]:
        """Peak-memory figures of one method on one case."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"suite": case.suite, "case": asdict(case), "method": method}) + "\n")
        self.proc.stdin.flush()
        return self._expect_line(timeout=1800)

    def close(self) -> None:
        """Stop the server."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure_all(cases: list[Case], methods: list[str]) -> MemoryResults:
    """Peak memory of every method on every case, each in its own forked child; logs one line per case."""
    results: MemoryResults = {}
    client = MemoryClient()
    try:
        for case in cases:
            for method in methods:
                results[(case.label, method)] = client.measure(case, method)
            print(f"  {case.label}: " + ", ".join(f"{m}={results[(case.label, m)]}" for m in methods), flush=True)
    finally:
        client.close()
    return results
