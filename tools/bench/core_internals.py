"""Every use of randlora-core's internal modules (``compute``, ``engine``, ``plain``, ``bases``) by the benchmark.

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
    from randlora_core.compute import CallShape, path_costs

    nb = -(-min(in_f, out_f) // r)
    costs = path_costs(CallShape(tokens, in_f, out_f, (r * nb,)))
    return min((p for p in costs if p in candidates), key=lambda k: (costs[k], k != "factored"))


def profile_constants() -> Any:
    """The committed cost-model constants, ``randlora_core.compute.CPU_PROFILE``."""
    from randlora_core.compute import CPU_PROFILE

    return CPU_PROFILE


def run_path(path: str, step: Callable[[], None]) -> None:
    """One step with every layer forced onto ``path`` (``hybrid``: dense forward, factored backward)."""
    import dataclasses

    from randlora_core.compute import compute_override
    from randlora_core.engine import RandLoraFunction

    if path != "hybrid":
        with compute_override(path):  # type: ignore[arg-type]
            step()
        return
    original = RandLoraFunction.apply

    def hybrid(plan: Any, *args: Any) -> Any:
        return original(dataclasses.replace(plan, dense_forward=True, dense_backward=False), *args)

    RandLoraFunction.apply = hybrid  # type: ignore[method-assign]
    try:
        with compute_override("dense"):
            step()
    finally:
        RandLoraFunction.apply = original  # type: ignore[method-assign]


def layer_variants(
    x: Any, weight: Any, bias: Any, a_s: Any, b_flat: Any, adapters: list[Adapter]
) -> dict[str, Callable[[], Any]]:
    """One square layer's output computed four ways, each a forward to time.

    ``per-adapter`` evaluates each adapter in a node of its own beside the base ``F.linear`` call
    (the engine with an external base and no grouping, the pre-issue-#6 shape of the work);
    ``fused factored`` / ``fused dense`` are the engine's normal node (base matmul inside,
    scaling folded into S, equal-rank adapters evaluated together); ``plain autograd`` is the
    factored math through ordinary ops (what autograd keeps without a custom function, as PEFT does).
    """
    import torch

    from randlora_core.engine import AdapterCall, BaseCall, layer_forward
    from randlora_core.plain import adapter_output

    d_in, d_out = weight.shape[1], weight.shape[0]
    calls = [AdapterCall(a_s, b_flat, lam, gamma, s, window=0) for lam, gamma, s in adapters]

    def plain() -> Any:
        y = torch.nn.functional.linear(x, weight, bias)
        for lam, gamma, s in adapters:
            y = y + adapter_output(x, a_s, b_flat, lam, gamma, s, True)
        return y

    def per_adapter() -> Any:
        y = torch.nn.functional.linear(x, weight, bias)
        for call in calls:
            y = layer_forward(x, BaseCall(lambda y=y: y), [call], d_in, d_out, "factored")
        return y

    def fused(compute: str) -> Any:
        base = BaseCall(lambda: torch.nn.functional.linear(x, weight, bias), weight, bias)
        return layer_forward(x, base, calls, d_in, d_out, compute)  # type: ignore[arg-type]

    return {
        "plain autograd": plain,
        "per-adapter (external base)": per_adapter,
        "fused factored": lambda: fused("factored"),
        "fused dense": lambda: fused("dense"),
    }


def core_basis(shape: tuple[int, int, int]) -> Any:
    """Basis ``B`` of ``shape`` by the portable rule, as randlora-core generates it in torch (seed 0)."""
    from randlora_core import bases as core_bases
    from randlora_spec import bases as spec_bases

    return core_bases.generate_basis(0, spec_bases.TAG_B, shape)
