"""The fused CPU fill of the portable basis rule: the C extension ``randlora_core._philox``, where it was built.

:func:`randlora_core.bases.generate_basis` fills CPU tensors through :func:`fill` when
:func:`kernel_for` says so, and otherwise with its pure-torch rule (CUDA and other devices always;
CPU where the extension is missing or ``RANDLORA_BASES_KERNEL=torch``). Both give the same bits;
the tests prove it on the Philox known-answer vectors, every golden bases case and random shapes.

Why a small C extension (timings: ``bench/results/*-bases.md``): the rule is ~20 integer
multiplies per value and torch has no unsigned 32x32 -> 64 bit multiply, so the torch version issues
about 125 elementwise ops per chunk, each a pass over memory and, on several threads, a barrier
(18-22x slower than this fill on one thread, worse on two busy ones). Fusing those ops needs a
compiler. ``torch.compile`` fuses them, but compiling took 90 s in a fresh process with a cold cache
and 10 s with a warm one (this 2-core machine at load ~9; the issue saw 19-26 s at load 1.5), needs
a C++ compiler on the user's machine, and a user's first wrap must not wait for it. A JIT library
such as numba also compiles on first use (or keeps its own cache) and is a large dependency; numpy's
``Philox`` is the 4x64 variant with a sequential counter, not this rule. One C file compiled when the
package is built has no first-call cost: it imports in 0.3 ms and a call costs under 1 us (the Python
C API with the buffer protocol, which also checks the buffer's size; ``ctypes`` alone takes 2.4 ms to
import and would pass a raw pointer).

The fill writes straight into the output tensor, so it needs no memory beyond the tensor itself.
It runs on ``torch.get_num_threads()`` threads (each value is a pure function of its coordinates,
so the bits never depend on the thread count).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from randlora_spec.bases import DENSE_SCALE, BasisKind, sparse_scale, sparse_threshold
from randlora_spec.errors import BasisRuleError, ConfigError
from randlora_spec.philox import seed_to_key

KERNEL_ENV = "RANDLORA_BASES_KERNEL"
"""``auto`` (default): the C fill for CPU tensors where it is built; ``torch``: always the pure-torch rule."""

DENSE, TERNARY, WORDS = 0, 1, 2
"""The extension's ``kind`` codes: dense values, ternary values, raw Philox words (for known-answer tests)."""


@functools.cache
def extension() -> ModuleType | None:
    """The compiled ``randlora_core._philox`` module, or ``None`` where it was not built."""
    try:
        return importlib.import_module("randlora_core._philox")  # a compiled module, absent from the source tree
    except ImportError:
        return None


def kernel_for(device: torch.device) -> str:
    """Which generator fills a tensor on ``device``: ``"c"`` (the fused fill) or ``"torch"``.

    Raises:
        ConfigError: ``RANDLORA_BASES_KERNEL`` holds something other than ``auto`` or ``torch``.

    """
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch"):
        raise ConfigError(f"{KERNEL_ENV} must be 'auto' or 'torch', got {choice!r}")
    if choice == "torch" or device.type != "cpu" or extension() is None:
        return "torch"
    return "c"


def mapping(kind: BasisKind, m_max: int) -> tuple[int, int, float]:
    """The extension's ``(kind code, threshold, scale)`` for a basis kind (SPEC 4.3, 4.4)."""
    if kind == "dense":
        return DENSE, 0, float(DENSE_SCALE)
    threshold = sparse_threshold(kind, m_max)
    return TERNARY, threshold, float(sparse_scale(threshold))


def fill(out: torch.Tensor, seed: int, tag: int, kind: BasisKind, m_max: int, threads: int | None = None) -> None:
    """Fill the contiguous CPU float32 tensor ``out`` (3-D, sizes >= 1) with its basis values under the rule."""
    ext = extension()
    if ext is None:
        raise BasisRuleError("randlora_core._philox is not built here; generate_basis uses the pure-torch rule instead")
    code, threshold, scale = mapping(kind, m_max)
    k0, k1 = seed_to_key(seed)
    _, d1, d2 = out.shape
    n = threads if threads is not None else torch.get_num_threads()
    ext.fill(out.numpy(), k0, k1, tag, d1, d2, 0, 0, 0, code, threshold, scale, n, True)
