"""Choosing how a RandLoRA layer call is evaluated: ``factored`` or ``dense`` (config field ``compute``).

Both paths compute the same function (SPEC 3.5/3.6, equal within the tolerances of SPEC 7):

- **factored**: the adapter output as two thin matmuls per adapter, ``x -> r*nb -> out``, added to
  the base output. Its cost grows with the number of tokens ``N``: per adapted layer and step about
  ``2*N*k*(M + m)`` flops forward and ``2*N*k*(M + 2m)`` backward (``k = r*nb ~ m``) on top of the
  frozen base's ``4*N*I*O``.
- **dense**: ``delta_W`` is materialised once per call and folded into the base matmul,
  ``y = x @ (W + delta_W)^T + b``; backward rebuilds ``W + delta_W`` for ``grad_x`` (it is not kept
  between forward and backward, so saved memory does not grow) and gets lambda/gamma's gradients
  from ``G = g^T x`` and ``B_flat^T G``. Extra cost: ``2*M*m*k`` flops to build ``delta_W`` each time
  (forward, backward) and ``2*N*I*O + 2*M*m*k`` for the gradients, i.e. mostly independent of ``N``.

For a square layer of width ``d`` the extra flops are ``14*N*d^2`` (factored) against
``6*d^3 + 2*N*d^2`` (dense): dense wins from about ``N = 0.5 d`` (inference) or ``N = 0.75 d``
(training). A third, internal choice, ``dense forward + factored backward`` (``hybrid``), is best in a
narrow band just below the training crossover of layers with ``in <= out``.

:func:`path_costs` turns those flop counts into seconds with a :class:`CostProfile` (GEMM
throughput with a per-dimension efficiency ramp, memory bandwidth for the elementwise passes and a
fixed cost per kernel). :data:`CPU_PROFILE` was calibrated on the 2-core AMD EPYC CI machine with
``python tools/bench --calibrate`` (see ``bench/NOTES.md``); other devices use the same flop model
with :data:`DEFAULT_PROFILE`, whose absolute numbers do not matter, only the ratios. Tokens,
layer widths, the number of bases, dtype, which gradients are needed and whether the base matmul
runs in the same node (so ``delta_W`` folds into it) all enter the choice. The layer engine
(:mod:`randlora_core.engine`) asks :func:`choose_path` once per call under ``auto``.

:func:`compute_override` forces a path for a block of code (benchmarks, the ``core-dense`` and
``core-factored`` conformance drivers, or checkpoints loaded without a ``compute`` preference).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from randlora_spec.errors import ConfigError

Compute = Literal["auto", "factored", "dense", "sparse"]
Path = Literal["factored", "dense", "hybrid", "sparse"]
COMPUTE_VALUES: tuple[str, ...] = ("auto", "factored", "dense", "sparse")
PATHS: tuple[Path, ...] = ("factored", "dense", "hybrid", "sparse")

_OVERRIDES: list[str | None] = [None]
"""The stack of active :func:`compute_override` values, innermost last.

A plain module-level list rather than a ``ContextVar``: ``torch.compile`` traces a read of a global
without a graph break (it guards on the value), while ``ContextVar.get`` breaks the graph at every
layer call. The override is therefore process-wide, not per thread or task.
"""


@contextmanager
def compute_override(compute: Compute | None) -> Iterator[None]:
    """Force ``compute`` for every RandLoRA layer call inside the block (``None`` lifts an outer override).

    The override beats the adapters' config; it still cannot force ``dense`` where the dense path
    does not apply (see :mod:`randlora_core.engine`). It applies to the whole process.
    """
    if compute is not None and compute not in COMPUTE_VALUES:
        raise ConfigError(f"compute: must be one of {COMPUTE_VALUES} or None, got {compute!r}")
    _OVERRIDES.append(compute)
    try:
        yield
    finally:
        _OVERRIDES.pop()


def current_override() -> str | None:
    """The innermost :func:`compute_override` in effect, or ``None``."""
    return _OVERRIDES[-1]


def resolve_compute(requested: str) -> str:
    """The compute a call uses: an active :func:`compute_override`, else the layers' ``requested`` setting."""
    override = _OVERRIDES[-1]
    return requested if override is None else override


@dataclass(frozen=True)
class CostProfile:
    """Machine constants of the cost model.

    A GEMM of ``(a x b) @ (b x c)`` takes ``2abc / (gemm_flops * e(a) e(b) e(c))`` seconds with the
    efficiency ramp ``e(n) = n / (n + gemm_ramp)`` (thin GEMMs run below peak); an elementwise pass
    over ``n`` bytes takes ``n / bandwidth``; every kernel adds ``op_seconds``.
    """

    gemm_flops: float
    gemm_ramp: float
    bandwidth: float
    op_seconds: float
    sparse_flops: float = 12e9
    """Throughput of a CSR x dense product (``torch.sparse.mm``), counted as 2 flops per nonzero and column."""


CPU_PROFILE = CostProfile(gemm_flops=180e9, gemm_ramp=24.0, bandwidth=10e9, op_seconds=15e-6, sparse_flops=12e9)
"""Calibrated on cpu-2core (AMD EPYC, 2 threads, torch 2.13 + MKL, float32): ``tools/bench --calibrate``."""

DEFAULT_PROFILE = CostProfile(gemm_flops=1.0e12, gemm_ramp=64.0, bandwidth=1.0e12, op_seconds=10e-6, sparse_flops=1.0e11)
"""Other devices: the flop model with round numbers (GPUs want larger tiles, hence the larger ramp)."""


def _profile(device: torch.device) -> CostProfile:
    return CPU_PROFILE if device.type == "cpu" else DEFAULT_PROFILE


def _gemm(p: CostProfile, a: int, b: int, c: int) -> float:
    if a == 0 or b == 0 or c == 0:
        return p.op_seconds
    eff = (a / (a + p.gemm_ramp)) * (b / (b + p.gemm_ramp)) * (c / (c + p.gemm_ramp))
    return 2.0 * a * b * c / (p.gemm_flops * eff) + p.op_seconds


def _pass(p: CostProfile, elements: int, itemsize: int, touches: int = 3) -> float:
    """An elementwise kernel reading/writing ``touches`` arrays of ``elements``."""
    return touches * elements * itemsize / p.bandwidth + p.op_seconds


def _spmm(p: CostProfile, nnz: int, columns: int) -> float:
    """A CSR matrix of ``nnz`` nonzeros times a dense one of ``columns`` columns."""
    return 2.0 * nnz * columns / p.sparse_flops + p.op_seconds


def _sparse_cost(
    p: CostProfile, n: int, nnz: tuple[tuple[int, int], ...], item: int, grad_x: bool, grad_params: bool, io: tuple[int, int]
) -> float:
    """The factored path on the nonzeros (:mod:`randlora_core.sparse`), ``io`` = (in, out).

    Per group and direction: one CSR product with ``b_flat``, ``S_flat``'s product as a batched
    matmul over its blocks (thin: counted at half the GEMM rate), and the input's and the result's
    transposes to and from the token-major layout; backward adds dL/dS (one more batched matmul).
    """
    i, o = io
    total = 0.0
    for nnz_b, nnz_s in nnz:
        blocks = 4.0 * nnz_s * n / p.gemm_flops + 4 * p.op_seconds
        turns = _pass(p, n * (i + o), item, 4)
        total += _spmm(p, nnz_b, n) + blocks + turns
        if grad_x:
            total += _spmm(p, nnz_b, n) + blocks + turns
        elif grad_params:
            total += _spmm(p, nnz_b, n) + _pass(p, n * o, item, 2) if i <= o else _pass(p, n * o, item, 2)
        total += blocks if grad_params else 0.0
    return total


def path_costs(
    tokens: int,
    in_features: int,
    out_features: int,
    ks: list[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    grad_x: bool = True,
    grad_params: bool = True,
    fused_base: bool = True,
    sparse_nnz: tuple[tuple[int, int], ...] | None = None,
) -> dict[str, float]:
    """Estimated seconds of each path for one layer call (forward, plus backward if any grad is needed).

    Args:
        tokens: rows of the flattened input (``x.numel() // in_features``).
        in_features: the layer's ``I``.
        out_features: the layer's ``O``.
        ks: ``r * nb`` of each group of adapters sharing one basis window (adapters of equal rank
            are evaluated together, so one group costs the same as one adapter).
        dtype: the compute dtype (only its size enters the elementwise terms).
        device: selects the :class:`CostProfile`.
        grad_x: the input's gradient is needed.
        grad_params: lambda/gamma gradients are needed.
        fused_base: the base matmul runs in the same node, so a dense ``delta_W`` folds into it;
            otherwise applying ``delta_W`` is one more (tokens x in x out) matmul each way.
        sparse_nnz: per group, the nonzeros of ``b_flat`` and of ``S_flat`` when its bases are
            ternary and a sparse structure exists; adds the ``sparse`` path.

    Returns:
        ``{"factored": s, "dense": s, "hybrid": s}`` (and ``"sparse": s`` given ``sparse_nnz``);
        only differences between paths matter (the frozen base's own matmuls, common to all, are
        left out where they are identical).

    """
    p = _profile(device or torch.device("cpu"))
    n, i, o = tokens, in_features, out_features
    m, big_m = min(i, o), max(i, o)
    item = torch.empty((), dtype=dtype).element_size()
    backward = grad_x or grad_params
    # lambda/gamma -> S (and its reductions) is the same small elementwise work on every path;
    # only the rebuild in backward differs and is counted there.
    basis = sum(_pass(p, k * m, item, 2) for k in ks)
    fact_fwd = sum(_gemm(p, n, m, k) + _gemm(p, n, k, big_m) for k in ks) + basis
    dense_fwd = sum(_gemm(p, big_m, k, m) for k in ks) + basis + _pass(p, big_m * m, item, 2)
    fact_bwd = dense_bwd = recompute_h = 0.0
    if backward:
        fact_bwd += basis
        dense_bwd += basis
        for k in ks:
            if i <= o:  # gh = g @ B feeds both grad_x and grad_S
                fact_bwd += _gemm(p, n, big_m, k)
                fact_bwd += _gemm(p, n, k, m) if grad_x else 0.0
                fact_bwd += _gemm(p, k, n, m) if grad_params else 0.0
            else:  # grad_x through (g S^T) B^T; grad_S = h^T g with h = x @ B saved by forward
                fact_bwd += (_gemm(p, n, m, k) + _gemm(p, n, k, big_m)) if grad_x else 0.0
                fact_bwd += _gemm(p, k, n, m) if grad_params else 0.0
                # a dense forward does not produce h, so the hybrid recomputes it
                recompute_h += _gemm(p, n, big_m, k) if grad_params else 0.0
        if grad_x:  # W + delta_W again; grad_x = g @ W_eff replaces the frozen base's g @ W
            dense_bwd += sum(_gemm(p, big_m, k, m) for k in ks) + _pass(p, big_m * m, item, 2)
        if grad_params:  # G = g^T x, then B_flat^T G per group
            dense_bwd += _gemm(p, o, n, i) + sum(_gemm(p, k, big_m, m) for k in ks)
    if not fused_base:
        dense_fwd += _gemm(p, n, i, o)
        dense_bwd += _gemm(p, n, o, i) if grad_x else 0.0
    costs = {
        "factored": fact_fwd + fact_bwd,
        "dense": dense_fwd + dense_bwd,
        "hybrid": dense_fwd + fact_bwd + recompute_h,
    }
    if sparse_nnz is not None:
        costs["sparse"] = _sparse_cost(p, n, sparse_nnz, item, grad_x, grad_params, (i, o))
    return costs


def choose_path(
    tokens: int,
    in_features: int,
    out_features: int,
    ks: list[int] | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    grad_x: bool = True,
    grad_params: bool = True,
    fused_base: bool = True,
    sparse_nnz: tuple[tuple[int, int], ...] | None = None,
) -> Path:
    """The cheapest path under :func:`path_costs` (ties go to ``factored``, the path with least memory).

    Memoised: a training loop asks the same few questions every step (not while ``torch.compile``
    traces: the compiled graph holds the path chosen for the shapes it was traced with).
    """
    device_type = device.type if device is not None else "cpu"
    args = (tokens, in_features, out_features, tuple(ks), dtype, device_type, grad_x, grad_params, fused_base, sparse_nnz)
    # A compiled graph fixes the path at trace time, so the cache would only cost a tracing warning.
    return _choose.__wrapped__(*args) if torch.compiler.is_compiling() else _choose(*args)


@functools.lru_cache(maxsize=4096)
def _choose(
    tokens: int,
    in_features: int,
    out_features: int,
    ks: tuple[int, ...],
    dtype: torch.dtype,
    device_type: str,
    grad_x: bool,
    grad_params: bool,
    fused_base: bool,
    sparse_nnz: tuple[tuple[int, int], ...] | None,
) -> Path:
    device = torch.device(device_type)
    costs = path_costs(tokens, in_features, out_features, list(ks), dtype, device, grad_x, grad_params, fused_base, sparse_nnz)
    best: Path = "factored"
    for path in PATHS[1:]:
        if path in costs and costs[path] < costs[best]:
            best = path
    return best


def choose_compute(
    tokens: int,
    in_features: int,
    out_features: int,
    r: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    grad: bool = True,
) -> Path:
    """:func:`choose_path` for one adapter of rank ``r`` (convenience for reports and tests)."""
    nb = -(-min(in_features, out_features) // r)
    return choose_path(tokens, in_features, out_features, [r * nb], dtype, device, grad, grad)
