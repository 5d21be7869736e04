"""The targets of issue #6 per case, and the flop bounds of the exact math they are measured against."""

from __future__ import annotations

import itertools
import math
from typing import Any

from .cases import StackCase, case_name
from .timing import Row

Group = dict[str, Row]
"""The rows of one case, by method."""


def by_case(rows: list[Row]) -> dict[tuple, Group]:
    """Rows grouped by (suite, case fields), in the order the cases were run."""
    out: dict[tuple, Group] = {}
    for row in rows:
        key = (row.suite, *row.case.values())
        out.setdefault(key, {})[row.method] = row
    return out


def case_of(group: Group) -> dict[str, Any]:
    """The case fields of a group."""
    return next(iter(group.values())).case


def auto_row(group: Group) -> Row | None:
    """The row of core's ``auto`` method, or of ``core-factored`` where the installed core has no ``compute``."""
    return group.get("core-auto", group.get("core-factored"))


def evaluate(group: Group) -> dict[str, Any]:
    """Ratios and target checks of issue #6 for one case."""
    case = case_of(group)
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
    mem_auto = auto_row(group)
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


def same_path_note(group: Group) -> str:
    """A note when auto ran exactly the path of the faster forced method: their gap is then run-to-run spread."""
    auto = group.get("core-auto")
    times = {m: group[m].median_ms for m in ("core-factored", "core-dense") if m in group}
    if auto is None or not times or not auto.paths:
        return ""
    best = min(times, key=lambda m: times[m]).removeprefix("core-")
    if all(p.rsplit(":", 1)[-1] == best for p in auto.paths.split()):
        return f" (auto ran the {best} path on every layer, as core-{best} did: the gap is timing spread)"
    return ""


CHECKS = {
    "t_peft": "auto <= 0.67 x PEFT RandLoRA where tokens >= d, <= 1.05 x elsewhere",
    "t_floor": "auto <= 1.7 x frozen-base floor where tokens >= d",
    "t_best": "auto <= 1.05 x min(factored, dense)",
    "t_mem": "peak memory (total) auto <= PEFT RandLoRA",
}
"""The targets, by the key :func:`evaluate` gives their check."""

BOUND_NOTE = (
    "Flop bound: the ratio the exact math allows at equal GEMM efficiency (`step_flops`; linear stacks only): "
    "ours = the cheaper of factored and dense, 'any materialising path' also keeps `W + delta_W` alive from "
    "forward to backward. A measured ratio above its bound is a kernel-efficiency gap; a target below the "
    "bound cannot be met by any implementation of these paths. See bench/NOTES.md."
)


def _miss(key: str, group: Group, ev: dict[str, Any]) -> str:
    """The measured figure of a missed target, with its flop bound where one applies."""
    figure = {
        "t_peft": f"auto/PEFT = {ev['auto_vs_peft']:.2f}",
        "t_floor": f"auto/floor = {ev['auto_vs_floor']:.2f}",
        "t_best": f"auto/best = {ev['auto_vs_best']:.2f}" + same_path_note(group),
        "t_mem": f"auto/PEFT memory = {ev['mem_ratio']:.2f}",
    }[key]
    bounds = flop_bounds(case_of(group))
    against = {"t_peft": "vs_peft", "t_floor": "vs_floor"}.get(key)
    if bounds is not None and against is not None:
        figure += f" (flop bound {bounds[against]:.2f}; any materialising path {bounds[against + '_any']:.2f})"
    return figure


def target_summary(rows: list[Row]) -> list[str]:
    """Counts of met targets and the list of points where a target is not met."""
    lines = [BOUND_NOTE, ""]
    results = [(g, evaluate(g)) for g in by_case(rows).values()]
    for key, text in CHECKS.items():
        applicable = [(g, ev) for g, ev in results if ev[key] is not None]
        met = sum(1 for _, ev in applicable if ev[key])
        lines.append(f"- **{text}**: met at {met} of {len(applicable)} points.")
        for g, ev in applicable:
            if not ev[key]:
                lines.append(f"  - not met: {case_name(case_of(g), full=True)}: {_miss(key, g, ev)}")
    return lines
