"""Every use of randlora-core's internal modules (``compute``, ``functional``, ``bases``) by the benchmark.

The rest of the package uses only the public API (``get_randlora_model``, ``RandLoraConfig``, the
model's methods); what reaches below it (the cost model, the autograd functions, path forcing,
the basis generator) is here, so a change of the layer engine touches this module alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .cases import Case, target_shapes

Adapter = tuple[Any, Any, float]
"""``(lambda, gamma, scaling)`` of one adapter on a layer."""


def chosen_paths(case: Case) -> str:
    """Which compute path core's ``auto`` picks for each layer shape, per the cost model (``""`` if unknown)."""
    try:
        from randlora_core.compute import choose_compute
    except ImportError:
        return ""
    import torch

    picks = []
    for i, o in sorted(set(target_shapes(case))):
        pick = choose_compute(case.tokens, i, o, case.r, torch.float32, torch.device("cpu"), grad=True)
        picks.append(f"{i}x{o}:{pick}")
    return " ".join(picks)


def model_pick(tokens: int, in_f: int, out_f: int, r: int, candidates: Sequence[str]) -> str:
    """The path of ``candidates`` core's cost model rates cheapest for one layer (ties go to ``factored``)."""
    from randlora_core.compute import path_costs

    nb = -(-min(in_f, out_f) // r)
    costs = path_costs(tokens, in_f, out_f, [r * nb])
    return min((p for p in costs if p in candidates), key=lambda k: (costs[k], k != "factored"))


def profile_constants() -> Any:
    """The committed cost-model constants, ``randlora_core.compute.CPU_PROFILE``."""
    from randlora_core.compute import CPU_PROFILE

    return CPU_PROFILE


def run_path(path: str, step: Callable[[], None]) -> None:
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


def layer_variants(
    x: Any, weight: Any, bias: Any, a_s: Any, b_flat: Any, adapters: list[Adapter]
) -> dict[str, Callable[[], Any]]:
    """One square layer's output computed four ways through ``randlora_core.functional``, each a forward to time.

    ``per-adapter`` is the pre-issue-#6 path (base ``F.linear`` plus one ``RandLoraFunction`` per
    adapter, each scaling its output and adding it); ``fused factored`` / ``fused dense`` are
    ``RandLoraLinearFunction`` (scaling folded into S, adapter matmuls accumulated into the base
    output, equal-rank adapters evaluated together); ``plain autograd`` is the factored math through
    ordinary ops (what autograd keeps without a custom function, as PEFT does).
    """
    import torch

    from randlora_core import functional as fn

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

    return {
        "plain autograd": lambda: per_adapter(plain=True),
        "per-adapter (RandLoraFunction)": per_adapter,
        "fused factored": lambda: fused(False),
        "fused dense": lambda: fused(True),
    }


def core_basis(shape: tuple[int, int, int]) -> Any:
    """Basis ``B`` of ``shape`` by the portable rule, as randlora-core generates it in torch (seed 0)."""
    from randlora_core import bases as core_bases
    from randlora_spec import bases as spec_bases

    return core_bases.generate_basis(0, spec_bases.TAG_B, shape)
