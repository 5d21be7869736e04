"""Calibration of randlora-core's cost model (``--calibrate``): fit its constants, check its picks on single layers."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from . import COMMAND
from .core_internals import model_pick, profile_constants, run_path
from .machine import Quiet, load, load_str, measure_quietly
from .timing import interleaved, repeat_times

T = TypeVar("T")
RETRIES = 2
"""Re-timings of a point that other processes disturbed."""


def _quietly(measure: Callable[[], T], smoke: bool, max_others: float) -> Quiet[T]:
    """:func:`measure_quietly` for one calibration point: a smoke run neither waits for quiet nor re-times."""
    return measure_quietly(measure, 0.0 if smoke else 120.0, max_others, 0 if smoke else RETRIES)


def min_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum of ``repeats`` timings: for kernel microbenchmarks on a shared machine the minimum is the least noisy."""
    return min(repeat_times(fn, repeats))


def fit_profile(repeats: int, smoke: bool) -> tuple[dict[str, float], list[str]]:
    """Measure GEMMs and elementwise passes; least-squares fit of the ``CostProfile`` constants."""
    import torch

    shapes = [(a, b, c) for a in (64, 256, 1024, 4096) for b, c in ((512, 512), (1024, 1024), (2048, 512), (512, 2048))]
    shapes += [(2048, 2048, 2048), (1024, 4096, 1024), (128, 8192, 128)]
    samples = []
    for a, b, c in shapes:
        x, w = torch.randn(a, b), torch.randn(b, c)
        t = _quietly(lambda x=x, w=w: min_time(lambda: x @ w, repeats), smoke, 0.10)
        samples.append((a, b, c, t.result))
    big = torch.randn(4096, 1024)
    other = torch.randn(4096, 1024)
    bw = 3 * big.numel() * 4 / min_time(lambda: big * other, repeats)
    tiny = torch.randn(4)
    op = min_time(lambda: tiny * tiny, repeats * 20)
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


def validation_points(smoke: bool) -> list[tuple[int, int, int, int]]:
    """``(in, out, r, tokens)`` of the single layers checked: widths 256-1024, square and 1:4, around the crossover."""
    if smoke:
        return [(64, 64, 32, 64)]
    points = []
    for d in (256, 512, 1024):
        shapes = [(d, d)] + ([(d, 4 * d), (4 * d, d)] if d <= 512 else [])
        for in_f, out_f in shapes:
            for r in (8, 32):
                points += [(in_f, out_f, r, int(f * d)) for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)]
    return points


def validate_cost_model(repeats: int, smoke: bool) -> list[str]:
    """Single adapted layers near the crossover: every path timed (training step, no optimizer) against the model's pick.

    The paths are timed in interleaved rounds (rotating order) and compared by their medians, so a
    burst of load from other users hits all of them alike.
    """
    import torch
    from torch import nn

    from randlora_core import RandLoraConfig, get_randlora_model

    lines = [
        "| layer | r | tokens | factored ms | dense ms | hybrid ms | model pick | measured best | pick / best | others |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    regrets = []
    for in_f, out_f, r, tokens in validation_points(smoke):
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
        fns = {p: lambda p=p, step=step: run_path(p, step) for p in paths}
        timed = _quietly(lambda fns=fns: interleaved(fns, lambda rep, _: rep <= repeats), smoke, 0.15)
        times = {p: statistics.median(v) for p, v in timed.result.items()}
        pick = model_pick(tokens, in_f, out_f, r, list(times))
        best = min(times, key=times.__getitem__)
        regrets.append(times[pick] / times[best])
        hybrid = f"{times['hybrid'] * 1e3:.2f}" if "hybrid" in times else "—"
        lines.append(
            f"| {in_f} x {out_f} | {r} | {tokens} | {times['factored'] * 1e3:.2f} | {times['dense'] * 1e3:.2f} | "
            f"{hybrid} | {pick} | {best} | {regrets[-1]:.2f} | {timed.others:.0%} |"
        )
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(
        f"pick / best: median {statistics.median(regrets):.3f}, max {max(regrets):.2f}; "
        f"within 5 % at {sum(r <= 1.05 for r in regrets)} of {len(regrets)} points."
    )
    return lines


def calibrate(out: Path, machine: str, smoke: bool) -> Path:
    """Fit the cost-model constants and check the model's picks; writes ``<machine>-calibration.md``."""
    profile = profile_constants()
    load_start = load()
    repeats = 3 if smoke else 7
    fitted, gemm_lines = fit_profile(repeats, smoke)
    validation = validate_cost_model(repeats, smoke)
    lines = [
        f"# Cost-model calibration: {machine}",
        "",
        f"`{COMMAND} --calibrate`, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average at start "
        f"{load_str(load_start)}, at end {load_str(load())}. GEMMs: minimum of {repeats} timings; paths: median of "
        f"{repeats} interleaved rounds. Each point waits for the machine to be quiet and is re-timed (at most twice) "
        "when other processes used more than 15 % of the CPU meanwhile (column 'others').",
        "",
        "## Fitted constants",
        "",
        "| constant | fitted now | in randlora_core.compute.CPU_PROFILE |",
        "|---|---|---|",
    ]
    for key, value in fitted.items():
        lines.append(f"| {key} | {value:.4g} | {getattr(profile, key):.4g} |")
    lines += ["", "## GEMM throughput", "", *gemm_lines, "", "## Picks of the committed model (one layer, training step)", ""]
    lines += validation
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{machine}-calibration.md"
    path.write_text("\n".join(lines) + "\n")
    return path
