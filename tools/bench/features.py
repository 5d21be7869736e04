"""Round-2 performance and the beyond-PEFT features, each measured side by side in one run.

``python tools/bench --features`` (and every ``--smoke`` run, at tiny sizes) writes
``<machine>-features.md`` / ``.json`` beside the main report:

- **sparse bases**: a training step of a square layer stack, and of the Llama-style block below,
  with very_sparse, sparse (s = 3) and dense bases (``auto``, and a second dense model built
  identically), against the frozen floor;
- **decode and prefill**: a Llama-style block (q, k, v, o, gate, up, down) without gradients: the
  base model, merged, unmerged (``auto``: the activation path for decode) and an identical second
  unmerged model (the spread memory placement alone causes), the read floor (each layer reads only
  ``W`` and its ``B_flat`` window), unmerged with very_sparse bases, unmerged with the inference
  cache (scaled bases only; ``W + delta_W``; ``W + delta_W`` within the scaled bases' bytes), PEFT's
  RandLoRA and PEFT's LoRA (when peft is installed);
- **mixed-adapter batch**: 4 adapters over 64 samples in one call, against 4 single-adapter calls;
- **torch.compile**: an eager against an inductor-compiled training step (the compile itself
  reported apart);
- **loading**: ``load_adapter`` of a checkpoint with stored bases and without.

All times are medians of interleaved rounds (order rotating every round), ratios beside them.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .timing import interleaved

Timed = dict[str, Callable[[], object]]


def _medians(fns: Timed, rounds: int, budget_s: float) -> dict[str, float]:
    """Median milliseconds of every function over interleaved rounds (at least ``rounds``, more while in budget)."""
    # round 0 warms up and is not recorded
    samples = interleaved(fns, lambda rep, elapsed: rep <= rounds or (elapsed < budget_s and rep <= 8 * rounds), warmup=1)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def _stack(d: int, depth: int) -> Any:
    from torch import nn

    return nn.Sequential(*(nn.Linear(d, d) for _ in range(depth)))


def sparse_suite(points: list[tuple[int, int, int]], rounds: int, budget_s: float) -> list[dict[str, Any]]:
    """Training step, ``auto``: floor, dense, sparse (s = 3) and very_sparse bases, per ``(d, tokens, hidden)``.

    ``hidden = 0``: a stack of two square layers (one basis window); otherwise the Llama-style block
    of :func:`_block`, whose layers of three shapes use different windows of the shared bases.
    """
    import torch

    from randlora_core import RandLoraConfig, get_randlora_model

    rows = []
    for d, tokens, hidden in points:
        torch.manual_seed(0)
        base, targets = (_stack(d, 2), ["0", "1"]) if not hidden else (_block(d, hidden).train(), TARGETS)
        # the input needs its gradient, as inside a deeper model: the floor is the frozen stack's forward and backward
        x, probe = torch.randn(tokens, d, requires_grad=True), torch.randn(tokens, d)
        steps: Timed = {}
        frozen = copy.deepcopy(base).requires_grad_(False)
        steps["floor"] = lambda frozen=frozen, x=x, probe=probe: (frozen(x) * probe).sum().backward()
        # "dense copy" is built exactly like "dense": the spread between the two is what placement in
        # memory alone does, the yardstick for "sparse (s = 3) never slower than dense"
        variants = (("dense", {}), ("dense copy", {}), ("sparse", {"sparse": True}), ("very_sparse", {"very_sparse": True}))
        for kind, flags in variants:
            cfg = RandLoraConfig(r=32, target_modules=targets, init_weights=False, **flags)  # type: ignore[arg-type]
            model = get_randlora_model(copy.deepcopy(base), cfg)
            steps[kind] = lambda model=model, x=x, probe=probe: (model(x) * probe).sum().backward()
        ms = _medians(steps, rounds, budget_s)
        rows.append({"d": d, "tokens": tokens, "hidden": hidden, "median_ms": ms})
    return rows


def _block(d: int, hidden: int) -> Any:
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
            self.down_proj = nn.Linear(hidden, d, bias=False)

        def forward(self, x: Any) -> Any:
            attn = self.o_proj(self.q_proj(x) + self.k_proj(x) + self.v_proj(x))
            return self.down_proj(nn.functional.silu(self.gate_proj(x + attn)) * self.up_proj(x + attn))

    return Block().eval()


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gemv_floor(base: Any, adapted: Any) -> Any:
    """The block with each layer computing ``x W^T`` plus one plain product with its ``B_flat`` window, nothing else.

    What an unmerged layer must read, without any of the adapter's other work: the measured floor of
    unmerged decode with dense bases. Needs ``nb * r == min(in, out)`` (true of the block's shapes).
    """
    import torch
    from torch import nn

    class TwoReads(nn.Module):
        def __init__(self, weight: torch.Tensor, b_flat: torch.Tensor) -> None:
            super().__init__()
            self.weight, self.b_flat = weight, b_flat
            self.in_le_out = weight.shape[1] <= weight.shape[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(x, self.weight) + (x @ (self.b_flat.T if self.in_le_out else self.b_flat))

    floor = copy.deepcopy(base)
    for name in TARGETS:
        layer = getattr(adapted.model, name)
        r, m, big_m, nb = layer.geometry("default")
        assert nb * r == m, "the floor model needs nb * r == min(in, out)"
        b_flat = layer.bases.window(r, m, big_m, nb, torch.float32, torch.device("cpu"))[1]
        setattr(floor, name, TwoReads(getattr(floor, name).weight, b_flat))
    return floor


def _inference_variants(d: int, hidden: int) -> tuple[Timed, Callable[[Any], None], dict[str, float]]:
    """Forward functions of every decode variant (taking the input), and the MiB each inference cache holds."""
    import torch

    from randlora_core import RandLoraConfig, get_randlora_model

    torch.manual_seed(0)
    base = _block(d, hidden)
    cfg = RandLoraConfig(r=32, target_modules=TARGETS, init_weights=False)
    variants: dict[str, Any] = {"base": base}
    variants["unmerged"] = get_randlora_model(copy.deepcopy(base), cfg)
    # the same model built again: how far placement in memory alone moves a memory-bound decode
    variants["unmerged copy"] = get_randlora_model(copy.deepcopy(base), cfg)
    variants["read floor"] = _gemv_floor(base, variants["unmerged copy"])
    sparse_cfg = RandLoraConfig(r=32, target_modules=TARGETS, init_weights=False, very_sparse=True)
    variants["unmerged very_sparse"] = get_randlora_model(copy.deepcopy(base), sparse_cfg)
    for name, weights in (("cache scaled bases", False), ("cache W+dW", True)):
        variants[name] = get_randlora_model(copy.deepcopy(base), cfg)
        variants[name].enable_inference_cache(weights=weights)
    # W + delta_W entries within the bytes the scaled bases of every layer would take
    bounded = "cache W+dW, scaled-bases bytes"
    variants[bounded] = get_randlora_model(copy.deepcopy(base), cfg)
    variants[bounded].enable_inference_cache(max_bytes=_scaled_bases_bytes(d, hidden, 32), weights=True)
    merged = get_randlora_model(copy.deepcopy(base), cfg)
    merged.merge_adapter()
    variants["merged"] = merged
    variants.update(_peft_variants(base))
    current: dict[str, Any] = {}
    fns: Timed = {name: (lambda m=m: m(current["x"])) for name, m in variants.items()}

    def set_input(x: Any) -> None:
        current["x"] = x

    set_input(torch.randn(1, d))
    cached = ("cache scaled bases", "cache W+dW", bounded)
    with torch.no_grad():
        for name in cached:
            variants[name](current["x"])
    mib = {name: variants[name].model.q_proj.inference_cache.nbytes / 2**20 for name in cached}
    return fns, set_input, mib


def _peft_variants(base: Any) -> dict[str, Any]:
    try:
        import peft
    except ImportError:
        return {}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        randlora = peft.get_peft_model(copy.deepcopy(base), peft.RandLoraConfig(r=32, target_modules=TARGETS, init_weights=False))
        lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False))
    return {"peft-randlora": randlora.eval(), "peft-lora": lora.eval()}


def decode_suite(d: int, hidden: int, shapes: list[tuple[str, int, int]], rounds: int, budget_s: float) -> dict[str, Any]:
    """Latency without gradients per variant, for decode (batch x 1 token) and prefill shapes."""
    import torch

    fns, set_input, mib = _inference_variants(d, hidden)
    rows = []
    with torch.no_grad():
        for label, batch, tokens in shapes:
            set_input(torch.randn(batch, tokens, d))
            rows.append({"shape": label, "batch": batch, "tokens": tokens, "median_ms": _medians(fns, rounds, budget_s)})
    return {"d": d, "hidden": hidden, "cache_mib": mib, "rows": rows, "read_floor": _read_floor(d, hidden, 32)}


def _layers(d: int, hidden: int) -> list[tuple[int, int]]:
    """``(in, out)`` of the block's layers, in :data:`TARGETS` order."""
    return [(d, d)] * 4 + [(d, hidden)] * 2 + [(hidden, d)]


def _scaled_bases_bytes(d: int, hidden: int, r: int) -> int:
    """Bytes of every layer's float32 scaled bases ``S_flat`` (``nb*r x m``): what the scaled-bases cache holds."""
    from randlora_spec.geometry import LayerGeometry

    return sum(4 * g.nb * g.r * g.m for g in (LayerGeometry(i, o, r) for i, o in _layers(d, hidden)))


def _read_floor(d: int, hidden: int, r: int) -> float:
    """Matrix bytes an unmerged call of one token must read, over the base's: ``W`` plus each layer's ``B_flat`` window.

    ``y = x W^T + B_flat h``: ``h`` needs only ``A``'s window, lambda and gamma (a few MiB), but
    ``B_flat`` (``M x nb*r``, at least the size of ``W``) is read whole, so on a memory-bound decode no
    unmerged evaluation of dense float32 bases can cost less than this ratio of the base.
    """
    from randlora_spec.geometry import LayerGeometry

    layers = _layers(d, hidden)
    base = sum(i * o for i, o in layers)
    geoms = [LayerGeometry(i, o, r) for i, o in layers]
    return (base + sum(g.M * g.nb * g.r for g in geoms)) / base


def mixed_suite(d: int, samples: int, tokens: int, rounds: int, budget_s: float) -> dict[str, Any]:
    """4 adapters over ``samples`` samples in one call, against 4 single-adapter calls of the same batch."""
    import torch

    from randlora_core import RandLoraConfig, get_randlora_model

    torch.manual_seed(0)
    names = ["a", "b", "c", "d"]
    model = get_randlora_model(_stack(d, 2), RandLoraConfig(r=32, target_modules=["0", "1"], init_weights=False), "a")
    for name in names[1:]:
        model.add_adapter(name, RandLoraConfig(r=32, target_modules=["0", "1"], init_weights=False))
    x = torch.randn(samples, tokens, d)
    per_row = [names[i % 4] for i in range(samples)]

    def four_runs() -> None:
        for name in names:
            model.set_adapter(name)
            model(x)

    with torch.no_grad():
        ms = _medians(
            {"mixed batch": lambda: model(x, adapter_names=per_row), "4 single-adapter runs": four_runs}, rounds, budget_s
        )
    return {"d": d, "samples": samples, "tokens": tokens, "median_ms": ms}


def compile_suite(d: int, tokens: int, rounds: int, budget_s: float) -> dict[str, Any]:
    """Eager against inductor-compiled training step (forward, backward) of a 2-layer stack; compile time apart."""
    import torch

    from randlora_core import RandLoraConfig, get_randlora_model

    torch.manual_seed(0)
    model = get_randlora_model(_stack(d, 2), RandLoraConfig(r=32, target_modules=["0", "1"], init_weights=False))
    x, probe = torch.randn(tokens, d), torch.randn(tokens, d)

    def loss(x: Any) -> Any:
        return (model(x) * probe).sum()

    compiled = torch.compile(loss, fullgraph=True)
    t0 = time.perf_counter()
    compiled(x).backward()
    compile_s = time.perf_counter() - t0
    ms = _medians({"eager": lambda: loss(x).backward(), "compiled": lambda: compiled(x).backward()}, rounds, budget_s)
    return {"d": d, "tokens": tokens, "compile_s": compile_s, "median_ms": ms}


def load_suite(d: int, layers: int, rounds: int, budget_s: float) -> dict[str, Any]:
    """``load_adapter`` of one checkpoint with stored bases and one without; file sizes beside."""
    import torch

    from randlora_core import RandLoraConfig, get_randlora_model, load_adapter

    out: dict[str, Any] = {"d": d, "layers": layers}
    with tempfile.TemporaryDirectory() as tmp:
        fns: Timed = {}
        for stored in (True, False):
            torch.manual_seed(0)
            cfg = RandLoraConfig(r=32, target_modules=r"\d+", save_projection=stored, init_weights=False)
            path = Path(tmp) / f"stored-{stored}.safetensors"
            get_randlora_model(_stack(d, layers), cfg).save_adapter(path)
            label = "bases stored" if stored else "bases regenerated"
            out[f"{label} bytes"] = path.stat().st_size
            fns[label] = lambda path=path: load_adapter(_stack(d, layers), path)
        out["median_ms"] = _medians(fns, rounds, budget_s)
    return out


def run_features(out: Path, machine: str, smoke: bool) -> Path:
    """Every suite above (tiny sizes when ``smoke``); writes ``<machine>-features.json`` and ``.md``; returns the md."""
    from .features_report import write_features

    rounds, budget = (1, 0.2) if smoke else (5, 15.0)
    data: dict[str, Any] = {"smoke": smoke}
    suites: list[tuple[str, Callable[[], Any]]] = [
        (
            "sparse",
            lambda: sparse_suite(
                [(128, 64, 0), (64, 16, 96)] if smoke else [(2048, 512, 0), (2048, 2048, 0), (4096, 512, 0), (2048, 512, 5632)],
                rounds,
                2 * budget,
            ),
        ),
        (
            "decode",
            lambda: decode_suite(
                64 if smoke else 2048,
                128 if smoke else 5632,
                [("decode b1", 1, 1), ("decode b8", 8, 1), ("prefill 512", 1, 16 if smoke else 512)],
                rounds,
                budget,
            ),
        ),
        ("mixed", lambda: mixed_suite(64 if smoke else 1024, 64, 4 if smoke else 32, rounds, budget)),
        ("compile", lambda: compile_suite(64 if smoke else 1024, 64 if smoke else 1024, rounds, budget)),
        ("load", lambda: load_suite(64 if smoke else 2048, 2 if smoke else 8, rounds, budget)),
    ]
    for name, suite in suites:
        t0 = time.perf_counter()
        print(f"[bench] features: {name} ...", flush=True)
        data[name] = suite()
        print(f"[bench] features: {name} done in {time.perf_counter() - t0:.1f}s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{machine}-features.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return write_features(out / f"{machine}-features.md", data)
