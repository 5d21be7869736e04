"""The inference cache: same outputs as without it, reuse across calls, invalidation, the memory bound."""

from __future__ import annotations

import pytest
import torch
from conftest import Block, randomize_adapters
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_spec.tolerances import check_close


def model_of(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    kw.setdefault("randlora_alpha", 8.0)
    model = get_randlora_model(Block(), RandLoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], **kw))  # type: ignore[arg-type]
    randomize_adapters(model)
    return model.eval()


X = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return check_close(a.detach().numpy(), b.detach().numpy(), "float32")[0]


@pytest.mark.parametrize("weights", [True, False])
def test_same_outputs_and_reuse(weights: bool) -> None:
    model = model_of()
    with torch.no_grad():
        expected = model(X)
        cache = model.enable_inference_cache(weights=weights)
        first, second = model(X), model(X)
    assert close(first, expected) and torch.equal(first, second)
    assert cache.misses == 3 and cache.hits == 3 and cache.nbytes > 0


def test_not_used_with_gradients() -> None:
    model = model_of()
    cache = model.enable_inference_cache()
    model(X).sum().backward()
    assert cache.hits == cache.misses == cache.nbytes == 0
    assert model.model.q_proj.randlora_lambda["default"].grad is not None


def test_invalidated_by_every_change() -> None:
    """An optimizer step, another adapter, new bases, a hot swap or a merge: the next call is fresh."""
    model = model_of()
    model.add_adapter("other", RandLoraConfig(r=2, randlora_alpha=2.0, target_modules=["q_proj"]))
    randomize_adapters(model, seed=3)
    cache = model.enable_inference_cache()

    def check() -> None:
        with torch.no_grad():
            cached = model(X)
            model.disable_inference_cache()
            fresh = model(X)
            assert close(cached, fresh)
            cache.clear()
            for _, layer in model.named_randlora_layers():
                layer.inference_cache = cache

    check()
    with torch.no_grad():
        model(X)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    (model.train()(X) * X).sum().backward()
    optimizer.step()
    model.eval()
    check()
    model.set_adapter(["default", "other"])
    check()
    bases = model.randlora_bases
    model.set_shared_bases(bases.randlora_A * 0.5, bases.randlora_B)
    check()
    model.merge_adapter(["other"])
    check()
    model.unmerge_adapter()
    check()


def test_memory_bound_keeps_what_fits_and_never_thrashes() -> None:
    """Under a bound below the model's needs, the layers asked first keep their entries; the rest run uncached.

    Evicting instead would, in a pass over the layers, evict each entry just before its next use.
    """
    model = model_of()
    with torch.no_grad():
        cache = model.enable_inference_cache()
        model(X)
        sizes = cache.nbytes
        bounded = model.enable_inference_cache(max_bytes=sizes // 2)
        out = model(X)
        held = dict(bounded._entries)
        for _ in range(3):
            model(X)
    assert 0 < bounded.nbytes <= sizes // 2
    assert {k: v[0] for k, v in bounded._entries.items()} == {k: v[0] for k, v in held.items()}  # nothing evicted
    assert bounded.hits == 3 * len(held)
    with torch.no_grad():
        model.disable_inference_cache()
        assert close(out, model(X))
