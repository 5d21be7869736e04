"""Comparisons besides step time: merge, basis generation and checkpoint size against PEFT; core's layer-function ablation."""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from .cases import StackCase
from .core_internals import core_basis, layer_variants
from .models import adapt, build_base, trainable_count
from .timing import interleaved, repeat_times


def merge_suite(dims: list[int], repeats: int) -> list[dict[str, Any]]:
    """Median merge and unmerge times (all adapted layers of a square two-layer stack, r = 32)."""
    rows = []
    for d in dims:
        case = StackCase("square", d, 1, 32)
        base, targets, _ = build_base(case)
        for method in ("core-factored", "peft-randlora"):
            model = adapt(method, base, targets, case)
            owner = model.base_model if method == "peft-randlora" else model
            merge, unmerge = owner.merge_adapter, owner.unmerge_adapter
            merge_s, unmerge_s = [], []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                merge()
                t1 = time.perf_counter()
                unmerge()
                merge_s.append(t1 - t0)
                unmerge_s.append(time.perf_counter() - t1)
            rows.append(
                {
                    "d": d,
                    "layers": len(targets),
                    "method": "core" if method.startswith("core") else "peft-randlora",
                    "merge_ms": statistics.median(merge_s[1:]) * 1e3,
                    "unmerge_ms": statistics.median(unmerge_s[1:]) * 1e3,
                }
            )
    return rows


def bases_suite(torch_shape: tuple[int, int, int], numpy_shape: tuple[int, int, int], repeats: int) -> list[dict[str, Any]]:
    """Basis-generation throughput (elements/s) of the portable rule in torch and numpy, and PEFT's rule."""
    from randlora_spec import bases as spec_bases

    rows = []
    for impl, shape, fn in (
        ("randlora_core.bases (torch)", torch_shape, core_basis),
        ("randlora_spec.bases (numpy)", numpy_shape, lambda s: spec_bases.generate_basis(0, spec_bases.TAG_B, s)),
        ("PEFT peft-torch-v1 (kaiming, bf16)", torch_shape, _peft_basis),
    ):
        seconds = statistics.median(repeat_times(lambda fn=fn, shape=shape: fn(shape), repeats))
        n = math.prod(shape)
        rows.append({"impl": impl, "shape": list(shape), "elements": n, "seconds": seconds, "elements_per_s": n / seconds})
    return rows


def _peft_basis(shape: tuple[int, int, int]) -> Any:
    import torch
    from peft.tuners.randlora.model import _kaiming_init

    gen = torch.Generator().manual_seed(0)
    # PEFT draws B one (M, 1, r) basis at a time and divides by the empirical std (SPEC 4.6)
    b = torch.cat([_kaiming_init((shape[0], 1, shape[2]), generator=gen) for _ in range(shape[1])], dim=1)
    return b / b.std()


def ablation_suite(smoke: bool, budget_s: float) -> list[dict[str, Any]]:
    """Where the speed of the factored/dense layer function comes from, on one layer (training step, no optimizer).

    The variants are those of :func:`bench.core_internals.layer_variants`, all with the same operands.
    """
    d, r = (64, 8) if smoke else (1024, 32)
    rows = []
    for n_adapters in (1, 2):
        for tokens in (d // 4, 2 * d):
            for name, ms in _ablation_case(d, r, tokens, n_adapters, budget_s).items():
                rows.append({"d": d, "r": r, "tokens": tokens, "adapters": n_adapters, "variant": name, "ms": ms})
    return rows


def _ablation_case(d: int, r: int, tokens: int, n_adapters: int, budget_s: float) -> dict[str, float]:
    import torch

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
    variants = layer_variants(x, weight, bias, a_s, b_flat, adapters)

    def clear_grads() -> None:
        x.grad = None
        for lam, gamma, _ in adapters:
            lam.grad = gamma.grad = None

    samples = interleaved(
        {name: lambda forward=forward: (forward() * probe).sum().backward() for name, forward in variants.items()},
        lambda rep, elapsed: rep < 4 or (elapsed < budget_s and rep < 16),
        setup=clear_grads,
    )
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def checkpoint_suite() -> list[dict[str, Any]]:
    """Adapter file bytes, core vs PEFT: 8 layers 512x512, r = 32, save_projection True/False."""
    import peft
    import torch
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
