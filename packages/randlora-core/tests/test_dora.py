"""The DoRA-style variant (``use_dora``, SPEC 3.11): initialisation, gradients, merging, several adapters, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model, load_adapter, save_adapter
from randlora_core.driver import CoreDriver
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.driver import ReferenceDriver
from randlora_spec.testing import assert_driver_matches
from randlora_spec.testing.kind_cases import KindSpec, kind_case


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(12, 20)
        self.o = nn.Linear(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)))


def config(**kw: object) -> RandLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("randlora_alpha", 8.0)
    kw.setdefault("target_modules", ["q", "o"])
    return RandLoraConfig(use_dora=True, **kw)


def model_of(dtype: torch.dtype = torch.float64, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return get_randlora_model(Block().to(dtype), config(**kw))


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Trained-looking lambda, gamma and magnitudes (factors away from 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.named_randlora_layers():
            for name in layer.randlora_lambda:
                layer.randlora_lambda[name].normal_()
                layer.randlora_gamma[name].mul_(1 + 0.3 * torch.randn_like(layer.randlora_gamma[name]))
                if name in layer.randlora_magnitude:
                    layer.randlora_magnitude[name].mul_(1 + 0.2 * torch.randn_like(layer.randlora_magnitude[name]))


X = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_starts_as_the_base_model_with_magnitudes_at_the_row_norms() -> None:
    model = model_of()
    with torch.no_grad(), model.disable_adapter():
        base = model(X)
    with torch.no_grad():
        assert torch.equal(model(X), base)
    q = model.model.q
    torch.testing.assert_close(q.randlora_magnitude["default"], q.base_layer.weight.norm(dim=1))


def test_init_weights_false_starts_at_factor_one() -> None:
    """The magnitude is the norm of W + delta_W as drawn, so the layer computes plain RandLoRA at first (as PEFT)."""
    model = model_of(init_weights=False)
    plain = get_randlora_model(Block().double(), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q", "o"]))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "magnitude" not in k})
    with torch.no_grad():
        torch.testing.assert_close(model(X), plain(X))


def test_magnitude_trains_and_only_while_active() -> None:
    model = model_of()
    randomize(model)
    model(X).pow(2).sum().backward()
    q = model.model.q
    assert q.randlora_magnitude["default"].requires_grad and q.randlora_magnitude["default"].grad.abs().sum() > 0
    model.add_adapter("other", config())
    assert not model.model.q.randlora_magnitude["other"].requires_grad
    model.set_adapter("other")
    assert not q.randlora_magnitude["default"].requires_grad and q.randlora_magnitude["other"].requires_grad


def test_merge_unmerge_and_merged_forward() -> None:
    """One merge of every active adapter keeps the outputs; a later merge keeps the outputs of its moment.

    A DoRA adapter's norm is taken of the weight the layer holds, so merging some active DoRA
    adapters changes what the others compute (SPEC 3.11); each merge still equals the forward
    just before it, and unmerging restores the weights in reverse.
    """
    model = model_of()
    randomize(model)
    model.add_adapter("plain", RandLoraConfig(r=2, randlora_alpha=3.0, target_modules=["q"]))
    model.add_adapter("second", config(r=2, target_modules=["o"]))
    randomize(model, seed=2)
    model.set_adapter(["default", "plain", "second"])
    weights = {p: layer.base_layer.weight.clone() for p, layer in model.named_randlora_layers()}

    def restored() -> None:
        for path, layer in model.named_randlora_layers():
            torch.testing.assert_close(layer.base_layer.weight, weights[path], rtol=1e-12, atol=1e-13)
            assert layer.dora_merges == [] and layer.merged_adapters == []

    with torch.no_grad():
        expected = model(X)
        model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(model(X), expected, rtol=1e-12, atol=1e-12)
        model.unmerge_adapter()
        restored()
        model.merge_adapter(["default", "plain"])
        between = model(X)  # "second" still runs unmerged, on the merged weight
        model.merge_adapter(["second"])
        torch.testing.assert_close(model(X), between, rtol=1e-12, atol=1e-12)
        model.unmerge_adapter()
        restored()


def test_merge_and_unload_reproduces_outputs_in_float32() -> None:
    model = model_of(torch.float32)
    randomize(model)
    x = X.float()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = model_of()
    randomize(model)
    save_adapter(model, tmp_path / "dora.safetensors")
    ckpt = spec_ckpt.load(tmp_path / "dora.safetensors", supported_features=spec_ckpt.ALL_FEATURES)
    assert ckpt.config.use_dora and ckpt.magnitude("q").shape == (20,)
    torch.manual_seed(0)
    loaded = load_adapter(Block().double(), tmp_path / "dora.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X))
    save_adapter(loaded, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "dora.safetensors").read_bytes()


def test_dropout_in_training_reads_the_dropped_input_and_eval_is_exact() -> None:
    model = model_of(randlora_dropout=0.5)
    randomize(model)
    model.train()
    torch.manual_seed(4)
    model(X).sum().backward()
    assert model.model.o.randlora_magnitude["default"].grad is not None
    model.eval()
    reference = model_of()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(X), reference(X))


SPECS = [
    KindSpec("dora-linear", "linear", 7, {"a": 3, "b": 2}, dora=("a", "b"), active=("b", "a"), in_features=11, seed=3),
    KindSpec(
        "dora-conv1d",
        "conv1d",
        6,
        {"default": 3},
        dora=("default",),
        in_channels=4,
        kernel_size=(3,),
        stride=(1,),
        padding=(1,),
        dilation=(1,),
        groups=2,
        spatial=(6,),
        x_shape=(2,),
    ),
]


@pytest.mark.parametrize("kind", ["forward", "backward", "merge"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_dora_cases_match_the_reference(kind: str, spec: KindSpec) -> None:
    case = kind_case(spec, kind, "float64")
    assert_driver_matches(CoreDriver(), case, ReferenceDriver().run(case))


def test_magnitudes_follow_the_model_api_trainability_status_and_hotswap(tmp_path: Path) -> None:
    from randlora_core import get_layer_status, hotswap_adapter

    torch.manual_seed(0)
    model = get_randlora_model(nn.Sequential(nn.Linear(8, 6)), RandLoraConfig(r=2, target_modules=["0"], use_dora=True))
    layer = model.model[0]
    model.set_requires_grad("default", False)
    assert not layer.randlora_magnitude["default"].requires_grad
    assert get_layer_status(model)[0].requires_grad == {"default": False}
    model.set_requires_grad("default", True)
    assert layer.randlora_magnitude["default"].requires_grad
    path = tmp_path / "a.safetensors"
    with torch.no_grad():
        layer.randlora_magnitude["default"].mul_(2.0)
    save_adapter(model, path)
    want = layer.randlora_magnitude["default"].detach().clone()
    with torch.no_grad():
        layer.randlora_magnitude["default"].fill_(1.0)
    hotswap_adapter(model, path)
    torch.testing.assert_close(layer.randlora_magnitude["default"].detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("weights", [False, True])
def test_a_dora_merge_invalidates_the_inference_cache_of_a_plain_adapter(weights: bool) -> None:
    """A DoRA merge rewrites the weight in place; a plain adapter's cached entry on that layer must not outlive it."""
    model = model_of()
    randomize(model)
    model.add_adapter("plain", RandLoraConfig(r=2, randlora_alpha=3.0, target_modules=["q"], init_weights=False))
    model.set_adapter(["default", "plain"])
    model.enable_inference_cache(weights=weights)
    with torch.no_grad():
        model(X)  # fills the cache with the unmerged weight
        model.merge_adapter(["default"])
        cached = model(X)
        model.disable_inference_cache()
        torch.testing.assert_close(cached, model(X), rtol=1e-12, atol=1e-12)
