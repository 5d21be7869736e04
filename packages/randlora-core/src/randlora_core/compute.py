"""Choosing how a RandLoRA layer call is evaluated: ``factored`` or ``dense`` (config field ``compute``), and internal variants.

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

A fourth, internal and forward-only choice, ``activation``, serves calls that need no gradient at
all with few tokens (decode). Both paths above read ``S_flat`` (r*nb, m ~ m x m), built from
lambda/gamma per call or held by the inference cache; ``activation`` never forms it but applies
``S_flat[k*nb + b, j] = lambda[k, b] * a_s[k, j] * gamma[b, j]`` to the activations
(:func:`~randlora_core.kernels.activation_into`): for ``I <= O`` ``(x * a_s_k) @ gamma^T`` for all
``k`` at once ((N*r, m) x (m, nb); ``a_s`` and ``gamma`` trade places when ``nb < r``), times
lambda, then ``@ B_flat^T``; for ``I > O`` ``h = x @ B_flat``, times lambda, ``@ gamma``, weighed by
``a_s`` and summed over ``k``. A call then reads ``W``, ``B_flat`` and an ``(N, min(r, nb), m)``
intermediate: about twice the base's bytes for a single token, but the intermediate grows with
``N``, so :func:`path_costs` lets it win up to some ``N`` near ``r`` (fewer when the inference
cache holds ``S_flat``, ``bases_cached``).

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
from typing import TYPE_CHECKING, Literal

import torch

from randlora_spec.errors import ConfigError

if TYPE_CHECKING:
    from randlora_core.operands import AdapterCall, BaseCall

Compute = Literal["auto", "factored", "dense", "sparse"]
Path = Literal["factored", "dense", "hybrid", "sparse", "activation"]
COMPUTE_VALUES: tuple[str, ...] = ("auto", "factored", "dense", "sparse")
PATHS: tuple[Path, ...] = ("factored", "dense", "hybrid", "sparse", "activation")

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


@dataclass(frozen=True)
class CallShape:
    """What the cost model knows of one layer call (hashable: :func:`choose_path` memoises on it).

    Attributes:
        tokens: rows of the flattened input (``x.numel() // in_features``).
        in_features: the layer's ``I``.
        out_features: the layer's ``O``.
        ks: ``r * nb`` of each group of adapters sharing one basis window (adapters of equal rank
            are evaluated together, so one group costs the same as one adapter).
        dtype: the compute dtype (only its size enters the elementwise terms).
        device_type: selects the :class:`CostProfile` (``torch.device.type``).
        grad_x: the input's gradient is needed.
        grad_params: lambda/gamma gradients are needed.
        fused_base: the base matmul runs in the same node, so a dense ``delta_W`` folds into it;
            otherwise applying ``delta_W`` is one more (tokens x in x out) matmul each way.
        sparse_nnz: per group, the nonzeros of ``b_flat`` and of ``S_flat`` when its bases are
            ternary and a sparse structure exists; adds the ``sparse`` path.
        ranks: each group's ``r`` (beside ``ks``); given, and without any gradient, adds the
            ``activation`` path.
        bases_cached: the scaled bases are at hand (the inference cache holds them), so the
            paths that read ``S`` do not build it.

    """

    tokens: int
    in_features: int
    out_features: int
    ks: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device_type: str = "cpu"
    grad_x: bool = True
    grad_params: bool = True
    fused_base: bool = True
    sparse_nnz: tuple[tuple[int, int], ...] | None = None
    ranks: tuple[int, ...] = ()
    bases_cached: bool = False


def _activation_cost(p: CostProfile, call: CallShape, item: int) -> float:
    """The ``activation`` path: per adapter ``(N, min(r, nb), m)`` elementwise work and thin matmuls, no ``S``."""
    n, i, o = call.tokens, call.in_features, call.out_features
    m, big_m = min(i, o), max(i, o)
    total = 0.0
    for k, r in zip(call.ks, call.ranks, strict=True):
        small, large = sorted((r, k // r))
        mixed = n * small * m  # x scaled by the smaller factor (I <= O), or the rows it weighs and sums (I > O)
        total += _gemm(p, n, k, big_m) + _gemm(p, n * small, m, large) + _pass(p, n * k, item, 3)
        total += _pass(p, mixed, item, 2) if i <= o else _pass(p, mixed, item, 3)
    return total


def path_costs(call: CallShape) -> dict[str, float]:
    """Estimated seconds of each path for one layer call (forward, plus backward if any grad is needed).

    Returns:
        ``{"factored": s, "dense": s, "hybrid": s}``, with ``"sparse": s`` given ``sparse_nnz`` and
        ``"activation": s`` given ``ranks`` and no gradient; only differences between paths matter
        (the frozen base's own matmuls, common to all, are left out where they are identical).

    """
    p = _profile(torch.device(call.device_type))
    n, i, o, ks = call.tokens, call.in_features, call.out_features, call.ks
    grad_x, grad_params = call.grad_x, call.grad_params
    m, big_m = min(i, o), max(i, o)
    item = torch.empty((), dtype=call.dtype).element_size()
    backward = grad_x or grad_params
    # lambda/gamma -> S (and its reductions) is the same small elementwise work on every path that
    # reads S; only the rebuild in backward differs and is counted there.
    basis = 0.0 if call.bases_cached else sum(_pass(p, k * m, item, 2) for k in ks)
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
    if not call.fused_base:
        dense_fwd += _gemm(p, n, i, o)
        dense_bwd += _gemm(p, n, o, i) if grad_x else 0.0
    costs = {
        "factored": fact_fwd + fact_bwd,
        "dense": dense_fwd + dense_bwd,
        "hybrid": dense_fwd + fact_bwd + recompute_h,
    }
    if call.sparse_nnz is not None:
        costs["sparse"] = _sparse_cost(p, n, call.sparse_nnz, item, grad_x, grad_params, (i, o))
    if call.ranks and not backward:
        costs["activation"] = _activation_cost(p, call, item)
    return costs


def describe_call(
    x: torch.Tensor,
    base: BaseCall,
    groups: list[list[AdapterCall]],
    in_features: int,
    out_features: int,
    fused: bool,
    sparse_nnz: tuple[tuple[int, int], ...] | None,
) -> CallShape:
    """The :class:`CallShape` of a layer call from its operands (adapter ``groups`` as the engine groups them).

    ``fused``: the base matmul may run in the engine's node; ``sparse_nnz`` as in :class:`CallShape`.
    """
    grad = torch.is_grad_enabled()
    need_params = grad and any(a.lam.requires_grad or a.gamma.requires_grad for g in groups for a in g)
    need_params = need_params or (fused and grad and base.bias is not None and base.bias.requires_grad)
    cache = base.cache
    # without gradients the scaled-bases cache serves the factored path without rebuilding S (inference_cache.cacheable)
    bases_cached = not grad and cache is not None and not cache.weights and not torch.compiler.is_compiling()
    return CallShape(
        tokens=x.numel() // in_features if in_features else 0,
        in_features=in_features,
        out_features=out_features,
        ks=tuple(members[0].b_flat.shape[1] for members in groups),
        dtype=groups[0][0].a_s.dtype,
        device_type=x.device.type,
        grad_x=grad and x.requires_grad,
        grad_params=need_params,
        fused_base=fused,
        sparse_nnz=sparse_nnz,
        ranks=tuple(members[0].a_s.shape[0] for members in groups),
        bases_cached=bases_cached and all(a.key is not None for g in groups for a in g),
    )


def choose_path(call: CallShape) -> Path:
    """The cheapest path under :func:`path_costs` (ties go to ``factored``, the path with least memory).

    Memoised: a training loop asks the same few questions every step (not while ``torch.compile``
    traces: the compiled graph holds the path chosen for the shapes it was traced with).
    """
    # A compiled graph fixes the path at trace time, so the cache would only cost a tracing warning.
    return _choose.__wrapped__(call) if torch.compiler.is_compiling() else _choose(call)


@functools.lru_cache(maxsize=4096)
def _choose(call: CallShape) -> Path:
    costs = path_costs(call)
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
    device_type = device.type if device is not None else "cpu"
    return choose_path(CallShape(tokens, in_features, out_features, (r * nb,), dtype, device_type, grad, grad, ranks=(r,)))
