#!/usr/bin/env python3
"""Benchmark randlora-core against Hugging Face PEFT's RandLoRA and LoRA on this machine (issue #6).

Everything is measured in ONE process run so that the ratios compare like with like: for every
configuration all methods are built side by side and their training steps are timed in alternating
order (the order rotates each repeat, so slow drifts of a shared machine hit every method alike);
the report gives per-method medians and ratios of medians.

A training step is forward + backward + AdamW on the trainable (adapter) parameters, with the input
requiring grad (as it does for every layer but the first in a real model). Methods:

- ``floor``: the frozen base model, forward + backward with only the input's gradient. Nothing
  trains, so no adapter method can beat it; it is the floor the targets are stated against.
- ``core-auto`` / ``core-factored`` / ``core-dense``: randlora-core with ``compute`` set to each
  value (only ``core-factored`` when the installed core has no ``compute`` field).
- ``peft-randlora``: PEFT's RandLoRA with the same ``r``.
- ``peft-lora``: PEFT's LoRA with the rank giving about the same number of trainable parameters.

Suites: a grid of stacks of linear layers (``square``: two d x d layers; ``rect``: d -> 4d -> d, i.e.
one layer with in < out and one with in > out), a small Llama-style transformer built from a
``transformers.LlamaConfig`` (random weights, no download), peak memory, merge time, basis
generation throughput and checkpoint sizes. The report goes to ``bench/results/<machine>.md`` with a
PNG plot of step time against tokens and the raw numbers as JSON.

Peak memory on CPU: ``tracemalloc`` does not see torch's allocations, so each (configuration,
method) runs in a fresh child process forked from a "memory server" that has imported everything
but allocated nothing. The server runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` pinned, so every
tensor buffer is its own ``mmap`` and freeing it returns the pages at once: the resident set size
(RSS) then tracks live tensor memory instead of what malloc keeps cached. The child builds the
model and the input, resets the kernel's RSS high-water mark (``/proc/self/clear_refs``), runs one
training step and reads ``VmHWM``: "step peak" is the high-water mark above the RSS after building,
"total" is above the RSS before the model was built (so weights, bases and the adapter's own
buffers count too).

Usage::

    python tools/bench.py            # full run (~25 min on 2 CPU cores), writes bench/results/
    python tools/bench.py --smoke    # tiny configuration in seconds, writes to a temp dir
    nox -s bench [-- --smoke]
    python tools/bench.py --report-from bench/results/cpu-2core.json   # re-render a report
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results"

METHODS = ("floor", "core-auto", "core-factored", "core-dense", "peft-randlora", "peft-lora")
CORE_COMPUTE = {"core-auto": "auto", "core-factored": "factored", "core-dense": "dense"}
MIB = 1024 * 1024

# Grid of issue #6. Dropped: the largest combinations, which alone would take longer than the rest
# of the grid together (about 7 min each for the rect stack at d=2048 and 8192 tokens, see report).
GRID_D = (512, 1024, 2048)
GRID_TOKENS = (128, 512, 2048, 8192)
GRID_R = (8, 32)
GRID_KINDS = ("square", "rect")
DROPPED = {("rect", 2048, 8192), ("square", 2048, 8192)}
LLAMA_GRID = ((512, 512), (512, 2048), (1024, 512), (1024, 2048))  # (hidden size, tokens), r = 32


# ---------------------------------------------------------------------------------------------
# cases and models


@dataclass(frozen=True)
class StackCase:
    """A stack of linear layers without nonlinearities: ``square`` d -> d -> d, ``rect`` d -> 4d -> d."""

    kind: str
    d: int
    tokens: int
    r: int

    @property
    def dims(self) -> list[int]:
        """Feature sizes along the stack."""
        return [self.d, self.d, self.d] if self.kind == "square" else [self.d, 4 * self.d, self.d]

    @property
    def label(self) -> str:
        """Short identifier used in logs and tables."""
        return f"stack-{self.kind}-d{self.d}-n{self.tokens}-r{self.r}"


@dataclass(frozen=True)
class LlamaCase:
    """A small Llama-style model: ``layers`` decoder layers of hidden size ``d``, sequences of ``seq`` tokens."""

    d: int
    tokens: int
    r: int
    layers: int = 2
    seq: int = 512

    @property
    def label(self) -> str:
        """Short identifier used in logs and tables."""
        return f"llama-d{self.d}-n{self.tokens}-r{self.r}"


Case = StackCase | LlamaCase
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _torch() -> Any:
    import torch

    return torch


class Stack:
    """Factory for the linear stack (kept out of module scope so the memory server imports lazily)."""

    @staticmethod
    def build(dims: list[int]) -> Any:
        """An ``nn.Module`` with layers ``l0``, ``l1``, ... (bias on, as in a generic MLP)."""
        from torch import nn

        class LinearStack(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.names = [f"l{i}" for i in range(len(dims) - 1)]
                for name, (a, b) in zip(self.names, itertools.pairwise(dims), strict=True):
                    self.add_module(name, nn.Linear(a, b))

            def forward(self, x: Any) -> Any:
                for name in self.names:
                    x = getattr(self, name)(x)
                return x

        return LinearStack()


def build_base(case: Case) -> tuple[Any, list[str], Callable[[Any, Any], Any]]:
    """``(model, target module names, forward(model, x) -> output)`` with seeded random weights."""
    torch = _torch()
    torch.manual_seed(0)
    if isinstance(case, StackCase):
        model = Stack.build(case.dims)
        return model, list(model.names), lambda m, x: m(x)
    from transformers import LlamaConfig, LlamaModel

    heads = max(1, case.d // 64)
    config = LlamaConfig(
        hidden_size=case.d,
        intermediate_size=4 * case.d,
        num_hidden_layers=case.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),  # grouped-query attention: k/v projections are d -> d/4
        vocab_size=256,
        max_position_embeddings=case.seq,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = LlamaModel(config)
    return model, list(LLAMA_TARGETS), lambda m, x: m(inputs_embeds=x).last_hidden_state


def make_input(case: Case) -> tuple[Any, Any]:
    """``(x, probe)``: the input (requires grad) and a fixed tensor the loss is the dot product with.

    ``loss = (y * probe).sum()`` gives a dense, contiguous ``grad_y`` (``y.sum()`` would give an
    expanded stride-0 one that no real loss produces).
    """
    torch = _torch()
    gen = torch.Generator().manual_seed(1)
    if isinstance(case, StackCase):
        x = torch.randn(case.tokens, case.d, generator=gen)
        probe = torch.randn(case.tokens, case.dims[-1], generator=gen)
    else:
        seq = min(case.seq, case.tokens)
        x = torch.randn(case.tokens // seq, seq, case.d, generator=gen)
        probe = torch.randn(case.tokens // seq, seq, case.d, generator=gen)
    return x.requires_grad_(True), probe


def core_supports_compute() -> bool:
    """Whether the installed randlora-spec config has the ``compute`` field (issue #6)."""
    from randlora_spec.config import RandLoraConfig

    return "compute" in RandLoraConfig.model_fields


def available_methods() -> list[str]:
    """The methods this installation can run."""
    if core_supports_compute():
        return list(METHODS)
    return [m for m in METHODS if m not in ("core-auto", "core-dense")]


def randlora_params_per_layer(in_f: int, out_f: int, r: int) -> int:
    """Trainable parameters of one RandLoRA layer: lambda (r, nb) + gamma (nb, m)."""
    m = min(in_f, out_f)
    nb = -(-m // r)
    return r * nb + nb * m


def lora_rank(case: Case) -> int:
    """LoRA rank whose trainable-parameter count is closest to RandLoRA's on the same layers."""
    shapes = _target_shapes(case)
    randlora = sum(randlora_params_per_layer(i, o, case.r) for i, o in shapes)
    per_rank = sum(i + o for i, o in shapes)
    return max(1, round(randlora / per_rank))


def _target_shapes(case: Case) -> list[tuple[int, int]]:
    if isinstance(case, StackCase):
        return list(zip(case.dims[:-1], case.dims[1:], strict=True))
    heads = max(1, case.d // 64)
    d, kv = case.d, max(1, heads // 4) * (case.d // heads)
    per_layer = [(d, d), (d, kv), (d, kv), (d, d), (d, 4 * d), (d, 4 * d), (4 * d, d)]
    return per_layer * case.layers


def adapt(method: str, base: Any, targets: list[str], case: Case) -> Any:
    """A deep copy of ``base`` adapted for ``method`` (the base itself is never modified)."""
    model = copy.deepcopy(base)
    if method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if method in CORE_COMPUTE:
        from randlora_core import RandLoraConfig, get_randlora_model

        extra = {"compute": CORE_COMPUTE[method]} if core_supports_compute() else {}
        return get_randlora_model(model, RandLoraConfig(r=case.r, target_modules=targets, **extra))
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "peft-randlora":
            return peft.get_peft_model(model, peft.RandLoraConfig(r=case.r, target_modules=targets))
        rank = lora_rank(case)
        return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))


def make_step(model: Any, forward: Callable[[Any, Any], Any], x: Any, probe: Any) -> Callable[[], None]:
    """One training step: zero grads, forward, ``(y * probe).sum()`` backward, AdamW on trainable params."""
    torch = _torch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        (forward(model, x) * probe).sum().backward()
        if opt is not None:
            opt.step()

    return step


def trainable_count(model: Any) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def chosen_paths(model: Any, case: Case) -> str:
    """Which compute path core's ``auto`` picks for each layer shape, per the cost model (``""`` if unknown)."""
    try:
        from randlora_core.compute import choose_compute
    except ImportError:
        return ""
    torch = _torch()
    picks = []
    for i, o in sorted(set(_target_shapes(case))):
        pick = choose_compute(case.tokens, i, o, case.r, torch.float32, torch.device("cpu"), grad=True)
        picks.append(f"{i}x{o}:{pick}")
    return " ".join(picks)


# ---------------------------------------------------------------------------------------------
# timing


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
            suite="stack" if isinstance(case, StackCase) else "llama",
            case=asdict(case),
            method=method,
            trainable=trainable_count(model),
            lora_rank=lora_rank(case) if method == "peft-lora" else None,
            paths=chosen_paths(model, case) if method == "core-auto" else "",
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
        for rep in range(repeats_n):
            order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
            for method in order:
                t0 = time.perf_counter()
                steps[method]()
                rows[method].times_ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    del steps, base, x, probe
    gc.collect()
    return [rows[m] for m in methods]


# ---------------------------------------------------------------------------------------------
# memory: a fork server with a pinned mmap threshold (see the module docstring)


def _read_status(key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style value from ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _measure_memory(task: dict[str, Any]) -> dict[str, Any]:
    """Runs in a forked child: RSS high-water marks of one training step of one method."""
    case = StackCase(**task["case"]) if task["suite"] == "stack" else LlamaCase(**task["case"])
    # One-time lazy initialisation (TorchScript compilation of core's Philox, PEFT's and
    # transformers' first-use setup) is a per-process cost, not a per-model one: pay it first, on a
    # tiny case of the same suite and method, before the baseline is read. (Not in the server: a
    # fork after torch has run kernels can deadlock in the child.)
    tiny = StackCase("rect", 16, 8, 4) if isinstance(case, StackCase) else LlamaCase(64, 16, 4, layers=1, seq=16)
    base, targets, forward = build_base(tiny)
    x, probe = make_input(tiny)
    make_step(adapt(task["method"], base, targets, tiny), forward, x, probe)()
    del base, x, probe
    gc.collect()
    rss0 = _read_status("VmRSS")
    base, targets, forward = build_base(case)
    x, probe = make_input(case)
    model = adapt(task["method"], base, targets, case)
    del base
    step = make_step(model, forward, x, probe)
    gc.collect()
    rest = _read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    # One step: its peak (in backward, with activations, gradients and temporaries alive) is the
    # steady state's; the AdamW state it creates afterwards is 2 x the adapter parameters, small.
    step()
    peak = _read_status("VmHWM")
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
        task = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(read_fd)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = _measure_memory(task)
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
        print(json.dumps(answer), flush=True)
    return 0


class MemoryClient:
    """Starts :func:`memory_server` in a subprocess with the pinned malloc settings."""

    def __init__(self) -> None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--memory-server"],
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

    def measure(self, suite: str, case: Case, method: str) -> dict[str, Any]:
        """Peak-memory figures of one method on one case."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"suite": suite, "case": asdict(case), "method": method}) + "\n")
        self.proc.stdin.flush()
        return self._expect_line(timeout=1800)

    def close(self) -> None:
        """Stop the server."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------
# other suites


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def merge_suite(dims: list[int], repeats: int) -> list[dict[str, Any]]:
    """Median merge and unmerge times (all adapted layers of a square two-layer stack, r = 32)."""
    rows = []
    for d in dims:
        case = StackCase("square", d, 1, 32)
        base, targets, _ = build_base(case)
        for method in ("core-factored", "peft-randlora"):
            model = adapt(method, base, targets, case)
            if method == "peft-randlora":
                tuner = model.base_model
                merge, unmerge = tuner.merge_adapter, tuner.unmerge_adapter
            else:
                merge, unmerge = model.merge_adapter, model.unmerge_adapter
            merge_s, unmerge_s = [], []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                merge()
                t1 = time.perf_counter()
                unmerge()
                merge_s.append(t1 - t0)
                unmerge_s.append(time.perf_counter() - t1)
            name = "core" if method.startswith("core") else "peft-randlora"
            rows.append(
                {
                    "d": d,
                    "layers": len(targets),
                    "method": name,
                    "merge_ms": statistics.median(merge_s[1:]) * 1e3,
                    "unmerge_ms": statistics.median(unmerge_s[1:]) * 1e3,
                }
            )
    return rows


def bases_suite(torch_shape: tuple[int, int, int], numpy_shape: tuple[int, int, int], repeats: int) -> list[dict[str, Any]]:
    """Basis-generation throughput (elements/s) of the portable rule in torch and numpy, and PEFT's rule."""
    torch = _torch()
    from randlora_core import bases as core_bases
    from randlora_spec import bases as spec_bases

    rows = []
    for impl, shape, fn in (
        ("randlora_core.bases (torch)", torch_shape, lambda s: core_bases.generate_basis(0, spec_bases.TAG_B, s)),
        ("randlora_spec.bases (numpy)", numpy_shape, lambda s: spec_bases.generate_basis(0, spec_bases.TAG_B, s)),
        ("PEFT peft-torch-v1 (kaiming, bf16)", torch_shape, lambda s: _peft_basis(torch, s)),
    ):
        seconds = _median_time(lambda fn=fn, shape=shape: fn(shape), repeats)
        n = math.prod(shape)
        rows.append({"impl": impl, "shape": list(shape), "elements": n, "seconds": seconds, "elements_per_s": n / seconds})
    return rows


def _peft_basis(torch: Any, shape: tuple[int, int, int]) -> Any:
    from peft.tuners.randlora.model import _kaiming_init

    gen = torch.Generator().manual_seed(0)
    # PEFT draws B one (M, 1, r) basis at a time and divides by the empirical std (SPEC 4.6)
    b = torch.cat([_kaiming_init((shape[0], 1, shape[2]), generator=gen) for _ in range(shape[1])], dim=1)
    return b / b.std()


def ablation_suite(smoke: bool, budget_s: float) -> list[dict[str, Any]]:
    """Where the speed of the factored/dense layer function comes from, on one layer (training step, no optimizer).

    Variants, all through randlora_core.functional with the same operands:
    ``per-adapter`` is the pre-issue-#6 path (base ``F.linear`` plus one ``RandLoraFunction`` per
    adapter, each scaling its output and adding it); ``fused factored`` / ``fused dense`` are
    :class:`RandLoraLinearFunction` (scaling folded into S, adapter matmuls accumulated into the base
    output, equal-rank adapters evaluated together); ``plain autograd`` is the factored math through
    ordinary ops (what autograd keeps without a custom function, as PEFT does).
    """
    d, r = (64, 8) if smoke else (1024, 32)
    rows = []
    for n_adapters in (1, 2):
        for tokens in (d // 4, 2 * d):
            for name, ms in _ablation_case(d, r, tokens, n_adapters, budget_s).items():
                rows.append({"d": d, "r": r, "tokens": tokens, "adapters": n_adapters, "variant": name, "ms": ms})
    return rows


def _ablation_case(d: int, r: int, tokens: int, n_adapters: int, budget_s: float) -> dict[str, float]:
    torch = _torch()
    from randlora_core import functional as fn

    gen = torch.Generator().manual_seed(0)
    nb = -(-d // r)
    a_s = torch.randn(r, d, generator=gen)
    b_flat = torch.randn(d, nb * r, generator=gen)
    weight = torch.randn(d, d, generator=gen) / d**0.5
    bias = torch.randn(d, generator=gen)
    adapters = [
        (torch.randn(r, nb, generator=gen).requires_grad_(), torch.randn(nb, d, generator=gen).requires_grad_(), 0.5)
        for _ in range(n_adapters)
    ]
    x = torch.randn(tokens, d, generator=gen, requires_grad=True)
    probe = torch.randn(tokens, d, generator=gen)
    plan_scalings = (tuple(s for *_, s in adapters),)
    ops = [a_s, b_flat, *[t for lam, gamma, _ in adapters for t in (lam, gamma)]]

    def per_adapter(plain: bool = False) -> Any:
        y = torch.nn.functional.linear(x, weight, bias)
        f = fn.adapter_output_plain if plain else fn.adapter_output
        for lam, gamma, s in adapters:
            y = y + f(x, a_s, b_flat, lam, gamma, s, True)
        return y

    def fused(dense: bool) -> Any:
        return fn.linear_forward(fn.LayerPlan(True, False, plan_scalings, dense, dense), x, weight, bias, ops)

    variants: dict[str, Callable[[], Any]] = {
        "plain autograd": lambda: per_adapter(plain=True),
        "per-adapter (RandLoraFunction)": per_adapter,
        "fused factored": lambda: fused(False),
        "fused dense": lambda: fused(True),
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    t_start = time.perf_counter()
    rep = 0
    while rep < 4 or (time.perf_counter() - t_start < budget_s and rep < 16):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            x.grad = None
            for lam, gamma, _ in adapters:
                lam.grad = gamma.grad = None
            t0 = time.perf_counter()
            (variants[name]() * probe).sum().backward()
            if rep:  # the first round warms up
                samples[name].append(time.perf_counter() - t0)
        rep += 1
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def checkpoint_suite() -> list[dict[str, Any]]:
    """Adapter file bytes, core vs PEFT: 8 layers 512x512, r = 32, save_projection True/False."""
    torch = _torch()
    import peft
    from torch import nn

    from randlora_core import RandLoraConfig, get_randlora_model

    class Eight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(512, 512) for _ in range(8))

    rows = []
    targets = [f"layers.{i}" for i in range(8)]
    for save_projection in (True, False):
        torch.manual_seed(0)
        base = Eight()
        with tempfile.TemporaryDirectory() as tmp:
            core = get_randlora_model(
                copy.deepcopy(base), RandLoraConfig(r=32, target_modules=targets, save_projection=save_projection)
            )
            core_path = Path(tmp) / "core.safetensors"
            core.save_adapter(core_path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = peft.get_peft_model(
                    copy.deepcopy(base), peft.RandLoraConfig(r=32, target_modules=targets, save_projection=save_projection)
                )
                pm.save_pretrained(Path(tmp) / "peft")
            peft_bytes = (Path(tmp) / "peft" / "adapter_model.safetensors").stat().st_size
            trainable = trainable_count(core)
            rows.append(
                {
                    "save_projection": save_projection,
                    "trainable": trainable,
                    "fp32_bytes": 4 * trainable,
                    "core_bytes": core_path.stat().st_size,
                    "peft_bytes": peft_bytes,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# calibration of randlora_core.compute's cost model


def _min_time(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum of ``repeats`` timings: for kernel microbenchmarks on a shared machine the minimum is the least noisy."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fit_profile(repeats: int) -> tuple[dict[str, float], list[str]]:
    """Measure GEMMs and elementwise passes; least-squares fit of the :class:`CostProfile` constants."""
    torch = _torch()
    shapes = [(a, b, c) for a in (64, 256, 1024, 4096) for b, c in ((512, 512), (1024, 1024), (2048, 512), (512, 2048))]
    shapes += [(2048, 2048, 2048), (1024, 4096, 1024), (128, 8192, 128)]
    samples = []
    for a, b, c in shapes:
        x, w = torch.randn(a, b), torch.randn(b, c)
        for _ in range(3):  # at most 2 retries when other processes interfered
            wait_quiet(120.0)
            meter = OthersMeter()
            t = _min_time(lambda x=x, w=w: x @ w, repeats)
            if meter.share() <= 0.10:
                break
        samples.append((a, b, c, t))
    big = torch.randn(4096, 1024)
    other = torch.randn(4096, 1024)
    bw = 3 * big.numel() * 4 / _min_time(lambda: big * other, repeats)
    tiny = torch.randn(4)
    op = _min_time(lambda: tiny * tiny, repeats * 20)
    best: tuple[float, float, float] | None = None
    for ramp in (0.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0):
        effective = [2 * a * b * c / ((a / (a + ramp)) * (b / (b + ramp)) * (c / (c + ramp))) for a, b, c, _ in samples]
        flops = statistics.median(e / max(t - op, 1e-9) for e, (*_, t) in zip(effective, samples, strict=True))
        err = sum(math.log((e / flops + op) / t) ** 2 for e, (*_, t) in zip(effective, samples, strict=True))
        if best is None or err < best[0]:
            best = (err, ramp, flops)
    assert best is not None
    fitted = {"gemm_flops": best[2], "gemm_ramp": best[1], "bandwidth": bw, "op_seconds": op}
    lines = ["| GEMM (a x b) @ (b x c) | ms (min) | GFLOP/s |", "|---|---|---|"]
    lines += [f"| {a} x {b} x {c} | {t * 1e3:.2f} | {2 * a * b * c / t / 1e9:.0f} |" for a, b, c, t in samples]
    return fitted, lines


def validate_cost_model(repeats: int, smoke: bool) -> list[str]:
    """Single adapted layers near the crossover: every path timed (training step, no optimizer) against the model's pick.

    The paths are timed in interleaved rounds (rotating order) and compared by their medians, so a
    burst of load from other users hits all of them alike.
    """
    torch = _torch()
    from torch import nn

    from randlora_core import RandLoraConfig, get_randlora_model
    from randlora_core.compute import path_costs

    points = [(64, 64, 32, 64)] if smoke else []
    if not smoke:
        for d in (256, 512, 1024):
            shapes = [(d, d)] + ([(d, 4 * d), (4 * d, d)] if d <= 512 else [])
            for in_f, out_f in shapes:
                for r in (8, 32):
                    points += [(in_f, out_f, r, int(f * d)) for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)]
    lines = [
        "| layer | r | tokens | factored ms | dense ms | hybrid ms | model pick | measured best | pick / best | others |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    regrets = []
    for in_f, out_f, r, tokens in points:
        torch.manual_seed(0)
        model = get_randlora_model(
            nn.Sequential(nn.Linear(in_f, out_f)), RandLoraConfig(r=r, target_modules=["0"], init_weights=False)
        )
        x = torch.randn(tokens, in_f, requires_grad=True)
        probe = torch.randn(tokens, out_f)

        def step(model: Any = model, x: Any = x, probe: Any = probe) -> None:
            x.grad = None
            model.zero_grad(set_to_none=True)
            (model(x) * probe).sum().backward()

        paths = ["factored", "dense"] + (["hybrid"] if in_f <= out_f else [])
        for _ in range(3):  # at most 2 retries when other processes interfered
            wait_quiet(0.0 if smoke else 120.0)
            meter = OthersMeter()
            samples: dict[str, list[float]] = {p: [] for p in paths}
            for rep in range(repeats + 1):
                for path in paths[rep % len(paths) :] + paths[: rep % len(paths)]:
                    t0 = time.perf_counter()
                    _run_path(path, step)
                    if rep:  # the first round warms up
                        samples[path].append(time.perf_counter() - t0)
            others = meter.share()
            if smoke or others <= 0.15:
                break
        times = {p: statistics.median(v) for p, v in samples.items()}
        nb = -(-min(in_f, out_f) // r)
        costs = path_costs(tokens, in_f, out_f, [r * nb])
        pick = min((p for p in costs if p in times), key=lambda k: (costs[k], k != "factored"))
        best = min(times, key=times.__getitem__)
        regrets.append(times[pick] / times[best])
        hybrid = f"{times['hybrid'] * 1e3:.2f}" if "hybrid" in times else "—"
        lines.append(
            f"| {in_f} x {out_f} | {r} | {tokens} | {times['factored'] * 1e3:.2f} | {times['dense'] * 1e3:.2f} | "
            f"{hybrid} | {pick} | {best} | {regrets[-1]:.2f} | {others:.0%} |"
        )
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(
        f"pick / best: median {statistics.median(regrets):.3f}, max {max(regrets):.2f}; "
        f"within 5 % at {sum(r <= 1.05 for r in regrets)} of {len(regrets)} points."
    )
    return lines


def _run_path(path: str, step: Callable[[], None]) -> None:
    """One step with every layer forced onto ``path`` (``hybrid``: dense forward, factored backward)."""
    from randlora_core import functional
    from randlora_core.compute import compute_override

    if path != "hybrid":
        with compute_override(path):  # type: ignore[arg-type]
            step()
        return
    original = functional.RandLoraLinearFunction.apply

    def hybrid(plan: Any, *args: Any) -> Any:
        plan = functional.LayerPlan(plan.in_le_out, plan.weight_in_out, plan.scalings, True, False)
        return original(plan, *args)

    functional.RandLoraLinearFunction.apply = hybrid  # type: ignore[method-assign]
    try:
        with compute_override("dense"):
            step()
    finally:
        functional.RandLoraLinearFunction.apply = original  # type: ignore[method-assign]


def calibrate(out: Path, machine: str, smoke: bool) -> Path:
    """Fit the cost-model constants and check the model's picks; writes ``<machine>-calibration.md``."""
    from randlora_core.compute import CPU_PROFILE

    load_start = _load()
    repeats = 3 if smoke else 7
    fitted, gemm_lines = fit_profile(repeats)
    validation = validate_cost_model(repeats, smoke)
    lines = [
        f"# Cost-model calibration: {machine}",
        "",
        f"`tools/bench.py --calibrate`, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average at start "
        f"{_load_str(load_start)}, at end {_load_str(_load())}. GEMMs: minimum of {repeats} timings; paths: median of "
        f"{repeats} interleaved rounds. Each point waits for the machine to be quiet and is re-timed (at most twice) "
        "when other processes used more than 15 % of the CPU meanwhile (column 'others').",
        "",
        "## Fitted constants",
        "",
        "| constant | fitted now | in randlora_core.compute.CPU_PROFILE |",
        "|---|---|---|",
    ]
    for key, value in fitted.items():
        lines.append(f"| {key} | {value:.4g} | {getattr(CPU_PROFILE, key):.4g} |")
    lines += ["", "## GEMM throughput", "", *gemm_lines, "", "## Picks of the committed model (one layer, training step)", ""]
    lines += validation
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{machine}-calibration.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# report


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


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


def machine_name() -> str:
    """``cpu-<n>core``: the committed results are named after the machine class, not the host."""
    return f"cpu-{os.cpu_count()}core"


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with the results."""
    torch = _torch()
    import peft
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


def _fmt_ms(v: float) -> str:
    if math.isnan(v):
        return "—"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("✓" if ok else "✗")


def _by_case(rows: list[Row]) -> dict[tuple, dict[str, Row]]:
    out: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        key = (row.suite, *row.case.values())
        out.setdefault(key, {})[row.method] = row
    return out


def evaluate(group: dict[str, Row]) -> dict[str, Any]:
    """Ratios and target checks of issue #6 for one case."""
    case = next(iter(group.values())).case
    med = {m: r.median_ms for m, r in group.items()}
    auto = med.get("core-auto", med.get("core-factored", math.nan))
    best = min(med.get("core-factored", math.nan), med.get("core-dense", math.inf))
    peft_ms = med.get("peft-randlora", math.nan)
    floor = med.get("floor", math.nan)
    big = case["tokens"] >= case["d"]
    ev: dict[str, Any] = {
        "auto_vs_peft": auto / peft_ms,
        "auto_vs_floor": auto / floor,
        "auto_vs_best": auto / best,
        "lora_vs_floor": med.get("peft-lora", math.nan) / floor,
        "auto_vs_lora": auto / med.get("peft-lora", math.nan),
    }
    ev["t_peft"] = ev["auto_vs_peft"] <= (0.67 if big else 1.05)
    ev["t_floor"] = ev["auto_vs_floor"] <= 1.7 if big else None
    ev["t_best"] = ev["auto_vs_best"] <= 1.05 if "core-dense" in med else None
    mem_auto = group.get("core-auto", group.get("core-factored"))
    mem_peft = group.get("peft-randlora")
    if mem_auto and mem_peft and mem_auto.mem_total_mib is not None and mem_peft.mem_total_mib is not None:
        ev["mem_ratio"] = mem_auto.mem_total_mib / max(mem_peft.mem_total_mib, 1e-9)
        ev["t_mem"] = mem_auto.mem_total_mib <= mem_peft.mem_total_mib
    else:
        ev["mem_ratio"], ev["t_mem"] = math.nan, None
    return ev


def step_flops(case: dict[str, Any]) -> dict[str, float] | None:
    """Exact flop counts of one training step of a linear stack, per method family (``None`` for other suites).

    The bound the targets run into: every path of the exact RandLoRA math does at least this many
    flops, so a measured ratio can beat these only through GEMM efficiency, never by more. Per
    layer with ``I`` in, ``O`` out, ``m = min``, ``M = max``, ``k = r * ceil(m / r)`` and ``N`` tokens:

    - ``floor`` (frozen base, input gradient): ``4 N I O``;
    - ``factored`` (PEFT's and ours): floor ``+ 2 N k M + 2 N k m`` forward ``+ 2 N k M + 4 N k m``
      backward (no term depends on which side is larger);
    - ``dense`` (ours, nothing kept between forward and backward): floor ``+ 2 M k m`` (build
      ``delta_W``) ``+ 2 M k m`` (rebuild for ``grad_x``) ``+ 2 N I O`` (``G = g^T x``) ``+ 2 M k m``
      (``B^T G``);
    - ``dense_cached``: the same keeping ``W + delta_W`` from forward to backward (one rebuild less,
      one weight-sized tensor more per layer): a bound for any implementation that materialises
      ``delta_W``.
    """
    if "kind" not in case:
        return None
    stack = StackCase(**case)
    n, r = stack.tokens, stack.r
    total = {"floor": 0.0, "factored": 0.0, "dense": 0.0, "dense_cached": 0.0}
    for i, o in itertools.pairwise(stack.dims):
        m, big_m = min(i, o), max(i, o)
        k = r * -(-m // r)
        floor = 4.0 * n * i * o
        total["floor"] += floor
        total["factored"] += floor + 4.0 * n * k * big_m + 6.0 * n * k * m
        total["dense"] += floor + 6.0 * big_m * k * m + 2.0 * n * i * o
        total["dense_cached"] += floor + 4.0 * big_m * k * m + 2.0 * n * i * o
    return total


def flop_bounds(case: dict[str, Any]) -> dict[str, float] | None:
    """Lowest auto/PEFT and auto/floor ratios the exact math allows at equal GEMM efficiency (stacks only)."""
    flops = step_flops(case)
    if flops is None:
        return None
    ours = min(flops["factored"], flops["dense"])
    return {
        "vs_peft": ours / flops["factored"],
        "vs_floor": ours / flops["floor"],
        "vs_peft_any": min(ours, flops["dense_cached"]) / flops["factored"],
        "vs_floor_any": min(ours, flops["dense_cached"]) / flops["floor"],
    }


def step_table(rows: list[Row], suite: str) -> list[str]:
    """Markdown table of medians and ratios for one suite."""
    groups = {k: g for k, g in _by_case(rows).items() if k[0] == suite}
    methods = [m for m in METHODS if any(m in g for g in groups.values())]
    head = "| case | tokens | r | " + " | ".join(methods) + " | auto/PEFT | auto/floor | auto/best | LoRA/floor | auto path |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, g in groups.items():
        case = next(iter(g.values())).case
        ev = evaluate(g)
        name = f"{case.get('kind', 'llama')} d={case['d']}"
        cells = []
        for m in methods:
            cell = _fmt_ms(g[m].median_ms) if m in g else "—"
            if m == "peft-lora" and m in g:
                cell += f" (r={g[m].lora_rank})"
            cells.append(cell)
        auto_row = g.get("core-auto")
        lines.append(
            f"| {name} | {case['tokens']} | {case['r']} | "
            + " | ".join(cells)
            + f" | {ev['auto_vs_peft']:.2f} {_mark(ev['t_peft'])} | {ev['auto_vs_floor']:.2f} {_mark(ev['t_floor'])}"
            + f" | {ev['auto_vs_best']:.2f} {_mark(ev['t_best'])} | {ev['lora_vs_floor']:.2f} | "
            + (auto_row.paths if auto_row else "")
            + " |"
        )
        del key
    return lines


def memory_table(rows: list[Row]) -> list[str]:
    """Markdown table of total peak memory (MiB) per method and the core/PEFT ratio."""
    groups = _by_case(rows)
    methods = [m for m in METHODS if any(m in g and g[m].mem_total_mib is not None for g in groups.values())]
    head = "| case | tokens | r | " + " | ".join(methods) + " | auto/PEFT | step peak auto / PEFT (MiB) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for g in groups.values():
        if not any(r.mem_total_mib is not None for r in g.values()):
            continue
        case = next(iter(g.values())).case
        ev = evaluate(g)
        name = f"{case.get('kind', 'llama')} d={case['d']}"
        cells = [f"{g[m].mem_total_mib:.1f}" if m in g and g[m].mem_total_mib is not None else "—" for m in methods]
        auto = g.get("core-auto", g.get("core-factored"))
        peft_row = g.get("peft-randlora")
        step = f"{auto.mem_step_mib:.1f} / {peft_row.mem_step_mib:.1f}" if auto and peft_row and peft_row.mem_step_mib else "—"
        lines.append(
            f"| {name} | {case['tokens']} | {case['r']} | "
            + " | ".join(cells)
            + f" | {ev['mem_ratio']:.2f} {_mark(ev['t_mem'])} | {step} |"
        )
    return lines


def _same_path_note(group: dict[str, Row]) -> str:
    """A note when auto ran exactly the path of the faster forced method: their gap is then run-to-run spread."""
    auto = group.get("core-auto")
    times = {m: group[m].median_ms for m in ("core-factored", "core-dense") if m in group}
    if auto is None or not times or not auto.paths:
        return ""
    best = min(times, key=lambda m: times[m]).removeprefix("core-")
    if all(p.rsplit(":", 1)[-1] == best for p in auto.paths.split()):
        return f" (auto ran the {best} path on every layer, as core-{best} did: the gap is timing spread)"
    return ""


def target_summary(rows: list[Row]) -> list[str]:
    """Counts of met targets and the list of points where a target is not met."""
    lines = []
    groups = _by_case(rows)
    checks = {
        "t_peft": "auto <= 0.67 x PEFT RandLoRA where tokens >= d, <= 1.05 x elsewhere",
        "t_floor": "auto <= 1.7 x frozen-base floor where tokens >= d",
        "t_best": "auto <= 1.05 x min(factored, dense)",
        "t_mem": "peak memory (total) auto <= PEFT RandLoRA",
    }
    lines.append(
        "Flop bound: the ratio the exact math allows at equal GEMM efficiency (`step_flops`; linear stacks only): "
        "ours = the cheaper of factored and dense, 'any materialising path' also keeps `W + delta_W` alive from "
        "forward to backward. A measured ratio above its bound is a kernel-efficiency gap; a target below the "
        "bound cannot be met by any implementation of these paths. See bench/NOTES.md."
    )
    lines.append("")
    for key, text in checks.items():
        results = [(g, evaluate(g)) for g in groups.values()]
        applicable = [(g, ev) for g, ev in results if ev[key] is not None]
        met = sum(1 for _, ev in applicable if ev[key])
        lines.append(f"- **{text}**: met at {met} of {len(applicable)} points.")
        for g, ev in applicable:
            if not ev[key]:
                case = next(iter(g.values())).case
                figure = {
                    "t_peft": f"auto/PEFT = {ev['auto_vs_peft']:.2f}",
                    "t_floor": f"auto/floor = {ev['auto_vs_floor']:.2f}",
                    "t_best": f"auto/best = {ev['auto_vs_best']:.2f}" + _same_path_note(g),
                    "t_mem": f"auto/PEFT memory = {ev['mem_ratio']:.2f}",
                }[key]
                bounds = flop_bounds(case)
                if bounds is not None and key == "t_peft":
                    figure += f" (flop bound {bounds['vs_peft']:.2f}; any materialising path {bounds['vs_peft_any']:.2f})"
                elif bounds is not None and key == "t_floor":
                    figure += f" (flop bound {bounds['vs_floor']:.2f}; any materialising path {bounds['vs_floor_any']:.2f})"
                name = f"{case.get('kind', 'llama')} d={case['d']} tokens={case['tokens']} r={case['r']}"
                lines.append(f"  - not met: {name}: {figure}")
    return lines


def plot(rows: list[Row], path: Path) -> None:
    """Step time against tokens, one panel per (stack kind, d), r = 32, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = [r for r in rows if r.suite == "stack"]
    kinds = sorted({r.case["kind"] for r in stack})
    ds = sorted({r.case["d"] for r in stack})
    rs = sorted({r.case["r"] for r in stack})
    r_plot = 32 if 32 in rs else rs[-1]
    fig, axes = plt.subplots(len(kinds), len(ds), figsize=(4.2 * len(ds), 3.6 * len(kinds)), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for method in METHODS:
                pts = sorted(
                    (r.case["tokens"], r.median_ms)
                    for r in stack
                    if r.case["kind"] == kind and r.case["d"] == d and r.case["r"] == r_plot and r.method == method
                )
                if pts:
                    style = "--" if method.startswith("peft") else ("-" if method != "floor" else ":")
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.axvline(d, color="grey", lw=0.5)
            ax.set_title(f"{kind} d={d} r={r_plot}", fontsize=9)
            ax.set_xlabel("tokens per step")
            ax.set_ylabel("step time (ms)")
            ax.grid(True, which="both", lw=0.2)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, machine: str, data: dict[str, Any], rows: list[Row]) -> Path:
    """Write ``<machine>.md``, ``<machine>.json`` and ``<machine>-steptime.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{machine}.json").write_text(
        json.dumps({**data, "rows": [{**asdict(r), "median_ms": r.median_ms} for r in rows]}, indent=1, default=str) + "\n"
    )
    png = out / f"{machine}-steptime.png"
    if any(r.suite == "stack" for r in rows):
        plot(rows, png)
    env = data["environment"]
    lines = [
        f"# RandLoRA benchmark: {machine}",
        "",
        f"Generated by `tools/bench.py{' --smoke' if data['smoke'] else ''}` (`nox -s bench`) in one process run.",
        "",
        f"- CPU: {env['cpu']}, {env['cpus']} cores, torch threads {env['torch_threads']}",
        f"- python {env['python']}, torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}",
        f"- commit {env['commit']}, {env['date']}, run time {data['duration_s'] / 60:.1f} min",
        f"- load average (1/5/15 min) at start {data['load_start']}, at end {data['load_end']}",
        f"- timed rounds per case: as many as fit in {data['budget_s']:.0f} s, at least {data['repeats'][0]} and at most "
        f"{data['repeats'][1]}, after {data['warmup']} warm-up round; one round = one step of every method, in an order "
        "that rotates every round; tables give medians",
        f"- 1-minute load average sampled at each case: median {_median_load(rows):.2f}, max {_max_load(rows):.2f}",
        f"- CPU used by other processes while a case was timed (/proc/stat minus this process): median "
        f"{_median_others(rows):.1%}, max {_max_others(rows):.1%}; a case over {data['max_others']:.0%} was timed again "
        f"(at most {data.get('retries', 0)} times), and before each case the run waited for the machine to be quiet "
        f"({data['waited_s'] / 60:.1f} min of waiting in total)",
    ]
    if data.get("dropped"):
        lines.append(f"- dropped from the grid (time budget): {', '.join(data['dropped'])}")
    if data.get("re_rendered"):
        lines.append(f"- report re-rendered from `{machine}.json` ({data['re_rendered']}); every number is the run's above")
    lines += ["", "Step = forward + backward + AdamW on the adapter parameters; the input requires grad. Times in ms.", ""]
    lines += ["## Targets", "", *target_summary(rows), ""]
    lines += ["## Linear stacks", "", *step_table(rows, "stack"), ""]
    if any(r.suite == "llama" for r in rows):
        lines += ["## Llama-style transformer (2 decoder layers, all linear projections adapted)", ""]
        lines += [*step_table(rows, "llama"), ""]
    if any(r.mem_total_mib is not None for r in rows):
        lines += ["## Peak memory (MiB above the RSS before the model was built; fresh forked process each)", ""]
        lines += [*memory_table(rows), ""]
    if data.get("merge"):
        lines += ["## Merge / unmerge (all adapted layers of the square stack, r = 32)", ""]
        lines += ["| d | layers | impl | merge ms | unmerge ms |", "|---|---|---|---|---|"]
        lines += [
            f"| {m['d']} | {m['layers']} | {m['method']} | {m['merge_ms']:.2f} | {m['unmerge_ms']:.2f} |" for m in data["merge"]
        ]
        lines.append("")
    if data.get("bases"):
        lines += ["## Basis generation throughput", "", "| implementation | shape | elements/s |", "|---|---|---|"]
        lines += [f"| {b['impl']} | {tuple(b['shape'])} | {b['elements_per_s'] / 1e6:.1f} M |" for b in data["bases"]]
        lines.append("")
    if data.get("checkpoint"):
        lines += ["## Checkpoint size (8 layers 512x512, r = 32)", ""]
        lines += ["| save_projection | trainable | fp32 bytes | core file | PEFT file | PEFT/core |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {c['save_projection']} | {c['trainable']:,} | {c['fp32_bytes']:,} | {c['core_bytes']:,} | {c['peft_bytes']:,} "
            f"| {c['peft_bytes'] / c['core_bytes']:.1f} |"
            for c in data["checkpoint"]
        ]
        lines.append("")
    if data.get("ablation"):
        lines += ["## Where the speed comes from (one square layer, training step without optimizer, ms)", ""]
        variants = list(dict.fromkeys(a["variant"] for a in data["ablation"]))
        lines += [
            "| d | r | tokens | active adapters | " + " | ".join(variants) + " |",
            "|---|---|---|---|" + "---|" * len(variants),
        ]
        keys = list(dict.fromkeys((a["d"], a["r"], a["tokens"], a["adapters"]) for a in data["ablation"]))
        for key in keys:
            got = {a["variant"]: a["ms"] for a in data["ablation"] if (a["d"], a["r"], a["tokens"], a["adapters"]) == key}
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(f"{got[v]:.1f}" for v in variants) + " |")
        lines.append("")
    if png.exists():
        lines += ["## Plot", "", f"![step time vs tokens]({png.name})", ""]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists() and not data["smoke"]:
        lines += ["## Analysis", "", "See [`bench/NOTES.md`](../NOTES.md) for the cost model and the remaining gaps.", ""]
    path = out / f"{machine}.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------
# main


def grid(smoke: bool) -> tuple[list[Case], list[str]]:
    """The cases to time, and the labels of those dropped for time."""
    if smoke:
        return [StackCase("square", 64, 32, 8), StackCase("rect", 64, 128, 8), LlamaCase(64, 64, 8, seq=32)], []
    cases: list[Case] = []
    dropped = []
    for kind in GRID_KINDS:
        for d in GRID_D:
            for tokens in GRID_TOKENS:
                for r in GRID_R:
                    case = StackCase(kind, d, tokens, r)
                    if (kind, d, tokens) in DROPPED:
                        dropped.append(f"{kind} d={d} tokens={tokens} r={r}")
                    else:
                        cases.append(case)
    cases += [LlamaCase(d, tokens, 32) for d, tokens in LLAMA_GRID]
    return cases, dropped


@contextmanager
def _phase(name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    yield
    print(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (seconds): proves the benchmark runs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default bench/results, smoke: a temp dir)")
    parser.add_argument("--machine", default=None, help="name of the results files (default cpu-<n>core)")
    parser.add_argument(
        "--repeats",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="timed rounds per case (default 3 15, smoke 1 2)",
    )
    parser.add_argument(
        "--case-budget", type=float, default=None, help="seconds of timed rounds per case (default 12, smoke 0.5)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method before timing")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory suite")
    parser.add_argument(
        "--quiet-wait", type=float, default=None, help="max seconds to wait for other CPU users before a case (120)"
    )
    parser.add_argument("--max-others", type=float, default=0.15, help="re-time a case if others used more of the CPU (0.15)")
    parser.add_argument("--retries", type=int, default=None, help="re-timings per case at most (2; smoke 0)")
    parser.add_argument("--only", default=None, help="run only cases whose label contains this text")
    parser.add_argument("--calibrate", action="store_true", help="fit/check the cost model of randlora_core.compute")
    parser.add_argument("--memory-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--report-from", type=Path, default=None, help="rewrite the report of an earlier run from its JSON (no measuring)"
    )
    args = parser.parse_args(argv)
    if args.memory_server:
        return memory_server()
    if args.report_from is not None:
        print(f"[bench] wrote {report_from(args.report_from)}")
        return 0
    warnings.filterwarnings("ignore")
    if args.calibrate:
        out = args.out or (Path(tempfile.mkdtemp(prefix="randlora-bench-")) if args.smoke else DEFAULT_OUT)
        print(f"[bench] wrote {calibrate(out, args.machine or machine_name(), args.smoke)}")
        return 0
    start, load_start = time.time(), _load()
    repeats = tuple(args.repeats) if args.repeats else ((1, 2) if args.smoke else (3, 15))
    budget = args.case_budget if args.case_budget is not None else (0.5 if args.smoke else 12.0)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.smoke else 120.0
    if args.retries is None:
        args.retries = 0 if args.smoke else 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="randlora-bench-")) if args.smoke else DEFAULT_OUT)
    machine = args.machine or machine_name()
    cases, dropped = grid(args.smoke)
    if args.only:
        cases = [c for c in cases if args.only in c.label]
    methods = available_methods()
    rows: list[Row] = []
    mem: dict[tuple[str, str], dict[str, Any]] = {}
    if not args.no_memory:
        with _phase("peak memory (forked children)"):
            client = MemoryClient()
            try:
                mem_cases = cases[:1] if args.smoke else cases
                for case in mem_cases:
                    for method in methods:
                        suite = "stack" if isinstance(case, StackCase) else "llama"
                        mem[(case.label, method)] = client.measure(suite, case, method)
                    print(f"  {case.label}: " + ", ".join(f"{m}={mem[(case.label, m)]}" for m in methods), flush=True)
            finally:
                client.close()
    with _phase(f"training steps ({len(cases)} cases x {len(methods)} methods)"):
        waited = 0.0
        for case in cases:
            t0 = time.perf_counter()
            attempts = 0
            while True:
                attempts += 1
                waited += wait_quiet(args.quiet_wait)
                meter = OthersMeter()
                case_rows = time_case(case, methods, repeats, args.warmup, budget)
                others = meter.share()
                if others <= args.max_others or attempts > args.retries:
                    break
                print(f"  {case.label}: others used {others:.0%} of the CPU, measuring again", flush=True)
            for row in case_rows:
                row.others, row.attempts = others, attempts
            for row in case_rows:
                got = mem.get((case.label, row.method))
                if got and "error" not in got:
                    row.mem_total_mib, row.mem_step_mib = got["total_mib"], got["step_mib"]
            rows += case_rows
            meds = " ".join(f"{r.method}={r.median_ms:.1f}" for r in case_rows)
            print(f"  {case.label} ({time.perf_counter() - t0:.0f}s, others {others:.0%}): {meds}", flush=True)
    data: dict[str, Any] = {
        "smoke": args.smoke,
        "repeats": list(repeats),
        "budget_s": budget,
        "warmup": args.warmup,
        "waited_s": waited,
        "retries": args.retries,
        "max_others": args.max_others,
        "dropped": dropped,
    }
    with _phase("merge, bases, checkpoints"):
        data["merge"] = merge_suite([64] if args.smoke else [512, 1024, 2048], 1 if args.smoke else 5)
        small = (64, 8, 8)
        data["bases"] = bases_suite(
            small if args.smoke else (4096, 128, 32), small if args.smoke else (512, 32, 32), 1 if args.smoke else 3
        )
        data["checkpoint"] = checkpoint_suite()
        data["ablation"] = ablation_suite(args.smoke, 1.0 if args.smoke else 10.0)
    data.update(environment=environment(), load_start=_load_str(load_start), load_end=_load_str(_load()))
    data["duration_s"] = time.time() - start
    path = write_report(out, machine, data, rows)
    print(f"[bench] wrote {path} ({data['duration_s']:.0f}s)")
    return 0


def report_from(json_path: Path) -> Path:
    """Rewrite ``<machine>.md`` (and the plot) next to ``json_path`` from the measurements it holds.

    The numbers are the earlier run's; only the report's analysis (bounds, notes) is new.
    """
    saved = json.loads(json_path.read_text())
    fields = {f for f in Row.__dataclass_fields__}
    rows = [Row(**{k: v for k, v in row.items() if k in fields}) for row in saved.pop("rows")]
    saved["re_rendered"] = f"`tools/bench.py --report-from` at commit {environment()['commit']}"
    return write_report(json_path.parent, json_path.stem, saved, rows)


def _median_load(rows: list[Row]) -> float:
    loads = [r.load for r in rows if r.method == "floor"]
    return statistics.median(loads) if loads else math.nan


def _median_others(rows: list[Row]) -> float:
    values = [r.others for r in rows if r.method == "floor"]
    return statistics.median(values) if values else math.nan


def _max_others(rows: list[Row]) -> float:
    return max((r.others for r in rows), default=math.nan)


def _max_load(rows: list[Row]) -> float:
    return max((r.load for r in rows), default=math.nan)


def _load_str(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


if __name__ == "__main__":
    sys.exit(main())
