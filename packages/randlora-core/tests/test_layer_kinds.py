"""Convolutions and embeddings (SPEC 3.10): every path against the float64 reference, and the kinds' own rules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from randlora_core import RandLoraConfig, RandLoraConv, RandLoraEmbedding, get_randlora_model, load_adapter, save_adapter
from randlora_core.compute import compute_override
from randlora_core.driver import CoreDenseDriver, CoreDriver, CoreFactoredDriver
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.driver import ReferenceDriver
from randlora_spec.errors import CheckpointError, TargetModuleError
from randlora_spec.testing import assert_driver_matches
from randlora_spec.testing.kind_cases import KindSpec, kind_case, kind_checkpoint_case


def _conv(name: str, kind: str, out: int, **kw: object) -> KindSpec:
    dims = len(kw["kernel_size"])  # type: ignore[arg-type]
    for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
        kw.setdefault(key, (default,) * dims)
    kw.setdefault("x_shape", (2,))
    return KindSpec(name, kind, out, kw.pop("adapters", {"default": 3}), seed=9, **kw)  # type: ignore[arg-type]


SPECS = [
    _conv("conv1d-groups3-dilated", "conv1d", 6, in_channels=6, kernel_size=(2,), dilation=(2,), groups=3, spatial=(8,)),
    _conv("conv2d-in-lt-out", "conv2d", 30, in_channels=2, kernel_size=(2, 2), stride=(1, 2), spatial=(4, 5)),
    _conv("conv2d-depthwise", "conv2d", 4, in_channels=4, kernel_size=(3, 3), padding=(1, 1), groups=4, spatial=(4, 4)),
    _conv(
        "conv2d-two-adapters",
        "conv2d",
        5,
        in_channels=3,
        kernel_size=(2, 2),
        spatial=(4, 4),
        adapters={"a": 3, "b": 2},
        active=("b", "a"),
    ),
    _conv("conv3d-stride", "conv3d", 4, in_channels=2, kernel_size=(1, 2, 2), stride=(1, 2, 1), spatial=(2, 4, 3)),
    KindSpec("embedding-pad-last", "embedding", 5, {"default": 2}, in_features=9, padding_idx=8, x_shape=(3, 4), has_bias=False),
    KindSpec(
        "embedding-two-adapters",
        "embedding",
        7,
        {"a": 3, "b": 3},
        active=("a", "b"),
        in_features=11,
        x_shape=(6,),
        has_bias=False,
    ),
]
DRIVERS = [CoreDriver(), CoreDenseDriver(), CoreFactoredDriver()]


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda d: d.name)
@pytest.mark.parametrize("kind", ["forward", "backward", "merge"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_kind_cases_match_the_reference(driver: CoreDriver, kind: str, spec: KindSpec) -> None:
    case = kind_case(spec, kind, "float64")
    assert_driver_matches(driver, case, ReferenceDriver().run(case))


def test_checkpoint_of_every_kind_matches_the_reference(tmp_path: Path) -> None:
    config = RandLoraConfig(r=3, randlora_alpha=6.0, target_modules=["features.0", "features.1", "embed", "head"])
    case = kind_checkpoint_case(tmp_path, "kinds", config)
    assert_driver_matches(CoreDriver(), case, ReferenceDriver().run(case))


class Net(nn.Module):
    """A convolution with reflect padding, an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, padding_mode="reflect")
        self.embed = nn.Embedding(12, 6, padding_idx=0)
        self.head = nn.Linear(6, 2)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(image).mean((2, 3)) + self.embed(ids).mean(1))


def _adapted(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    config = RandLoraConfig(r=2, randlora_alpha=4.0, target_modules=["conv", "embed", "head"], init_weights=False, **kw)
    return get_randlora_model(Net().double(), config)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.tensor([[0, 3, 5], [11, 0, 2]])


def test_padding_mode_and_paths_agree_with_the_merged_kernel() -> None:
    """Dense, factored and merged evaluations agree; reflect padding is the base's own."""
    model, (image, ids) = _adapted(), _inputs()
    outputs = {}
    for path in ("dense", "factored"):
        with compute_override(path), torch.no_grad():  # type: ignore[arg-type]
            outputs[path] = model(image, ids)
    model.merge_adapter()
    with torch.no_grad():
        merged = model(image, ids)
    torch.testing.assert_close(outputs["dense"], outputs["factored"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outputs["dense"], merged, rtol=1e-10, atol=1e-12)
    assert isinstance(model.model.conv, RandLoraConv) and isinstance(model.model.embed, RandLoraEmbedding)


def test_padding_row_of_the_embedding_never_changes() -> None:
    model = _adapted()
    delta = model.model.embed.get_delta_weight("default")
    assert delta.shape == (12, 6) and bool((delta[0] == 0).all()) and bool((delta[1:] != 0).any())
    base = model.model.embed.base_layer.weight[0].clone()
    model.merge_adapter()
    assert torch.equal(model.model.embed.base_layer.weight[0], base)


def test_unbatched_conv_input() -> None:
    model, (image, _) = _adapted(), _inputs()
    conv = model.model.conv
    with torch.no_grad():
        torch.testing.assert_close(conv(image[0]), conv(image[:1])[0])


def test_all_linear_leaves_convolutions_and_embeddings_alone() -> None:
    model = get_randlora_model(Net(), RandLoraConfig(r=2, target_modules="all-linear"))
    assert [path for path, _ in model.named_randlora_layers()] == ["head"]


def test_kind_checkpoint_round_trip_and_kind_check(tmp_path: Path) -> None:
    model, (image, ids) = _adapted(use_dora=True), _inputs()
    with torch.no_grad():
        expected = model(image, ids)
    save_adapter(model, tmp_path / "a.safetensors")
    layers = spec_ckpt.load(tmp_path / "a.safetensors", supported_features=spec_ckpt.ALL_FEATURES).layers
    assert {p: r.kind for p, r in layers.items()} == {"conv": "conv2d", "embed": "embedding", "head": "linear"}
    assert layers["conv"].kernel_size == (3, 3) and layers["embed"].fan_in_fan_out
    torch.manual_seed(5)
    loaded = load_adapter(Net().double(), tmp_path / "a.safetensors")
    loaded.model.conv.base_layer.load_state_dict(model.model.conv.base_layer.state_dict())
    loaded.model.embed.base_layer.load_state_dict(model.model.embed.base_layer.state_dict())
    loaded.model.head.base_layer.load_state_dict(model.model.head.base_layer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, ids), expected)
    with pytest.raises(CheckpointError, match=r"only .* supported here"):
        spec_ckpt.load(tmp_path / "a.safetensors")  # a reader of the 1.0 set refuses it


def test_max_norm_embedding_is_refused() -> None:
    net = Net()
    net.embed = nn.Embedding(12, 6, max_norm=1.0)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(TargetModuleError, match="max_norm"):
        get_randlora_model(net, RandLoraConfig(r=2, target_modules=["embed"]))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


class KindNet(nn.Module):
    """One layer of every kind, in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 2, groups=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.c3 = nn.Conv3d(2, 3, (1, 2, 2), padding_mode="zeros")
        self.embed = nn.Embedding(10, 5, padding_idx=2)

    def forward(self, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.c1(x[0]), self.c2(x[1]), self.c3(x[2]), self.embed(x[3])


@pytest.mark.parametrize("use_dora", [False, True], ids=["plain", "dora"])
def test_merge_and_unmerge_are_exact_for_every_kind(use_dora: bool) -> None:
    """Merging keeps every kind's outputs and unmerging restores its weight (float64, exact to rounding)."""
    torch.manual_seed(0)
    config = RandLoraConfig(r=2, target_modules=["c1", "c2", "c3", "embed"], init_weights=False, use_dora=use_dora)
    model = get_randlora_model(KindNet().double(), config)
    model.add_adapter("b", RandLoraConfig(r=3, target_modules=["c2", "embed"], init_weights=False, use_dora=use_dora))
    model.set_adapter(["default", "b"])
    with torch.no_grad():
        for _, layer in model.named_randlora_layers():
            for mag in layer.randlora_magnitude.values():
                mag.mul_(1.5)
    x = (
        torch.randn(2, 3, 7, dtype=torch.float64),
        torch.randn(2, 4, 5, 5, dtype=torch.float64),
        torch.randn(2, 2, 2, 4, 4, dtype=torch.float64),
        torch.tensor([[1, 2, 9], [2, 0, 5]]),
    )
    weights = {p: layer.base_layer.weight.clone() for p, layer in model.named_randlora_layers()}
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter(safe_merge=True)
        for got, want in zip(model(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        model.unmerge_adapter()
        for path, layer in model.named_randlora_layers():
            torch.testing.assert_close(layer.base_layer.weight, weights[path], rtol=1e-12, atol=1e-13)
        merged = model.merge_and_unload()
        assert {type(m) for m in (merged.c1, merged.c2, merged.c3, merged.embed)} == {
            nn.Conv1d,
            nn.Conv2d,
            nn.Conv3d,
            nn.Embedding,
        }
        for got, want in zip(merged(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
