"""Building the measured models: the seeded base model, its input, each method's adapted copy and one training step."""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable
from typing import Any

from .cases import CORE_COMPUTE, LLAMA_TARGETS, Case, StackCase, core_supports_compute, lora_rank

Forward = Callable[[Any, Any], Any]


def linear_stack(dims: list[int]) -> Any:
    """An ``nn.Module`` with layers ``l0``, ``l1``, ... (bias on, as in a generic MLP) and their names in ``names``."""
    # torch is imported here, not at module scope, so that importing the package (the memory server
    # does before it forks) stays cheap until a model is built.
    from torch import nn

    class LinearStack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.names = [f"l{i}" for i in range(len(dims) - 1)]
            for name, (a, b) in zip(self.names, itertools.pairwise(dims), strict=True):
                self.add_module(name, nn.Linear(a, b))

        def forward(self, x: Any) -> Any:
            for name in self.names:
                x = getattr(self, name)(x)
            return x

    return LinearStack()


def build_base(case: Case) -> tuple[Any, list[str], Forward]:
    """``(model, target module names, forward(model, x) -> output)`` with seeded random weights."""
    import torch

    torch.manual_seed(0)
    if isinstance(case, StackCase):
        model = linear_stack(case.dims)
        return model, list(model.names), lambda m, x: m(x)
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        hidden_size=case.d,
        intermediate_size=4 * case.d,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        num_key_value_heads=case.kv_heads,
        vocab_size=256,
        max_position_embeddings=case.seq,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = LlamaModel(config)
    return model, list(LLAMA_TARGETS), lambda m, x: m(inputs_embeds=x).last_hidden_state


def make_input(case: Case) -> tuple[Any, Any]:
    """``(x, probe)``: the input (requires grad) and a fixed tensor the loss is the dot product with.

    ``loss = (y * probe).sum()`` gives a dense, contiguous ``grad_y`` (``y.sum()`` would give an
    expanded stride-0 one that no real loss produces).
    """
    import torch

    gen = torch.Generator().manual_seed(1)
    if isinstance(case, StackCase):
        x = torch.randn(case.tokens, case.d, generator=gen)
        probe = torch.randn(case.tokens, case.dims[-1], generator=gen)
    else:
        seq = min(case.seq, case.tokens)
        x = torch.randn(case.tokens // seq, seq, case.d, generator=gen)
        probe = torch.randn(case.tokens // seq, seq, case.d, generator=gen)
    return x.requires_grad_(True), probe


def adapt(method: str, base: Any, targets: list[str], case: Case) -> Any:
    """A deep copy of ``base`` adapted for ``method`` (the base itself is never modified)."""
    model = copy.deepcopy(base)
    if method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    if method in CORE_COMPUTE:
        from randlora_core import RandLoraConfig, get_randlora_model

        extra = {"compute": CORE_COMPUTE[method]} if core_supports_compute() else {}
        return get_randlora_model(model, RandLoraConfig(r=case.r, target_modules=targets, **extra))
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "peft-randlora":
            return peft.get_peft_model(model, peft.RandLoraConfig(r=case.r, target_modules=targets))
        rank = lora_rank(case)
        return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))


def make_step(model: Any, forward: Forward, x: Any, probe: Any) -> Callable[[], None]:
    """One training step: zero grads, forward, ``(y * probe).sum()`` backward, AdamW on trainable params."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x.grad = None
        (forward(model, x) * probe).sum().backward()
        if opt is not None:
            opt.step()

    return step


def build_step(method: str, case: Case) -> Callable[[], None]:
    """A fresh base model of ``case`` adapted for ``method``, with its input, as one training step."""
    base, targets, forward = build_base(case)
    x, probe = make_input(case)
    return make_step(adapt(method, base, targets, case), forward, x, probe)


def trainable_count(model: Any) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
