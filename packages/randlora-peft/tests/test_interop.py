"""load_peft_adapter / save_peft_adapter between real PEFT and randlora-core models."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft_helpers import GPT2_TARGETS, LLAMA_TARGETS, assert_close, peft, peft_model, same_module_state, tiny_llama, tokens
from safetensors.torch import load_file

from randlora_core import RandLoraConfig, RandLoraModel, get_randlora_model, load_adapter
from randlora_peft import MachineDependentBasesWarning, load_peft_adapter, save_peft_adapter
from randlora_spec.bases import PEFT_RULE
from randlora_spec.errors import CheckpointError


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _from_pretrained(base: torch.nn.Module, path, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path), **kwargs)


@pytest.mark.parametrize("save_projection", [True, False])
def test_llama_peft_checkpoint_reproduces_peft_outputs(llama, make_peft_dir, save_projection):
    peft_dir, pm = make_peft_dir(llama, target_modules=LLAMA_TARGETS, save_projection=save_projection)
    x = tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        core = load_peft_adapter(copy.deepcopy(llama), peft_dir)
    machine = [w for w in caught if issubclass(w.category, MachineDependentBasesWarning)]
    assert len(machine) == (0 if save_projection else 1)
    assert isinstance(core, RandLoraModel) and core.peft_config["default"].basis_rule == PEFT_RULE
    assert len(list(core.named_randlora_layers())) == 5
    assert_close(_logits(core, x), _logits(pm, x))


def test_gpt2_conv1d_with_biases_and_modules_to_save(gpt2, make_peft_dir):
    peft_dir, pm = make_peft_dir(gpt2, target_modules=GPT2_TARGETS, bias="all", modules_to_save=["lm_head"])
    with torch.no_grad():  # make the trainable biases and the saved head differ from the base model
        for name, param in pm.named_parameters():
            if param.requires_grad and "randlora" not in name:
                param.add_(0.1 * torch.randn_like(param))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(peft_dir))
    core = load_peft_adapter(copy.deepcopy(gpt2), peft_dir)
    assert all(layer.fan_in_fan_out for _, layer in core.named_randlora_layers())
    x = tokens()
    assert_close(_logits(core, x), _logits(pm, x))


def test_several_peft_adapters_each_reproduce_peft(llama, tmp_path):
    pm = peft_model(copy.deepcopy(llama), target_modules=["q_proj", "v_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter(
            "other", peft.RandLoraConfig(r=4, randlora_alpha=16, target_modules=["q_proj", "o_proj"], init_weights=False)
        )
        pm.save_pretrained(str(tmp_path / "multi"))  # "other" goes to the subdirectory multi/other
    x = tokens()
    core = load_peft_adapter(copy.deepcopy(llama), tmp_path / "multi")
    load_peft_adapter(core, tmp_path / "multi" / "other", adapter_name="other")
    for name in ("default", "other"):
        pm.set_adapter(name)
        core.set_adapter(name)
        assert_close(_logits(core, x), _logits(pm, x))
    # PEFT cannot load its own multi/other standalone (its bases are sized for the whole model);
    # written back by us, at PEFT's allocation for its own layers, it loads and matches
    with pytest.raises(RuntimeError, match="size mismatch"):
        _from_pretrained(llama, tmp_path / "multi" / "other")
    alone = _from_pretrained(llama, save_peft_adapter(core, tmp_path / "other-alone", "other"))
    assert_close(_logits(alone, x), _logits(pm, x))


def test_rejected_input_leaves_the_model_unchanged(llama, make_peft_dir):
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj", "v_proj"])
    other = tiny_llama(layers=1)
    other.model.layers[0].self_attn.v_proj = torch.nn.Linear(32, 24, bias=False)
    before = copy.deepcopy(other)
    with pytest.raises(CheckpointError, match="v_proj"):
        load_peft_adapter(other, peft_dir)
    assert same_module_state(other, before)
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "RANDLORA", "r": -1}))
    with pytest.raises(CheckpointError, match="r"):
        load_peft_adapter(llama, peft_dir)
    assert same_module_state(llama, tiny_llama())


@pytest.mark.parametrize("per_layer_bases", [False, True])
@pytest.mark.parametrize("save_projection", [True, False])
def test_core_to_peft_round_trip_reproduces_core(llama, tmp_path, save_projection, per_layer_bases):
    cfg = RandLoraConfig(
        r=4, randlora_alpha=8.0, target_modules=LLAMA_TARGETS, init_weights=False, save_projection=save_projection
    )
    torch.manual_seed(3)
    core = get_randlora_model(copy.deepcopy(llama), cfg)
    out = save_peft_adapter(core, tmp_path / "peft", per_layer_bases=per_layer_bases)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    copies = [k for k in tensors if k.startswith("base_model.model.") and k.endswith(("randlora_A", "randlora_B"))]
    assert len(copies) == (10 if per_layer_bases else 0)
    pm = _from_pretrained(llama, out)
    x = tokens()
    assert_close(_logits(pm, x), _logits(core, x))
    # and back into randlora-core: the same adapter, the portable rule restored
    again = load_peft_adapter(copy.deepcopy(llama), out)
    assert again.peft_config["default"].basis_rule == cfg.basis_rule
    assert again.peft_config["default"].target_modules == cfg.target_modules
    assert torch.equal(_logits(again, x), _logits(core, x))


def test_gpt2_core_to_peft_round_trip_with_biases(gpt2, tmp_path):
    cfg = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["c_attn", "c_fc"], init_weights=False, bias="randlora_only")
    torch.manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core = get_randlora_model(copy.deepcopy(gpt2), cfg)
    with torch.no_grad():
        for _, layer in core.named_randlora_layers():
            layer.get_base_layer().bias.add_(0.5)
    out = save_peft_adapter(core, tmp_path / "peft")
    pm = _from_pretrained(gpt2, out)
    x = tokens()
    assert_close(_logits(pm, x), _logits(core, x))


def test_peft_to_core_to_peft(llama, make_peft_dir, tmp_path):
    peft_dir, pm = make_peft_dir(llama, target_modules=LLAMA_TARGETS)
    core = load_peft_adapter(copy.deepcopy(llama), peft_dir)
    out = save_peft_adapter(core, tmp_path / "again")
    pm2 = _from_pretrained(llama, out)
    x = tokens()
    assert_close(_logits(pm2, x), _logits(pm, x))
    # PEFT's bases survive exactly, at the same allocation
    a = load_file(str(peft_dir / "adapter_model.safetensors"))["base_model.randlora_A"]
    a2 = load_file(str(out / "adapter_model.safetensors"))["base_model.randlora_A"]
    assert torch.equal(a.float(), a2.float())


def test_core_checkpoint_file_from_peft_loads_in_core(llama, make_peft_dir, tmp_path):
    peft_dir, pm = make_peft_dir(llama, target_modules=["q_proj", "v_proj"])
    core = load_peft_adapter(copy.deepcopy(llama), peft_dir)
    core.save_adapter(tmp_path / "adapter.safetensors")  # core's own writer, PEFT's rule, bases stored
    restored = load_adapter(copy.deepcopy(llama), tmp_path / "adapter.safetensors")
    x = tokens()
    assert torch.equal(_logits(restored, x), _logits(core, x))
    assert_close(_logits(restored, x), _logits(pm, x))


def test_save_peft_adapter_needs_a_core_model(llama, tmp_path, make_peft_dir):
    with pytest.raises(CheckpointError, match="RandLoraModel"):
        save_peft_adapter(llama, tmp_path / "x")
    peft_dir, pm = make_peft_dir(llama, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match="base model"):
        load_peft_adapter(pm, peft_dir)


class _WithHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(8, 12)
        self.head = torch.nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_bias_all_with_modules_to_save_duplicates(tmp_path):
    # bias="all" makes PEFT save the head's bias three times: the trained copy (head.bias), the
    # wrapper-internal copy (head.modules_to_save.bias) and the frozen original (head.original_module.bias)
    torch.manual_seed(0)
    base = _WithHead()
    pm = peft_model(copy.deepcopy(base), r=2, randlora_alpha=4, target_modules=["body"], bias="all", modules_to_save=["head"])
    with torch.no_grad():
        for param in pm.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "peft"))
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {"base_model.model.head.modules_to_save.bias", "base_model.model.head.original_module.bias"} <= set(keys)
    core = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert_close(core(x), pm(x))
