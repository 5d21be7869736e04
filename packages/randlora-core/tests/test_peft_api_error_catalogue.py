"""Error catalogue rows ERR-320 - ERR-338 (docs/errors.md): the PEFT model API of randlora-core.

Each setup returns the model and the failing call; the test checks the exception against the row
and that the model (bit for bit, requires_grad, module tree, adapters) and the files are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import Block, TinyLM, adapted_block, seeded_block
from torch import nn

from randlora_core import RandLoraConfig, RandLoraModel, get_randlora_model, load_adapter
from randlora_core.testing import model_state
from randlora_spec.testing import catalogue

ROWS = catalogue.Setups()
row = ROWS.row


def cfg(**kw: object) -> RandLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    return RandLoraConfig(**kw)


def fresh(**kw: object) -> RandLoraModel:
    return adapted_block(cfg(**kw))


plain = seeded_block


class Typed(nn.Module):
    """A module with a transformers-style ``config.model_type`` that has no default targets."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery")
        self.block = Block()


@row("ERR-320")
def _no_default_targets(tmp: Path):
    model = Typed()
    return model, lambda: get_randlora_model(model, RandLoraConfig(r=4))


@row("ERR-321")
def _second_bias_adapter(tmp: Path):
    model = fresh(bias="all")
    return model, lambda: model.add_adapter("b", cfg(bias="randlora_only"))


@row("ERR-322")
def _second_bias_adapter_loaded(tmp: Path):
    fresh(bias="randlora_only").save_adapter(tmp / "a.safetensors")
    model = fresh(bias="all")
    return model, lambda: load_adapter(model, tmp / "a.safetensors", "b")


@row("ERR-323")
def _two_copies_active(tmp: Path):
    torch.manual_seed(0)
    model = get_randlora_model(TinyLM(), cfg(modules_to_save=["classifier"]))
    model.add_adapter("b", cfg(modules_to_save=["classifier"]))
    return model, lambda: model.set_adapter(["default", "b"])


@row("ERR-324")
def _forward_meta(tmp: Path):
    model = get_randlora_model(plain(), cfg(), low_cpu_mem_usage=True)
    return model, lambda: model(torch.randn(2, 16))


@row("ERR-325")
def _save_meta(tmp: Path):
    model = get_randlora_model(plain(), cfg(), low_cpu_mem_usage=True)
    return model, lambda: model.save_pretrained(tmp / "out")


@row("ERR-326")
def _fill_mismatch(tmp: Path):
    fresh(r=2).save_adapter(tmp / "a.safetensors")
    model = get_randlora_model(plain(), cfg(), low_cpu_mem_usage=True)
    return model, lambda: model.load_adapter(tmp / "a.safetensors", "default")


@row("ERR-327")
def _from_pretrained_peft_dir(tmp: Path):
    (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "RANDLORA"}))
    model = plain()
    return model, lambda: RandLoraModel.from_pretrained(model, tmp)


@row("ERR-328")
def _from_pretrained_empty_dir(tmp: Path):
    model = plain()
    return model, lambda: RandLoraModel.from_pretrained(model, tmp)


@row("ERR-329")
def _save_pretrained_to_file(tmp: Path):
    (tmp / "taken").write_text("x")
    model = fresh()
    return model, lambda: model.save_pretrained(tmp / "taken")


@row("ERR-330")
def _save_pretrained_unknown(tmp: Path):
    model = fresh()
    return model, lambda: model.save_pretrained(tmp / "out", selected_adapters=["ghost"])


@row("ERR-331")
def _save_pretrained_bad_dir_name(tmp: Path):
    model = fresh()
    model.add_adapter("a/b", cfg())
    return model, lambda: model.save_pretrained(tmp / "out")


@row("ERR-332")
def _set_requires_grad_unknown(tmp: Path):
    model = fresh()
    return model, lambda: model.set_requires_grad(["default", "ghost"])


@row("ERR-333")
def _no_active_config(tmp: Path):
    model = RandLoraModel(plain())
    return model, lambda: model.active_peft_config


@row("ERR-334")
def _status_without_layers(tmp: Path):
    model = RandLoraModel(plain())
    return model, lambda: model.get_layer_status()


@row("ERR-335")
def _base_state_missing_keys(tmp: Path):
    model = fresh()
    state = {k: v.clone() for k, v in plain().state_dict().items() if k != "norm.bias"}
    return model, lambda: model.set_base_model_state_dict({**state, "extra.weight": torch.zeros(1)})


@row("ERR-336")
def _base_state_bad_shape(tmp: Path):
    model = fresh()
    state = {k: v.clone() for k, v in plain().state_dict().items()}
    state["q_proj.weight"] = torch.zeros(3, 3)
    return model, lambda: model.set_base_model_state_dict(state)


@row("ERR-337")
def _base_state_while_merged(tmp: Path):
    model = fresh()
    model.merge_adapter()
    return model, lambda: model.set_base_model_state_dict(plain().state_dict())


@row("ERR-338")
def _disable_layers_while_merged(tmp: Path):
    model = fresh()
    model.merge_adapter()
    return model, lambda: model.disable_adapter_layers()


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path) -> None:
    model, call = ROWS[row_id](tmp_path)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)
