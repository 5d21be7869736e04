"""The step-time plot of the report."""

from __future__ import annotations

from pathlib import Path

from .cases import METHODS
from .timing import Row


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
