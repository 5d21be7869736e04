"""accelerate(): the base weight's ``requires_grad`` flag selects a path only when its gradient is needed (issue #14, item 5).

The layer engine fuses the base matmul into its node only when no gradient for the weight is
needed (``weight.requires_grad and torch.is_grad_enabled()``); otherwise PEFT's base call runs and
the node adds the adapters. Whichever path runs, the same inputs give the same output within the
spec's float32 tolerance (``randlora_spec.tolerances``, SPEC 7); under ``no_grad`` the flag changes
nothing at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft_helpers import LLAMA_TARGETS, assert_close, peft_model, tiny_llama, tokens

from randlora_peft import accelerate, is_accelerated


def _base_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [m.get_base_layer().weight for m in model.modules() if hasattr(m, "randlora_lambda") and hasattr(m, "get_base_layer")]


@pytest.mark.parametrize("compute", ["auto", "dense", "factored"])
def test_frozen_weight_flag_changes_nothing_under_no_grad(compute: str) -> None:
    fast = accelerate(peft_model(tiny_llama(), target_modules=LLAMA_TARGETS), compute=compute)
    x = tokens(batch=4, length=24)
    with torch.no_grad():
        expected = fast(x).logits
        for weight in _base_weights(fast):
            weight.requires_grad_(True)  # e.g. left trainable by a wrapper (FSDP's flat parameters)
        assert torch.equal(fast(x).logits, expected)


@pytest.mark.parametrize("compute", ["auto", "dense"])
def test_weight_that_needs_its_gradient(compute: str) -> None:
    """PEFT's FSDP-style setup without FSDP: base weights require grad; outputs and every gradient match PEFT's."""
    plain = peft_model(tiny_llama(layers=2), target_modules=LLAMA_TARGETS)
    fast = accelerate(copy.deepcopy(plain), compute=compute)
    assert any(is_accelerated(m) for m in fast.modules())
    for model in (plain, fast):
        for weight in _base_weights(model):
            weight.requires_grad_(True)
    x = tokens(batch=4, length=24)
    with torch.no_grad():
        fused = fast(x).logits  # no gradient needed: the weight may be fused
    y_plain, y_fast = plain(x).logits, fast(x).logits  # gradient needed: PEFT's base call, adapters added
    assert_close(y_fast, fused)
    assert_close(y_fast, y_plain)
    y_plain.square().mean().backward()
    y_fast.square().mean().backward()
    theirs = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    ours = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and any("base_layer.weight" in n for n in ours)
    for name, grad in theirs.items():
        assert_close(ours[name], grad)
