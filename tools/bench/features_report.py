"""The Markdown report of :mod:`bench.features`: medians and the ratios the issues set targets for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .machine import environment


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _model(hidden: int) -> str:
    return f"block (hidden {hidden})" if hidden else "2 square layers"


def _sparse(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "## Sparse bases: training step (2 square layers, or a Llama-style block, r = 32, auto)",
        "",
        "Target: very_sparse <= 0.5x the dense-bases step at d >= 2048 and tokens >= 512 and <= 1.6x the frozen floor;"
        " sparse (s = 3) never slower than dense. Sparse bases with a third of their entries nonzero run the dense"
        " kernels (above `randlora_core.sparse.MAX_DENSITY`, multiplying the zeros is faster than skipping them), so"
        " `sparse` and `dense` execute the same operations; `dense copy` is a second dense model built identically,"
        " and `dense copy / dense` shows how far two identical models differ in this run (memory placement alone).",
        "",
        "| model | d | tokens | floor ms | dense ms | dense copy ms | sparse ms | very_sparse ms | very_sparse / dense"
        " | very_sparse / floor | sparse / dense | dense copy / dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["median_ms"]
        copy = m.get("dense copy", float("nan"))
        out.append(
            f"| {_model(r.get('hidden', 0))} | {r['d']} | {r['tokens']} | {m['floor']:.1f} | {m['dense']:.1f}"
            f" | {copy:.1f} | {m['sparse']:.1f}"
            f" | {m['very_sparse']:.1f} | {_ratio(m['very_sparse'], m['dense'])} | {_ratio(m['very_sparse'], m['floor'])}"
            f" | {_ratio(m['sparse'], m['dense'])} | {_ratio(copy, m['dense'])} |"
        )
    return out


def _decode(data: dict[str, Any]) -> list[str]:
    names = list(data["rows"][0]["median_ms"])
    mib = data["cache_mib"]
    out = [
        f"## Inference without gradients: a Llama-style block (d = {data['d']}, hidden = {data['hidden']}, r = 32)",
        "",
        "Targets: unmerged decode (batch 1) <= 1.3x the base with the inference cache holding W + delta_W, <= 2x with it"
        f" holding the scaled bases only. The caches hold {mib['cache W+dW']:.1f} MiB (W + delta_W) and"
        f" {mib['cache scaled bases']:.1f} MiB (scaled bases) for this block after one decode call: a call of few"
        " tokens without gradients takes the activation path (lambda, gamma and the bases applied to the activations,"
        " no scaled bases formed or cached), so unmerged decode needs no cache; prefill fills the scaled-bases one."
        " `cache W+dW, scaled-bases bytes` keeps W + delta_W entries within the bytes every layer's scaled bases"
        f" would take ({mib.get('cache W+dW, scaled-bases bytes', float('nan')):.1f} MiB held after one call): the"
        " layers asked first keep theirs, the others run uncached."
        f" Any unmerged evaluation reads W and the B_flat windows, {data.get('read_floor', float('nan')):.2f}x the"
        " base's matrix bytes (dense float32 bases): on a memory-bound decode that ratio is the floor of the"
        " no-cache and scaled-bases columns; only a cache holding W + delta_W goes below it. `read floor` measures"
        " it: the block with each layer computing x W^T plus one plain product with its B_flat window and nothing"
        " else (no lambda, gamma or A). `unmerged copy` is a"
        " second unmerged model built exactly like `unmerged` (both take the same path): the gap between the two is"
        " what the placement of the models' memory alone does to a memory-bound decode on this machine."
        " `unmerged very_sparse` has very_sparse bases (about 2 % nonzeros) and no cache: the sparse kernels read"
        " b_flat's nonzeros only, so that floor does not bind it.",
        "",
        "| shape | " + " | ".join(f"{n} ms (x base)" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for r in data["rows"]:
        m = r["median_ms"]
        out.append(f"| {r['shape']} | " + " | ".join(f"{m[n]:.2f} ({_ratio(m[n], m['base'])})" for n in names) + " |")
    return out


def _simple(title: str, note: str, data: dict[str, Any], first: str, second: str) -> list[str]:
    m = data["median_ms"]
    return [
        f"## {title}",
        "",
        note,
        "",
        f"| {first} ms | {second} ms | ratio |",
        "|---:|---:|---:|",
        f"| {m[first]:.2f} | {m[second]:.2f} | {_ratio(m[first], m[second])} |",
    ]


def write_features(path: Path, data: dict[str, Any]) -> Path:
    """Write the report of a features run to ``path``."""
    env = environment()
    load = os.getloadavg()
    lines = [
        "# Round-2 performance and beyond-PEFT features",
        "",
        f"Generated by `python tools/bench --features`{' --smoke' if data['smoke'] else ''}; torch {env.get('torch', '?')},"
        f" {env.get('torch_threads', '?')} threads; load average at the end {load[0]:.1f}. Medians of interleaved rounds; a"
        " shared or busy machine slows every variant of a row alike, so the ratios are what count.",
        "",
        *_sparse(data["sparse"]),
        "",
        *_decode(data["decode"]),
        "",
        *_simple(
            f"Mixed-adapter batch ({data['mixed']['samples']} samples x {data['mixed']['tokens']} tokens, d ="
            f" {data['mixed']['d']}, 4 adapters)",
            "One call with adapter_names against four calls with one adapter each (no gradients).",
            data["mixed"],
            "mixed batch",
            "4 single-adapter runs",
        ),
        "",
        *_simple(
            f"torch.compile (inductor): training step, d = {data['compile']['d']}, tokens = {data['compile']['tokens']}",
            f"The first compiled call (tracing and code generation) took {data['compile']['compile_s']:.1f} s, not included.",
            data["compile"],
            "compiled",
            "eager",
        ),
        "",
        *_simple(
            f"Loading an adapter ({data['load']['layers']} layers {data['load']['d']} x {data['load']['d']}, r = 32)",
            f"Files: {data['load']['bases stored bytes']:,} bytes with the bases stored,"
            f" {data['load']['bases regenerated bytes']:,} without.",
            data["load"],
            "bases regenerated",
            "bases stored",
        ),
        "",
    ]
    path.write_text("\n".join(lines))
    return path
