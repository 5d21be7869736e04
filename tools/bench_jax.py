#!/usr/bin/env python3
"""randlora-jax's jit-compiled training step next to randlora-core's, for the same model shapes.

Everything is measured in ONE process run: for every case the JAX and torch models are built side by
side (the same base weights) and their training steps are timed in alternating order (the order
rotates every round, so slow drifts of a shared machine hit every method alike). The report gives
per-method medians, the raw numbers behind every ratio, and the load average.

A training step is forward + backward + AdamW on the adapter parameters, with the input's gradient
computed too (as for every layer but the first of a real model); the loss is ``sum(y * probe)``.

- ``jax-auto`` / ``jax-factored`` / ``jax-dense``: randlora-jax, ``compute`` set to each value; the
  step is one ``nnx.jit``-compiled function (forward, ``nnx.value_and_grad``, ``optimizer.update``).
- ``core-auto``: randlora-core with its default ``compute="auto"``.
- ``jax-floor`` / ``core-floor``: the frozen base model, forward + backward for the input's gradient
  only: what no adapter can beat, per framework.

Cases: ``square`` (two d x d layers) and ``rect`` (d -> 4d -> d) stacks of linear layers at several
widths and token counts, as in ``tools/bench.py``, plus ``example``: the model of
``examples/jax_finetune.py`` (64 -> 256 -> 256 -> 10 MLP, batch 128).

Usage::

    python tools/bench_jax.py            # full run (a few minutes on 2 cores), writes bench/results/jax-cpu-2core.md
    python tools/bench_jax.py --smoke    # tiny shapes in seconds, writes to a temporary directory
    python tools/bench_jax.py --report-from bench/results/jax-cpu-2core.json   # re-render a report
    nox -s bench_jax [-- --smoke]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx
from torch import nn

import randlora_core
import randlora_jax

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["jax-auto", "jax-factored", "jax-dense", "core-auto", "jax-floor", "core-floor"]


@dataclass(frozen=True)
class Case:
    """A stack of linear layers with feature sizes ``dims`` and ``tokens`` input rows."""

    kind: str
    dims: tuple[int, ...]
    tokens: int
    r: int

    @property
    def label(self) -> str:
        """Short identifier used in logs and tables."""
        return f"{self.kind} {'-'.join(map(str, self.dims))} tokens={self.tokens} r={self.r}"


def grid(smoke: bool) -> list[Case]:
    """The cases of a run."""
    if smoke:
        return [Case("square", (32, 32, 32), 64, 8), Case("example", (64, 256, 256, 10), 128, 16)]
    cases = [Case("example", (64, 256, 256, 10), 128, 16)]
    for d, kind, factor in itertools.product((256, 512, 1024), ("square", "rect"), (1, 4)):
        dims = (d, d, d) if kind == "square" else (d, 4 * d, d)
        cases.append(Case(kind, dims, factor * d, 32))
    return cases


class JaxStack(nnx.Module):
    """Linear layers ``l0``, ``l1``, ...; the ``example`` case puts GELUs between them."""

    def __init__(self, dims: tuple[int, ...], activation: bool) -> None:
        rngs = nnx.Rngs(0)
        self.names = tuple(f"l{i}" for i in range(len(dims) - 1))
        for name, (a, b) in zip(self.names, itertools.pairwise(dims), strict=True):
            setattr(self, name, nnx.Linear(a, b, rngs=rngs))
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layers in order."""
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x)
            if self.activation and i < len(self.names) - 1:
                x = jax.nn.gelu(x, approximate=False)
        return x


class TorchStack(nn.Module):
    """The torch twin of :class:`JaxStack`, with the same base weights."""

    def __init__(self, source: JaxStack) -> None:
        super().__init__()
        self.names, self.activation = list(source.names), source.activation
        for name in self.names:
            layer = getattr(source, name)
            twin = nn.Linear(layer.in_features, layer.out_features)
            with torch.no_grad():
                twin.weight.copy_(torch.from_numpy(np.array(layer.kernel.get_value()).T))
                twin.bias.copy_(torch.from_numpy(np.array(layer.bias.get_value())))
            self.add_module(name, twin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layers in order."""
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x)
            if self.activation and i < len(self.names) - 1:
                x = nn.functional.gelu(x)
        return x


def jax_step(case: Case, compute: str | None, x: np.ndarray, probe: np.ndarray) -> tuple[Callable[[], None], int]:
    """A jit-compiled JAX training step (``compute=None``: the frozen floor) and its trainable count."""
    base = JaxStack(case.dims, case.kind == "example")
    xj, pj = jnp.asarray(x), jnp.asarray(probe)
    if compute is None:
        graphdef, state = nnx.split(base)

        @jax.jit
        def floor(x_: jax.Array, state: nnx.State) -> jax.Array:
            return jax.grad(lambda v: jnp.sum(nnx.merge(graphdef, state)(v) * pj))(x_)

        return lambda: floor(xj, state).block_until_ready(), 0
    config = randlora_jax.RandLoraConfig(r=case.r, randlora_alpha=2.0 * case.r, target_modules=list(base.names), compute=compute)
    model = randlora_jax.get_randlora_model(base, config)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=randlora_jax.trainable)

    @nnx.jit
    def step(model: randlora_jax.RandLoraModel, optimizer: nnx.Optimizer, x_: jax.Array) -> jax.Array:
        def loss(m: randlora_jax.RandLoraModel, v: jax.Array) -> jax.Array:
            return jnp.sum(m(v) * pj)

        _, (grads, grad_x) = nnx.value_and_grad(loss, argnums=(nnx.DiffState(0, randlora_jax.trainable), 1))(model, x_)
        optimizer.update(model, grads)
        return grad_x

    return lambda: step(model, optimizer, xj).block_until_ready(), model.trainable_parameters()[0]


def core_step(case: Case, adapted: bool, x: np.ndarray, probe: np.ndarray) -> tuple[Callable[[], None], int]:
    """randlora-core's training step (``adapted=False``: the frozen floor) and its trainable count."""
    model: nn.Module = TorchStack(JaxStack(case.dims, case.kind == "example"))
    for p in model.parameters():
        p.requires_grad_(False)
    if adapted:
        config = randlora_core.RandLoraConfig(r=case.r, randlora_alpha=2.0 * case.r, target_modules=list(model.names))
        model = randlora_core.get_randlora_model(model, config)
    xt, pt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(probe)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        xt.grad = None
        (model(xt) * pt).sum().backward()
        if opt is not None:
            opt.step()

    return step, sum(p.numel() for p in params)


@dataclass
class Row:
    """Step times of one method on one case."""

    case: dict[str, Any]
    method: str
    trainable: int
    times_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        """Median step time."""
        return statistics.median(self.times_ms)


def time_case(case: Case, rounds: tuple[int, int], budget_s: float) -> list[Row]:
    """Time every method on ``case``: one step of each per round, the order rotating every round."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((case.tokens, case.dims[0]), dtype=np.float32)
    probe = rng.standard_normal((case.tokens, case.dims[-1]), dtype=np.float32)
    makers = {
        "jax-auto": lambda: jax_step(case, "auto", x, probe),
        "jax-factored": lambda: jax_step(case, "factored", x, probe),
        "jax-dense": lambda: jax_step(case, "dense", x, probe),
        "core-auto": lambda: core_step(case, True, x, probe),
        "jax-floor": lambda: jax_step(case, None, x, probe),
        "core-floor": lambda: core_step(case, False, x, probe),
    }
    steps, rows = {}, {}
    for method in METHODS:
        steps[method], trainable = makers[method]()
        rows[method] = Row(asdict(case), method, trainable)
    t0 = time.perf_counter()
    for method in METHODS:  # warm-up: compiles the JAX steps, fills torch's caches
        steps[method]()
        steps[method]()
    round_s = (time.perf_counter() - t0) / 2
    count = max(rounds[0], min(rounds[1], int(budget_s / max(round_s, 1e-9))))
    gc.collect()
    gc.disable()  # a collection inside one method's step would be charged to it alone
    try:
        for index in range(count):
            order = METHODS[index % len(METHODS) :] + METHODS[: index % len(METHODS)]
            for method in order:
                t0 = time.perf_counter()
                steps[method]()
                rows[method].times_ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return [rows[m] for m in METHODS]


def environment() -> dict[str, Any]:
    """Versions, machine and commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        sha = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": sha,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def oversubscribed(env: dict[str, Any], start: tuple[float, ...], end: tuple[float, ...]) -> list[str]:
    """A warning line when other processes kept more runnable threads than there are CPUs."""
    if max(start[0], end[0]) <= env["cpus"]:
        return []
    return [
        f"- **the machine was oversubscribed** (1-minute load above its {env['cpus']} CPUs): every method shared "
        "the cores with other processes. Multi-threaded steps degrade unevenly under oversubscription (torch's "
        "OpenMP threads wait on each other more than XLA's thread pool does), so these ratios are not those of a "
        "quiet machine; rerun `nox -s bench_jax` on one."
    ]


def render(rows: list[Row], env: dict[str, Any], loads: tuple[tuple[float, ...], tuple[float, ...]], minutes: float) -> str:
    """The Markdown report."""
    start, end = loads
    lines = [
        "# randlora-jax vs randlora-core: training step on CPU",
        "",
        "Generated by `tools/bench_jax.py` (`nox -s bench_jax`) in one process run.",
        "",
        f"- {env['cpus']} CPUs, torch threads {env['torch_threads']}, XLA CPU default threading",
        f"- python {env['python']}, jax {env['jax']}, flax {env['flax']}, torch {env['torch']}",
        f"- commit {env['commit']}, {env['date']}, run time {minutes:.1f} min",
        f"- load average (1/5/15 min) at start {start[0]:.2f} / {start[1]:.2f} / {start[2]:.2f}, "
        f"at end {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f}",
        "- one round = one step of every method, in an order that rotates every round; medians over rounds",
        *oversubscribed(env, start, end),
        "",
        "Step = forward + backward + AdamW on the adapter parameters, input gradient included; the JAX step is "
        "one `nnx.jit`-compiled function. Times in ms (median; min-max in the raw table).",
        "",
        "| case | jax-auto | core-auto | jax-auto / core-auto | jax-factored | jax-dense | jax-floor | core-floor "
        "| jax-auto / jax-floor | core-auto / core-floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault(Case(**{**row.case, "dims": tuple(row.case["dims"])}).label, {})[row.method] = row
    for label, group in by_case.items():
        m = {k: v.median_ms for k, v in group.items()}
        lines.append(
            f"| {label} | {m['jax-auto']:.2f} | {m['core-auto']:.2f} | {m['jax-auto'] / m['core-auto']:.2f} "
            f"| {m['jax-factored']:.2f} | {m['jax-dense']:.2f} | {m['jax-floor']:.2f} | {m['core-floor']:.2f} "
            f"| {m['jax-auto'] / m['jax-floor']:.2f} | {m['core-auto'] / m['core-floor']:.2f} |"
        )
    lines += [
        "",
        "## Raw step times (ms)",
        "",
        "| case | method | trainable | rounds | median | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, group in by_case.items():
        for method, row in group.items():
            lines.append(
                f"| {label} | {method} | {row.trainable} | {len(row.times_ms)} | {row.median_ms:.3f} "
                f"| {min(row.times_ms):.3f} | {max(row.times_ms):.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few rounds; report to a temporary directory")
    parser.add_argument("--out", type=Path, default=None, help="directory for the report (default bench/results)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed rounds per case")
    parser.add_argument("--report-from", type=Path, default=None, help="re-render the report of a run's JSON")
    args = parser.parse_args(argv)
    if args.report_from is not None:
        run = json.loads(args.report_from.read_text())
        rows = [Row(r["case"], r["method"], r["trainable"], r["times_ms"]) for r in run["rows"]]
        loads = (tuple(run["loads"][0]), tuple(run["loads"][1]))
        (args.report_from.parent / "jax-cpu-2core.md").write_text(render(rows, run["env"], loads, run["minutes"]))
        return 0
    out = args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "bench" / "results")
    rounds, budget = ((2, 3), 0.5) if args.smoke else ((5, 40), args.budget)
    start_load, started = os.getloadavg(), time.perf_counter()
    rows: list[Row] = []
    for case in grid(args.smoke):
        case_rows = time_case(case, rounds, budget)
        rows += case_rows
        medians = ", ".join(f"{r.method} {r.median_ms:.2f}" for r in case_rows)
        print(f"{case.label}: {medians} ms (load {os.getloadavg()[0]:.2f})", flush=True)
    env, loads, minutes = environment(), (start_load, os.getloadavg()), (time.perf_counter() - started) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "jax-cpu-2core.md").write_text(render(rows, env, loads, minutes))
    run = {"env": env, "loads": loads, "minutes": minutes, "rows": [asdict(r) for r in rows]}
    (out / "jax-cpu-2core.json").write_text(json.dumps(run, indent=1) + "\n")
    print(f"wrote {out / 'jax-cpu-2core.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
