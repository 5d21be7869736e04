"""Basis generation at RNG speed (issue #15): real model allocations against ``torch.rand`` and PEFT's own init.

Every measurement runs in a fresh Python process (``python -c`` running :func:`child`), so each
"first call" is what a user's first wrap pays, and peak memory (``VmHWM`` from /proc/self/status;
tracemalloc does not see torch) starts from a clean process. Inside a child the generators are
timed in rounds whose order rotates (:func:`bench.timing.interleaved`), so ratios compare like with
like on this shared machine; the report gives medians beside the ratios.

Allocations are those of the public configs' linear layers (q, k, v, o, gate, up, down; all-linear
as PEFT selects it, without the output head), with ``r = 32`` (the config default), computed by
``randlora_spec.geometry.allocation``; nothing is downloaded. Compared per allocation and thread count:

- ``core``: ``randlora_core.generate_bases`` (the fused C fill where built), first call and repeats;
- ``torch.rand``: the same number of float32 values, freshly allocated like the bases;
- ``PEFT init``: PEFT's own ``RandLoraModel._init_randlora_A_randlora_B`` (its kaiming draws, one
  basis at a time, and the std normalisation), given the allocation's largest shape where it would
  scan a model for it (the only thing it asks the model);
- ``torch rule``: core's pure-torch fallback (``RANDLORA_BASES_KERNEL=torch``; smaller allocation only).

No compiler runs at generation time (the C fill is compiled when the package is built), so there is
no cold or warm compiler cache to report: the first call in a fresh process is the cold number.
Also measured: peak memory of each generator, the opt-in disk cache (first load stores, second
reads), and a 2-decoder-layer Llama-3-8B-shaped adapter saved with and without bases and loaded
back (stored bases, regenerated, cached): the evidence for the ``save_projection`` default.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
R = 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS: dict[str, dict[str, int]] = {
    # hidden, intermediate, attention heads, key/value heads (public configs of the released models)
    "Llama-3.2-1B": {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8},
    "Llama-3-8B": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8},
}
SMOKE_MODELS = {"tiny": {"hidden": 64, "intermediate": 256, "heads": 4, "kv_heads": 2}}


def linear_shapes(cfg: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each projection of one decoder layer."""
    h, inter = cfg["hidden"], cfg["intermediate"]
    kv = cfg["kv_heads"] * (h // cfg["heads"])
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def allocation_of(cfg: dict[str, int]) -> list[int]:
    """The all-linear allocation ``[r, m_max, M_max, nb_max]`` of a model config at ``r = 32``."""
    from randlora_spec.geometry import allocation

    s = allocation(linear_shapes(cfg).values(), [R])
    return [s.r, s.m_max, s.M_max, s.nb_max]


# ---------------------------------------------------------------- children (fresh processes)


def _shape(alloc: list[int]) -> Any:
    from randlora_spec.geometry import BasesShape

    return BasesShape(r=alloc[0], m_max=alloc[1], M_max=alloc[2], nb_max=alloc[3])


def _peft_init(alloc: list[int]) -> Any:
    from peft import RandLoraConfig as PeftConfig
    from peft.tuners.randlora.model import RandLoraModel

    class LargestShape:
        """Receives PEFT's buffers; answers the one question PEFT's init asks its model."""

        def _find_dim(self, config: Any) -> tuple[int, int]:
            return alloc[2], alloc[1]  # (largest out, largest in): PEFT takes max and min of them

    holder = LargestShape()
    RandLoraModel._init_randlora_A_randlora_B(holder, PeftConfig(r=alloc[0]), "default")  # type: ignore[arg-type]
    return holder


def _generators(alloc: list[int], torch_rule: bool, peft: bool) -> dict[str, Any]:
    import torch

    from randlora_core import generate_bases

    shape = _shape(alloc)
    fns = {"core": lambda: generate_bases(0, shape), "torch.rand": lambda: torch.rand(shape.elements)}
    if peft:
        fns["PEFT init"] = lambda: _peft_init(alloc)
    if torch_rule:

        def rule() -> Any:
            os.environ["RANDLORA_BASES_KERNEL"] = "torch"
            try:
                return generate_bases(0, shape)
            finally:
                os.environ["RANDLORA_BASES_KERNEL"] = "auto"

        fns["torch rule"] = rule
    return fns


def _timing(task: dict[str, Any]) -> dict[str, Any]:
    import torch

    from randlora_core import basis_kernel, generate_bases

    from .timing import interleaved

    t0 = time.perf_counter()
    kernel = basis_kernel.kernel_for(torch.device("cpu"))
    first = time.perf_counter()
    generate_bases(0, _shape(task["alloc"]))  # the first call in a fresh process: all a first wrap pays
    first_s = time.perf_counter() - first
    for warm in _generators([2, 4, 4, 2], task["torch_rule"], task["peft"]).values():
        warm()  # imports and one-time set-up of the others (PEFT imports transformers) are not timed
    fns = _generators(task["alloc"], task["torch_rule"], task["peft"])
    samples = interleaved(fns, lambda rep, _: rep < task["repeats"], warmup=0)
    return {"kernel": kernel, "load_s": first - t0, "first_s": first_s, "samples": samples}


def _memory(task: dict[str, Any]) -> dict[str, Any]:
    import gc

    from .memory import read_status

    fns = _generators(task["alloc"], task["what"] == "torch rule", task["what"] == "PEFT init")
    tiny = _generators([2, 4, 4, 2], task["what"] == "torch rule", task["what"] == "PEFT init")
    tiny[task["what"]]()  # one-time lazy set-up is per process, not per allocation
    gc.collect()
    rss0 = read_status("VmRSS")
    kept = fns[task["what"]]()
    return {"peak_mib": (read_status("VmHWM") - rss0) / MIB, "kept_mib": (read_status("VmRSS") - rss0) / MIB, "_": id(kept)}


def _llama_layers(cfg: dict[str, int], layers: int) -> Any:
    """A stand-in for ``layers`` decoder layers (their linear projections, uninitialised: only shapes matter)."""
    from torch import nn
    from torch.nn.utils import skip_init

    shapes = linear_shapes(cfg)
    blocks = [nn.ModuleDict({n: skip_init(nn.Linear, *shapes[n], bias=False) for n in PROJECTIONS}) for _ in range(layers)]
    return nn.ModuleDict({"layers": nn.ModuleList(blocks)})


def _save(task: dict[str, Any]) -> dict[str, Any]:
    from randlora_core import RandLoraConfig, get_randlora_model

    config = RandLoraConfig(r=R, target_modules=list(PROJECTIONS), save_projection=task["stored"])
    get_randlora_model(_llama_layers(task["cfg"], 2), config).save_adapter(task["path"])
    return {"bytes": Path(task["path"]).stat().st_size}


def _set_cache(directory: str | None) -> None:
    from randlora_core.bases_cache import set_bases_cache

    set_bases_cache(directory)


def _load(task: dict[str, Any]) -> dict[str, Any]:
    """``load_adapter`` of each file, side by side; the first round (imports, first touches) is not timed."""
    from randlora_core import load_adapter

    from .timing import interleaved

    def load(path: str, cache: str | None) -> None:
        _set_cache(cache)
        load_adapter(_llama_layers(task["cfg"], 2), path)  # a fresh base each time; weights are never touched
        _set_cache(None)

    variants = {name: (lambda path=path, cache=cache: load(path, cache)) for name, (path, cache) in task["variants"].items()}
    return {"samples": interleaved(variants, lambda rep, _: rep < task["repeats"] + 1, warmup=1)}


def _cache(task: dict[str, Any]) -> dict[str, Any]:
    """First ``generate_bases`` of a fresh process with the cache on; then cached and uncached side by side."""
    from randlora_core import generate_bases

    from .timing import interleaved

    shape = _shape(task["alloc"])
    _set_cache(task["dir"])
    t0 = time.perf_counter()
    generate_bases(0, shape)
    first_s = time.perf_counter() - t0
    if not task["repeats"]:
        return {"first_s": first_s}

    def generate(cache: str | None) -> None:
        _set_cache(cache)
        generate_bases(0, shape)
        _set_cache(None)

    fns = {"cached": lambda: generate(task["dir"]), "uncached": lambda: generate(None)}
    return {"first_s": first_s, "samples": interleaved(fns, lambda rep, _: rep < task["repeats"], warmup=0)}


CHILDREN = {"timing": _timing, "memory": _memory, "save": _save, "load": _load, "cache": _cache}


def child() -> None:
    """Entry point of a child process: run the task in ``sys.argv[1]`` (JSON), print its result as the last line."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    task = json.loads(sys.argv[1])
    torch.set_num_threads(task.get("threads", 2))
    result = CHILDREN[task["kind"]](task)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}))


def run_child(task: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one task in a fresh interpreter; its JSON result (or ``{"error": ...}``)."""
    code = f"import sys; sys.path.insert(0, {str(TOOLS)!r}); from bench.bases_suite import child; child()"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(task)], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the suite


def _timing_rows(models: dict[str, dict[str, int]], repeats: int, smoke: bool) -> list[dict[str, Any]]:
    rows = []
    for index, (name, cfg) in enumerate(models.items()):
        alloc = allocation_of(cfg)
        for threads in (1, 2):
            task = {"kind": "timing", "alloc": alloc, "threads": threads, "repeats": repeats, "peft": True}
            # the torch rule is slow (and slower still on 2 busy threads): once, on the small allocation
            got = run_child({**task, "torch_rule": smoke or (index == 0 and threads == 1)})
            medians = {k: statistics.median(v) for k, v in got.get("samples", {}).items()}
            rows.append({"model": name, "alloc": alloc, "threads": threads, **got, "median_s": medians})
            print(f"  bases {name} x{threads}: " + " ".join(f"{k}={v:.3f}s" for k, v in medians.items()), flush=True)
    return rows


def _memory_rows(models: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    name, cfg = list(models.items())[-1]
    alloc = allocation_of(cfg)
    bases_mib = 4 * _shape(alloc).elements / MIB
    rows = []
    for what in ("core", "torch.rand", "PEFT init", "torch rule"):
        # peak memory does not depend on the thread count; the torch rule is far slower on 2 busy threads
        task = {"kind": "memory", "alloc": alloc, "what": what, "threads": 1 if what == "torch rule" else 2}
        rows.append({"model": name, "what": what, "bases_mib": bases_mib, **run_child(task)})
    return rows


def _medians(got: dict[str, Any]) -> dict[str, Any]:
    return {**got, "median_s": {k: statistics.median(v) for k, v in got.get("samples", {}).items()}}


def _cache_and_load(models: dict[str, dict[str, int]], repeats: int) -> dict[str, Any]:
    name, cfg = list(models.items())[-1]
    alloc = allocation_of(cfg)
    with tempfile.TemporaryDirectory(prefix="randlora-bases-bench-") as tmp:
        cache_dir = str(Path(tmp) / "cache")
        cache = {
            "stores": run_child({"kind": "cache", "alloc": alloc, "dir": cache_dir, "repeats": 0}),
            "reads": _medians(run_child({"kind": "cache", "alloc": alloc, "dir": cache_dir, "repeats": repeats})),
        }
        with_path, without_path = (str(Path(tmp) / f"adapter-{w}-bases.safetensors") for w in ("with", "without"))
        sizes = {
            "stored bases": run_child({"kind": "save", "cfg": cfg, "path": with_path, "stored": True}),
            "no bases": run_child({"kind": "save", "cfg": cfg, "path": without_path, "stored": False}),
        }
        variants = {
            "stored bases": (with_path, None),
            "no bases, regenerated": (without_path, None),
            "no bases, disk cache warm": (without_path, cache_dir),
        }
        loads = _medians(run_child({"kind": "load", "cfg": cfg, "variants": variants, "repeats": repeats}))
    return {"model": name, "alloc": alloc, "cache": cache, "sizes": sizes, "loads": loads}


def bases_rng_suite(smoke: bool) -> dict[str, Any]:
    """Every measurement of this module (tiny sizes for ``smoke``), with the load averages around it."""
    models = SMOKE_MODELS if smoke else MODELS
    start = os.getloadavg()
    data: dict[str, Any] = {"timing": _timing_rows(models, 1 if smoke else 3, smoke)}
    data["memory"] = _memory_rows(models)
    data["cache_and_load"] = _cache_and_load(models, 1 if smoke else 3)
    data["load_start"], data["load_end"] = list(start), list(os.getloadavg())
    return data


# ---------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"


def bases_rng_report(data: dict[str, Any]) -> list[str]:
    """The suite's markdown section."""
    lines = [
        "## Basis generation at RNG speed (issue #15)",
        "",
        f"Load average (1/5/15 min) at the start of this suite {' / '.join(f'{v:.2f}' for v in data['load_start'])}, "
        f"at its end {' / '.join(f'{v:.2f}' for v in data['load_end'])}. Absolute times vary with the other work on the "
        "machine; the ratios are of medians measured side by side in one process (rotating order), which is what "
        "counts. Each row is a fresh process; `first call` is the first `generate_bases` of that process (no "
        "compiler runs at generation time, so there is no cold/warm compiler cache to separate). All-linear "
        "allocations of the public configs at r = 32. Runs use at most the threads stated (cache and checkpoint "
        "rows: 2).",
        "",
        "| model | allocation (r, m_max, M_max, nb_max) | values | threads | generator | first call ms | core ms "
        "| torch.rand ms | core / rand | PEFT init ms | PEFT / core | torch rule ms | torch rule / core |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["timing"]:
        m = row.get("median_s", {})
        values = row["alloc"][0] * row["alloc"][1] + row["alloc"][2] * row["alloc"][3] * row["alloc"][0]
        lines.append(
            f"| {row['model']} | {tuple(row['alloc'])} | {values / 1e6:.1f} M | {row['threads']} | {row.get('kernel', '?')} "
            f"| {_ms(row.get('first_s'))} | {_ms(m.get('core'))} | {_ms(m.get('torch.rand'))} "
            f"| {_ratio(m.get('core'), m.get('torch.rand'))} | {_ms(m.get('PEFT init'))} "
            f"| {_ratio(m.get('PEFT init'), m.get('core'))} | {_ms(m.get('torch rule'))} "
            f"| {_ratio(m.get('torch rule'), m.get('core'))} |"
        )
    lines += ["", "Peak memory above the process's RSS before the call (VmHWM, fresh process each):", ""]
    lines += ["| model | generator | bases MiB | peak MiB | kept MiB |", "|---|---|---|---|---|"]
    for row in data["memory"]:
        got = f"{row['peak_mib']:.0f} | {row['kept_mib']:.0f}" if "peak_mib" in row else f"error: {row.get('error')} | —"
        lines.append(f"| {row['model']} | {row['what']} | {row['bases_mib']:.0f} | {got} |")
    cl = data["cache_and_load"]
    lines += ["", f"Disk cache and checkpoints, {cl['model']} allocation {tuple(cl['alloc'])}, 2 threads:", ""]
    reads = cl["cache"]["reads"].get("median_s", {})
    lines += [
        "| generate_bases with the cache on | seconds |",
        "|---|---|",
        f"| first call of a fresh process, no entry (generates, stores) | {cl['cache']['stores'].get('first_s', 0):.2f} |",
        f"| first call of a fresh process, entry present (reads and verifies) | {cl['cache']['reads'].get('first_s', 0):.2f} |",
        f"| median read, side by side | {reads.get('cached', 0):.2f} |",
        f"| median generation without the cache, side by side | {reads.get('uncached', 0):.2f} |",
        "",
    ]
    loads = cl["loads"].get("median_s", {})
    stored = loads.get("stored bases")
    lines += ["| 2 decoder layers, all linear, r = 32 | file MiB | load_adapter s (median, side by side) | vs stored |"]
    lines += ["|---|---|---|---|"]
    for variant, seconds in loads.items():
        size = cl["sizes"]["stored bases" if variant == "stored bases" else "no bases"].get("bytes", 0) / MIB
        lines.append(f"| {variant} | {size:.1f} | {seconds:.2f} | {_ratio(seconds, stored)} |")
    lines.append("")
    return lines


def write_bases_report(out: Path, machine: str, data: dict[str, Any]) -> Path:
    """``<machine>-bases.md`` and ``.json`` under ``out`` (the suite run alone: ``python tools/bench --bases-only``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{machine}-bases.json").write_text(json.dumps(data, indent=1) + "\n")
    path = out / f"{machine}-bases.md"
    env = data.get("environment", {})
    facts = [f"- {key}: {env[key]}" for key in ("cpu", "cpus", "python", "torch", "peft", "commit", "date") if key in env]
    path.write_text("\n".join([f"# Basis generation benchmark ({machine})", "", *facts, "", *bases_rng_report(data)]))
    return path
