"""Mixed-adapter batches: ``model(x, adapter_names=[...])`` gives each row its own adapter (PEFT's semantics)."""

from __future__ import annotations

import pytest
import torch
from conftest import Block, randomize_adapters
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.compute import compute_override
from randlora_spec.errors import AdapterNotFoundError, ConfigError, MergeError, ShapeError

NAMES = ["a", "b", "c", "d"]


def four_adapters(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    # alpha = r (scaling 1): the default 640 saturates Block's tanh and leaves no gradient
    config = RandLoraConfig(r=4, randlora_alpha=4.0, target_modules=["q_proj", "o_proj"], **kw)  # type: ignore[arg-type]
    model = get_randlora_model(Block(), config, adapter_name="a")
    for name, r in zip(NAMES[1:], (2, 4, 8), strict=True):
        targets = ["q_proj", "v_proj", "o_proj"]
        model.add_adapter(name, RandLoraConfig(r=r, randlora_alpha=float(r), target_modules=targets, **kw))  # type: ignore[arg-type]
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("batch", [64, 6])
@pytest.mark.parametrize("compute", [None, "factored", "dense"])
def test_rows_equal_single_adapter_runs(compute: str | None, batch: int) -> None:
    """64 samples over 4 adapters and the base: every row is exactly the row of a run with that adapter alone.

    Also for small batches, where a sub-batch's matmul would round differently from the batch's.
    """
    model = four_adapters()
    x = torch.randn(batch, 5, 16, generator=torch.Generator().manual_seed(1))
    per_row = [[*NAMES, "__base__"][i % 5] for i in range(batch)]
    with torch.no_grad(), compute_override(compute):
        mixed = model(x, adapter_names=per_row)
        expected = torch.empty_like(mixed)
        for name in NAMES:
            model.set_adapter(name)
            rows = [i for i, n in enumerate(per_row) if n == name]
            expected[rows] = model(x)[rows]
        with model.disable_adapter():
            rows = [i for i, n in enumerate(per_row) if n == "__base__"]
            expected[rows] = model(x)[rows]
    assert torch.equal(mixed, expected)


def test_training_through_a_mixed_batch() -> None:
    """Gradients reach each adapter from its own rows only."""
    model = four_adapters()
    model.set_adapter(NAMES)  # all trainable
    x = torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(2))
    probe = torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(3))  # Block ends in a LayerNorm: no plain norm loss
    per_row = ["a", "a", "b", "b", "c", "c", "__base__", "__base__"]
    (model(x, adapter_names=per_row) * probe).sum().backward()
    grads = {n: model.model.q_proj.randlora_lambda[n].grad for n in NAMES}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in "abc")
    assert grads["d"] is None or grads["d"].abs().sum() == 0
    # a's gradient equals the gradient of a's rows through adapter a alone
    ref = four_adapters()
    ref.set_adapter(["a"])
    (ref(x[:2]) * probe[:2]).sum().backward()
    torch.testing.assert_close(grads["a"], ref.model.q_proj.randlora_lambda["a"].grad)


def test_modules_to_save_follow_the_rows() -> None:
    model = four_adapters(modules_to_save=["norm"])
    with torch.no_grad():
        for name in NAMES:
            model.model.norm.modules_to_save[name].weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 2, 16)
    per_row = ["a", "b", "__base__", "d"]
    with torch.no_grad():
        mixed = model(x, adapter_names=per_row)
        for i, name in enumerate(per_row):
            if name == "__base__":
                with model.disable_adapter():
                    expected = model(x)
            else:
                model.set_adapter(name)
                expected = model(x)
            torch.testing.assert_close(mixed[i : i + 1], expected[i : i + 1], rtol=0, atol=0)


def test_refusals() -> None:
    model = four_adapters()
    x = torch.randn(2, 3, 16)
    with pytest.raises(AdapterNotFoundError, match="'zz'"):
        model(x, adapter_names=["a", "zz"])
    with pytest.raises(ConfigError, match="one per sample"):
        model(x, adapter_names="a")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="3 entries"):
        model(x, adapter_names=["a", "b", "c"])
    model.merge_adapter(["a"])
    with pytest.raises(MergeError, match="merged"):
        model(x, adapter_names=["a", "b"])
    assert all(layer.mixed_adapters is None for _, layer in model.named_randlora_layers())
