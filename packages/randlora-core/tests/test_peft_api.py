"""PEFT parity of randlora-core's model API (issue #14): the four behaviour fixes and the PEFT API pieces."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import Block, TinyLM, randomize_adapters
from torch import nn

from randlora_core import (
    ConfigError,
    RandLoraConfig,
    RandLoraModel,
    get_randlora_model,
    load_adapter,
)
from randlora_core.defaults import DEFAULT_TARGET_MODULES
from randlora_core.pretrained import ADAPTER_FILE
from randlora_spec import checkpoint as spec_ckpt


def cfg(**kw: object) -> RandLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    return RandLoraConfig(**kw)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "randlora_" in n or ".modules_to_save." in n}


# -- 1. RandLoraLinear passes weight and bias through ---------------------------------------------


class FeedForward(nn.Module):
    """Reads ``self.wo.weight.dtype`` in forward, as T5's ``T5DenseActDense`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.wi = nn.Linear(8, 16, bias=False)
        self.wo = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wi(x))
        if isinstance(self.wo.weight, torch.Tensor) and h.dtype != self.wo.weight.dtype:
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


def test_layer_exposes_base_weight_and_bias() -> None:
    torch.manual_seed(0)
    model = get_randlora_model(FeedForward(), cfg(target_modules=["wo", "wi"]))
    layer = model.model.wo
    assert layer.weight is layer.get_base_layer().weight and layer.bias is layer.get_base_layer().bias
    assert model.model.wi.bias is None
    assert model(torch.randn(3, 8)).shape == (3, 8)
    assert "weight" not in dict(layer.named_parameters(recurse=False))  # a view of the base layer's, not a new parameter


# -- 2. one adapter with trainable biases per model -----------------------------------------------


def test_second_adapter_with_bias_is_refused_and_biases_follow_their_adapter(block: Block) -> None:
    model = get_randlora_model(block, cfg(bias="all"))
    with pytest.raises(ConfigError, match="only one adapter per model may train biases"):
        model.add_adapter("b", cfg(bias="randlora_only"))
    model.add_adapter("b", cfg())
    biases = {"model.q_proj.base_layer.bias", "model.v_proj.bias", "model.o_proj.base_layer.bias", "model.norm.bias"}
    assert biases <= trainable(model)
    model.set_adapter("b")  # b trains no bias: an optimizer step on b cannot move a's biases
    assert not any("bias" in n for n in trainable(model))
    x = torch.randn(4, 16)
    model.set_adapter("default")
    y_a = model(x).detach()
    model.set_adapter("b")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().sum().backward()
    opt.step()
    model.set_adapter("default")
    assert torch.equal(model(x), y_a)
    model.delete_adapter("default")
    assert not any("bias" in n for n in trainable(model))
    model.add_adapter("c", cfg(bias="all"))  # the bias slot is free again


# -- 3. modules_to_save copies of one module cannot be active together ----------------------------


def test_set_adapter_refuses_two_copies_of_one_module(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(modules_to_save=["classifier"]))
    model.add_adapter("b", cfg(modules_to_save=["classifier"]))
    model.add_adapter("c", cfg(target_modules=["v_proj"]))
    with pytest.raises(ConfigError, match=r"adapters \['default', 'b'\] each hold a modules_to_save copy of 'classifier'"):
        model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default"]
    model.set_adapter(["b", "c"])  # one copy among the active adapters: fine
    wrapper = model.model.classifier
    assert wrapper.active_adapter == "b"
    assert all(p.requires_grad for p in wrapper.modules_to_save["b"].parameters())
    assert not any(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())


# -- 4. nothing trains while adapters are disabled ------------------------------------------------


def test_disable_adapter_freezes_every_adapter_parameter(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(modules_to_save=["classifier"], bias="randlora_only"))
    before = trainable(model)
    assert any("randlora_lambda" in n for n in before) and any("bias" in n for n in before)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.disable_adapter():
            assert trainable(model) == set()
            assert model.get_model_status().requires_grad == {"default": False}
    assert any("trained biases" in str(w.message) for w in caught)  # PEFT warns the same
    assert trainable(model) == before
    with pytest.warns(UserWarning, match="trained biases"):
        model.disable_adapter_layers()
    assert trainable(model) == set() and model.get_model_status().enabled is False
    model.enable_adapter_layers()
    assert trainable(model) == before and model.get_model_status().enabled is True


# -- the PEFT API ---------------------------------------------------------------------------------


def test_base_model_active_config_and_targeted_names(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(target_modules=["q_proj"], layers_to_transform=[0, 2]))
    model.add_adapter("b", cfg(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert model.base_model is model and model.base_model.model is tiny_lm
    assert model.active_peft_config is model.peft_config["default"]
    assert model.targeted_module_names == ["layers.0.q_proj", "layers.2.q_proj", "layers.1.q_proj", "layers.1.v_proj"]
    model.set_adapter(["b", "default"])
    assert model.active_peft_config is model.peft_config["b"]


def test_set_requires_grad_and_inference_mode(block: Block) -> None:
    model = get_randlora_model(block, cfg())
    model.add_adapter("b", cfg())
    model.set_requires_grad("b")
    assert {n.rsplit(".", 1)[-1] for n in trainable(model)} == {"default", "b"}
    model.set_requires_grad(["default", "b"], requires_grad=False)
    assert trainable(model) == set()
    model.set_adapter("b")  # set_adapter makes exactly the active adapters trainable, as PEFT
    assert {n.rsplit(".", 1)[-1] for n in trainable(model)} == {"b"}
    model.set_adapter("b", inference_mode=True)
    assert trainable(model) == set() and model.active_adapters == ["b"]


def test_layer_and_model_status(tiny_lm: TinyLM) -> None:
    model = get_randlora_model(tiny_lm, cfg(target_modules=["q_proj"], modules_to_save=["classifier"]))
    model.add_adapter("b", cfg(target_modules=["q_proj"], layers_to_transform=[0]))
    layers = model.get_layer_status()
    assert [s.name for s in layers] == ["layers.0.q_proj", "layers.1.q_proj", "layers.2.q_proj", "classifier"]
    first = layers[0]
    assert first.module_type == "randlora.RandLoraLinear" and first.enabled and first.active_adapters == ["default"]
    assert first.available_adapters == ["b", "default"] and first.requires_grad == {"default": True, "b": False}
    assert first.devices == {"default": ["cpu"], "b": ["cpu"]} and first.quantization_backend is None
    assert layers[-1].active_adapters == ["default"] and layers[-1].available_adapters == ["default"]
    model.merge_adapter(["default"])
    status = model.get_model_status()
    assert (status.base_model_type, status.adapter_model_type) == ("TinyLM", "RandLoraModel")
    assert status.peft_types == {"default": "RANDLORA", "b": "RANDLORA"}
    assert (status.trainable_params, status.total_params) == model.trainable_parameters()
    assert status.num_adapter_layers == 4 and status.enabled is True
    assert status.active_adapters == ["default"] and status.merged_adapters == ["default"]
    assert status.requires_grad == {"default": True, "b": False}
    assert status.available_adapters == ["b", "default"] and status.devices == {"default": ["cpu"], "b": ["cpu"]}
    model.model.layers[1].q_proj.unmerge()  # one layer unmerged: PEFT calls that irregular
    assert model.get_model_status().merged_adapters == "irregular"


def test_base_model_state_dict_round_trip(tiny_lm: TinyLM) -> None:
    original = copy.deepcopy(tiny_lm).state_dict()
    model = get_randlora_model(tiny_lm, cfg(target_modules=["q_proj"], modules_to_save=["classifier"]))
    state = model.get_base_model_state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
    torch.manual_seed(1)
    other = TinyLM().state_dict()
    adapters = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    keys = model.set_base_model_state_dict(other)
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    assert all(torch.equal(model.get_base_model_state_dict()[k], other[k]) for k in other)
    assert all(torch.equal(p, adapters[n]) for n, p in adapter_params(model).items())
    partial = {"lm_head.weight": torch.zeros(11, 16), "extra": torch.zeros(1)}
    keys = model.set_base_model_state_dict(partial, strict=False)
    assert keys.unexpected_keys == ["extra"] and "lm_head.weight" not in keys.missing_keys
    assert torch.equal(model.model.lm_head.weight, torch.zeros(11, 16))


def _trained(base: nn.Module, **kw: object) -> RandLoraModel:
    model = get_randlora_model(base, cfg(**kw))
    randomize_adapters(model)
    return model


def test_save_pretrained_layout_and_from_pretrained(tiny_lm: TinyLM, tmp_path: Path) -> None:
    base = copy.deepcopy(tiny_lm)
    model = _trained(tiny_lm, modules_to_save=["classifier"], task_type="CAUSAL_LM", revision="v2")
    model.add_adapter("other", cfg(target_modules=["v_proj"], bias="all"))
    randomize_adapters(model, seed=3)
    model.save_pretrained(tmp_path)
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {ADAPTER_FILE, f"other/{ADAPTER_FILE}"}
    x = torch.randn(2, 16)
    expected = model(x)
    restored = RandLoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not restored.training and trainable(restored) == set()  # PEFT's default: inference
    assert torch.equal(restored(x), expected)
    config = restored.peft_config["default"]
    assert (config.task_type, config.revision) == ("CAUSAL_LM", "v2")
    restored.load_adapter(tmp_path / "other", "other", is_trainable=True)
    assert restored.active_adapters == ["default"]
    assert {n.rsplit(".", 1)[-1] for n in trainable(restored) if "randlora_" in n} == {"other"}
    model.set_adapter("other")
    restored.set_adapter("other")
    assert torch.equal(restored(x), model(x))
    # a checkpoint file works as well as a directory, and is_trainable=True trains it
    trained = RandLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / ADAPTER_FILE, is_trainable=True)
    assert trained.training and trainable(trained) >= {"model.layers.0.q_proj.randlora_lambda.default"}


def test_save_pretrained_records_peft_bookkeeping(block: Block, tmp_path: Path) -> None:
    block.name_or_path = "org/block"  # what transformers models carry
    model = get_randlora_model(block, cfg())
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    config = spec_ckpt.load(tmp_path / ADAPTER_FILE).config
    assert config.base_model_name_or_path == "org/block"
    assert config.auto_mapping == {"base_model_class": "Block", "parent_library": "conftest"}
    assert model.peft_config["default"].base_model_name_or_path is None  # the model's config is not changed


def test_bookkeeping_survives_save_adapter_and_load_adapter(block: Block, tmp_path: Path) -> None:
    info = {"task_type": "SEQ_CLS", "base_model_name_or_path": "org/m", "revision": "main", "auto_mapping": {"a": "b"}}
    model = get_randlora_model(copy.deepcopy(block), cfg(**info))
    model.save_adapter(tmp_path / "a.safetensors")
    restored = load_adapter(copy.deepcopy(block), tmp_path / "a.safetensors")
    assert restored.peft_config["default"].bookkeeping() == info
    restored.save_pretrained(tmp_path / "dir")
    again = RandLoraModel.from_pretrained(copy.deepcopy(block), tmp_path / "dir")
    assert again.peft_config["default"].bookkeeping() == info


def test_low_cpu_mem_usage_creates_meta_weights_that_a_load_fills(block: Block, tmp_path: Path) -> None:
    source = _trained(copy.deepcopy(block))
    source.save_pretrained(tmp_path)
    x = torch.randn(3, 16)
    empty = get_randlora_model(copy.deepcopy(block), cfg(), low_cpu_mem_usage=True)
    lam = empty.model.q_proj.randlora_lambda["default"]
    assert lam.is_meta and lam.requires_grad
    empty.load_adapter(tmp_path, "default", is_trainable=True)  # PEFT's flow: same name, values filled in
    assert not empty.model.q_proj.randlora_lambda["default"].is_meta
    assert torch.equal(empty(x), source(x)) and trainable(empty) == trainable(source)
    lazy = RandLoraModel.from_pretrained(copy.deepcopy(block), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(lazy(x), source(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_keeps_lambda_gamma_float32_on_half_bases(
    block: Block, dtype: torch.dtype, tmp_path: Path
) -> None:
    half = copy.deepcopy(block).to(dtype)
    model = _trained(copy.deepcopy(half))
    kept = get_randlora_model(copy.deepcopy(half), cfg(), autocast_adapter_dtype=False)
    assert model.model.q_proj.randlora_lambda["default"].dtype == torch.float32
    assert kept.model.q_proj.randlora_lambda["default"].dtype == dtype
    x = torch.randn(4, 16, dtype=dtype)
    y = model(x)
    assert y.dtype == dtype
    model.merge_adapter()
    torch.testing.assert_close(model(x), y, rtol=4e-2, atol=4e-2)
    model.unmerge_adapter()
    model.save_adapter(tmp_path / "a.safetensors")
    restored = load_adapter(copy.deepcopy(half), tmp_path / "a.safetensors")
    assert restored.model.q_proj.randlora_lambda["default"].dtype == torch.float32 and torch.equal(restored(x), y)
    narrow = load_adapter(copy.deepcopy(half), tmp_path / "a.safetensors", autocast_adapter_dtype=False)
    assert narrow.model.q_proj.randlora_lambda["default"].dtype == dtype


class WithConfig(nn.Module):
    """A transformers-style model: a ``config`` with ``model_type``, and Llama's module names."""

    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.layers = nn.ModuleList([Block() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_target_modules_none_uses_the_architecture_defaults() -> None:
    torch.manual_seed(0)
    model = get_randlora_model(WithConfig("llama"), RandLoraConfig(r=4))
    assert model.targeted_module_names == [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert DEFAULT_TARGET_MODULES["gpt2"] == ("c_attn",)
    with pytest.raises(ConfigError, match="target_modules: must be set"):
        get_randlora_model(WithConfig("mystery"), RandLoraConfig(r=4))


def test_injected_bases_are_saved_even_without_save_projection(block: Block, tmp_path: Path) -> None:
    """Bases set by hand (PEFT's, say) cannot be regenerated, so a checkpoint carries them whatever save_projection says."""
    model = _trained(copy.deepcopy(block), save_projection=False)
    bases = model.randlora_bases
    torch.manual_seed(5)
    model.set_shared_bases(torch.randn(bases.randlora_A.shape), torch.randn(bases.randlora_B.shape))
    model.save_pretrained(tmp_path)
    assert spec_ckpt.load(tmp_path / ADAPTER_FILE).bases is not None
    x = torch.randn(3, 16)
    assert torch.equal(RandLoraModel.from_pretrained(copy.deepcopy(block), tmp_path)(x), model(x))
