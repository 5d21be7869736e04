"""RandLoraModel: targeting, trainable parameters, adapters, merging, unloading, error catalogue."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import Block, GPT2ish, TinyLM, assert_same, randomize_adapters, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from randlora_core import (
    AdapterNotFoundError,
    ConfigError,
    MergeError,
    ModulesToSaveWrapper,
    RandLoraConfig,
    RandLoraLinear,
    RandLoraModel,
    ShapeError,
    TargetModuleError,
    get_randlora_model,
    register_layer_wrapper,
)
from randlora_spec.tolerances import check_close


def cfg(**kw) -> RandLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("randlora_alpha", 8.0)
    return RandLoraConfig(**kw)


def adapted_names(model: RandLoraModel) -> list[str]:
    return [name for name, _ in model.named_randlora_layers()]


# -- targeting ---------------------------------------------------------------------------------


def test_target_names_and_suffixes(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(target_modules=["q_proj", "layers.1.o_proj"]))
    assert adapted_names(model) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.o_proj", "layers.2.q_proj"]


def test_target_regex_fullmatch(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(target_modules=r"layers\.[02]\.(k|v)_proj"))
    assert adapted_names(model) == ["layers.0.k_proj", "layers.0.v_proj", "layers.2.k_proj", "layers.2.v_proj"]
    with pytest.raises(TargetModuleError):  # fullmatch, not search
        get_randlora_model(TinyLM(), cfg(target_modules=r"k_proj"))


def test_all_linear_skips_lm_head(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(target_modules="all-linear"))
    names = adapted_names(model)
    assert "lm_head" not in names and "classifier" in names and len(names) == 3 * 4 + 1


def test_all_linear_skips_output_embeddings() -> None:
    class WithHead(TinyLM):
        def get_output_embeddings(self) -> nn.Module:
            return self.classifier

    torch.manual_seed(0)
    names = adapted_names(get_randlora_model(WithHead(), cfg(target_modules="ALL-LINEAR")))
    assert "classifier" not in names and "lm_head" in names


def test_exclude_modules(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.q_proj"]))
    assert "layers.0.q_proj" not in adapted_names(model) and len(adapted_names(model)) == 5
    model = get_randlora_model(TinyLM(), cfg(target_modules="all-linear", exclude_modules=r".*\.(q|k|v)_proj"))
    assert adapted_names(model) == ["layers.0.o_proj", "layers.1.o_proj", "layers.2.o_proj", "classifier"]


@pytest.mark.parametrize("pattern", [None, "layers", ["blocks", "layers"]])
def test_layers_to_transform(tiny_lm: TinyLM, pattern) -> None:
    config = cfg(target_modules=["q_proj"], layers_to_transform=[0, 2], layers_pattern=pattern)
    assert adapted_names(get_randlora_model(tiny_lm, config)) == ["layers.0.q_proj", "layers.2.q_proj"]


def test_layers_to_transform_int_and_wrong_pattern(tiny_lm: TinyLM) -> None:
    assert adapted_names(get_randlora_model(tiny_lm, cfg(target_modules=["o_proj"], layers_to_transform=1))) == [
        "layers.1.o_proj"
    ]
    with pytest.raises(TargetModuleError, match="layers_pattern='blocks'"):
        get_randlora_model(TinyLM(), cfg(target_modules=["o_proj"], layers_to_transform=1, layers_pattern="blocks"))


def test_no_match_lists_candidates(tiny_lm: TinyLM) -> None:
    state = snapshot(tiny_lm)
    with pytest.raises(TargetModuleError, match=r"matched no module.*layers\.0\.q_proj, layers\.0\.k_proj.*\.\.\."):
        get_randlora_model(tiny_lm, cfg(target_modules=["query"]))
    assert_same(snapshot(tiny_lm), state)
    assert isinstance(tiny_lm.layers[0].q_proj, nn.Linear)


def test_non_linear_targets_named_with_types(tiny_lm: TinyLM) -> None:
    state = snapshot(tiny_lm)
    with pytest.raises(TargetModuleError, match=r"layers\.0\.norm \(LayerNorm\)"):
        get_randlora_model(tiny_lm, cfg(target_modules=["q_proj", "norm"]))
    assert_same(snapshot(tiny_lm), state)  # nothing was replaced, nothing frozen
    assert isinstance(tiny_lm.layers[0].q_proj, nn.Linear)


def test_target_modules_required(block: Block) -> None:
    with pytest.raises(ConfigError, match="target_modules"):
        get_randlora_model(block, cfg())


def test_conv1d_like_and_fan_in_fan_out_warnings() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"fan_in_fan_out is set to False but the target module 'c_(attn|proj)' is `Conv1D`"):
        model = get_randlora_model(GPT2ish(), cfg(target_modules=["c_attn", "c_proj"]))
    assert all(layer.fan_in_fan_out for _, layer in model.named_randlora_layers())
    with pytest.warns(UserWarning, match=r"fan_in_fan_out is set to True but .*'q_proj' is `torch.nn.Linear`"):
        model = get_randlora_model(Block(), cfg(target_modules=["q_proj"], fan_in_fan_out=True))
    assert model.model.q_proj.fan_in_fan_out is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_randlora_model(GPT2ish(), cfg(target_modules=["c_attn"], fan_in_fan_out=True))


# -- trainable parameters ----------------------------------------------------------------------


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_lambda_gamma_trainable(block: Block) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj", "o_proj"]))
    assert trainable(model) == {
        f"model.{layer}.randlora_{p}.default" for layer in ("q_proj", "o_proj") for p in ("lambda", "gamma")
    }
    t, total = model.trainable_parameters()
    # q_proj 16->24: m=16, nb=4: 4*4 + 4*16; o_proj 24->16: same
    assert t == 2 * (16 + 64) and total == sum(p.numel() for p in model.parameters())


def test_print_trainable_parameters(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj"]))
    model.print_trainable_parameters()
    t, total = model.trainable_parameters()
    assert capsys.readouterr().out == f"trainable params: {t:,d} || all params: {total:,d} || trainable%: {100 * t / total:.4f}\n"


def test_bias_modes(block: Block) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj", "k_proj"], bias="randlora_only"))
    assert {n for n in trainable(model) if "bias" in n} == {"model.q_proj.base_layer.bias"}  # k_proj has none
    model = get_randlora_model(Block(), cfg(target_modules=["q_proj"], bias="all"))
    biases = {n for n in trainable(model) if "bias" in n}
    assert biases == {"model.q_proj.base_layer.bias", "model.v_proj.bias", "model.o_proj.bias", "model.norm.bias"}


def test_modules_to_save(tiny_lm: TinyLM) -> None:
    x = torch.randn(2, 16)
    model = get_randlora_model(tiny_lm, cfg(target_modules="all-linear", modules_to_save=["classifier"]))
    wrapper = model.model.classifier
    assert isinstance(wrapper, ModulesToSaveWrapper)  # not adapted by all-linear
    assert "classifier" not in adapted_names(model)
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())
    y = model(x)
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)
    assert not torch.allclose(model(x), y)
    with model.disable_adapter():
        y_base = model(x)
    assert torch.equal(y_base, y)  # adapters are a no-op at init, and the original head is used
    with pytest.raises(ConfigError, match="modules_to_save"):
        get_randlora_model(TinyLM(), cfg(target_modules=["q_proj"], modules_to_save=["nope"]))


# -- forwarding --------------------------------------------------------------------------------


def test_forward_and_getattr_fallthrough(tiny_lm: TinyLM) -> None:
    x = torch.randn(2, 16)
    model = get_randlora_model(tiny_lm, cfg(target_modules=["q_proj"]))
    assert torch.equal(model(x), model.model(x))
    assert model.lm_head is tiny_lm.lm_head and model.layers is tiny_lm.layers
    assert model.get_base_model() is tiny_lm
    with pytest.raises(AttributeError):
        _ = model.does_not_exist


def test_state_dict_contents(block: Block) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj"]))
    keys = set(model.state_dict())
    assert {"model.q_proj.randlora_lambda.default", "model.q_proj.randlora_gamma.default"} <= keys
    assert "model.q_proj.base_layer.weight" in keys and "model.v_proj.weight" in keys
    assert not any(k.startswith("randlora_bases") for k in keys)
    fresh = get_randlora_model(Block(), cfg(target_modules=["q_proj"]))
    fresh.load_state_dict(model.state_dict())


# -- multiple adapters -------------------------------------------------------------------------


def test_add_set_delete_adapters(block: Block) -> None:
    x = torch.randn(3, 16)
    model = get_randlora_model(block, cfg(target_modules=["q_proj"]))
    model.add_adapter("other", cfg(target_modules=["q_proj", "v_proj"]))
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    randomize_adapters(model)
    assert not model.model.v_proj.randlora_lambda["other"].requires_grad  # inactive adapters are frozen
    q = model.model.q_proj  # a linear layer, so adapter contributions add up
    y_default = q(x)
    model.set_adapter("other")
    assert model.model.v_proj.randlora_lambda["other"].requires_grad
    assert not q.randlora_lambda["default"].requires_grad
    y_other = q(x)
    model.set_adapter(["default", "other"])
    assert model.active_adapter == ["default", "other"]
    with model.disable_adapter():
        y_base = q(x)
        y_model_base = model(x)
    torch.testing.assert_close(q(x) - y_base, (y_default - y_base) + (y_other - y_base))
    with pytest.raises(AdapterNotFoundError, match="'missing'"):
        model.set_adapter(["default", "missing"])
    assert model.active_adapters == ["default", "other"]
    model.delete_adapter("default")
    assert model.active_adapters == ["other"] and "default" not in q.randlora_lambda
    model.delete_adapter("other")
    assert model.active_adapters == [] and torch.equal(model(x), y_model_base)
    with pytest.raises(AdapterNotFoundError):
        model.delete_adapter("other")


def test_delete_last_active_picks_first_remaining(block: Block) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj"]))
    model.add_adapter("b", cfg(target_modules=["q_proj"]))
    model.add_adapter("c", cfg(target_modules=["q_proj"]))
    model.set_adapter("c")
    model.delete_adapter("c")
    assert model.active_adapters == ["default"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("projection_prng_key", 1), ("save_projection", True), ("sparse", True), ("basis_rule", "other-rule-v1")],
)
def test_add_adapter_shared_fields(block: Block, field: str, value) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=field):
        model.add_adapter("x", cfg(target_modules=["q_proj"], **{field: value}))
    with pytest.raises(ConfigError, match="already exists"):
        model.add_adapter("default", cfg(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"without '\.'"):
        model.add_adapter("a.b", cfg(target_modules=["q_proj"]))


def test_add_adapter_regrows_bases_keeping_values(block: Block) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj"], r=4))
    randomize_adapters(model)
    x = torch.randn(3, 16)
    y = model(x)
    old_a = model.randlora_bases.randlora_A.clone()
    model.add_adapter("small_r", cfg(r=2, target_modules=["q_proj", "o_proj"]))  # more bases, same layers
    model.add_adapter("big_r", cfg(r=8, target_modules=["v_proj"]))
    shape = model.randlora_bases.shape
    # SPEC 3.9: in/out maxima over all adapted layers (24, 24) -> m_max 24, nb_max = ceil(24 / 2)
    assert (shape.r, shape.m_max, shape.M_max, shape.nb_max) == (8, 24, 24, 12)
    assert torch.equal(model.randlora_bases.randlora_A[:4, :, :16], old_a[:, :, :16])
    assert torch.equal(model(x), y)  # new adapters inactive; default unchanged bit for bit


def test_add_adapter_cannot_regrow_injected_or_very_sparse(block: Block) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj"]))
    model.set_shared_bases(model.randlora_bases.randlora_A.clone(), model.randlora_bases.randlora_B.clone())
    state = snapshot(model)
    with pytest.raises(ShapeError, match="cannot be regenerated"):
        model.add_adapter("big", cfg(r=8, target_modules=["q_proj"]))
    assert_same(snapshot(model), state)
    assert list(model.peft_config) == ["default"]
    net = nn.ModuleDict({"small": nn.Linear(16, 24), "big": nn.Linear(32, 32)})
    model = get_randlora_model(net, cfg(target_modules=["small"], very_sparse=True))
    model.add_adapter("r2", cfg(r=2, target_modules=["small"], very_sparse=True))  # same m_max: fine
    with pytest.raises(ShapeError, match="very_sparse bases depend on m_max"):
        model.add_adapter("wide", cfg(target_modules=["big"], very_sparse=True))


def test_get_randlora_model_twice_is_config_error(block: Block) -> None:
    model = get_randlora_model(block, cfg(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="add_adapter"):
        get_randlora_model(model, cfg(target_modules=["q_proj"]))


# -- merging -----------------------------------------------------------------------------------


def test_merge_unmerge_roundtrip_and_errors(tiny_lm: TinyLM) -> None:
    x = torch.randn(4, 16)
    model = get_randlora_model(tiny_lm, cfg(target_modules="all-linear"))
    randomize_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    y = model(x)
    with pytest.raises(MergeError, match="nothing to unmerge"):
        model.unmerge_adapter()
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    assert check_close(model(x).detach().numpy(), y.detach().numpy(), "float32")[0]
    with pytest.raises(MergeError, match="already merged"):
        model.merge_adapter(["default"])
    with pytest.raises(MergeError, match="unmerge_adapter"):
        model.delete_adapter("default")
    with pytest.raises(MergeError, match="unmerge_adapter"), model.disable_adapter():
        pass
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            assert check_close(p.detach().numpy(), weights[n].numpy(), "float32")[0], n
    with pytest.raises(AdapterNotFoundError):
        model.merge_adapter(["nope"])


def test_safe_merge_non_finite_leaves_model_unchanged(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(target_modules=["q_proj", "o_proj"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[2].o_proj.randlora_gamma["default"][0, 0] = float("inf")  # the last layer merged
    state = snapshot(model)
    with pytest.raises(MergeError, match=r"layers\.2\.o_proj.*NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    assert_same(snapshot(model), state)
    assert model.merged_adapters == []


def test_merge_and_unload_returns_plain_model(tiny_lm: TinyLM) -> None:
    x = torch.randn(4, 16)
    model = get_randlora_model(tiny_lm, cfg(target_modules="all-linear", modules_to_save=["classifier"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.model.classifier.modules_to_save["default"].bias.add_(0.5)
    y = model(x)
    plain = model.merge_and_unload()
    assert plain is tiny_lm and isinstance(plain.layers[0].q_proj, nn.Linear)
    assert isinstance(plain.classifier, nn.Linear)
    assert not any(isinstance(m, (RandLoraLinear, ModulesToSaveWrapper)) for m in plain.modules())
    assert check_close(plain(x).detach().numpy(), y.detach().numpy(), "float32")[0]


def test_unload_restores_base(tiny_lm: TinyLM) -> None:
    x = torch.randn(4, 16)
    y0 = tiny_lm(x)
    model = get_randlora_model(tiny_lm, cfg(target_modules="all-linear", modules_to_save=["classifier"]))
    randomize_adapters(model)
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, (RandLoraLinear, ModulesToSaveWrapper)) for m in plain.modules())
    assert check_close(plain(x).detach().numpy(), y0.detach().numpy(), "float32")[0]


@settings(max_examples=15, deadline=None)
@given(
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    r=st.integers(1, 9),
    conv1d=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
)
def test_property_merged_equals_unmerged(in_f: int, out_f: int, r: int, conv1d: bool, seed: int) -> None:
    from randlora_core.testing import SingleLayer, make_layer

    layer = make_layer(in_f, out_f, True, conv1d, torch.float64)
    with torch.no_grad():
        layer.weight.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_randlora_model(SingleLayer(layer), cfg(r=r, target_modules=["layer"], projection_prng_key=seed))
    randomize_adapters(model, seed % 1000)
    x = torch.randn(3, in_f, dtype=torch.float64)
    y = model(x).detach().numpy()
    model.merge_adapter()
    assert check_close(model(x).detach().numpy(), y, "float64")[0]


# -- registry ----------------------------------------------------------------------------------


def test_register_custom_wrapper() -> None:
    class MyLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = 6, 4
            self.weight = nn.Parameter(torch.randn(4, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T

    class MyWrapper(RandLoraLinear):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mine = MyLinear()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mine(x)

    with pytest.raises(TargetModuleError, match=re.escape("mine (MyLinear)")):
        get_randlora_model(Net(), cfg(target_modules=["mine"]))
    register_layer_wrapper(MyLinear, MyWrapper)
    model = get_randlora_model(Net(), cfg(target_modules=["mine"], init_weights=False))
    assert type(model.model.mine) is MyWrapper
    x = torch.randn(2, 6)
    y = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), y)
    with pytest.raises(ConfigError):
        register_layer_wrapper(MyLinear, object)  # type: ignore[arg-type]


def test_wrapper_not_following_the_protocol_is_refused_before_the_model_changes() -> None:
    class OddLinear(nn.Linear):
        pass

    class NotAWrapper(nn.Module):
        def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
            super().__init__()
            self.base_layer = base_layer

    net = nn.Sequential(OddLinear(6, 4))
    register_layer_wrapper(OddLinear, NotAWrapper)
    with pytest.raises(ConfigError, match="NotAWrapper registered for OddLinear does not follow the wrapper protocol"):
        get_randlora_model(net, cfg(target_modules=["0"]))
    assert type(net[0]) is OddLinear
    assert all(p.requires_grad for p in net.parameters())
