"""Error catalogue rows for randlora-peft (docs/errors.md): bad PEFT directories, models and arguments.

Every row checks the documented exception and that the model and every file under ``tmp_path``
are unchanged afterwards.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft_helpers import peft_model, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.testing import model_state
from randlora_peft import accelerate, load_peft_adapter, read_peft_adapter, save_peft_adapter
from randlora_spec.testing import catalogue

TARGETS = ["q_proj", "v_proj"]
_PEFT_DIR: dict[str, Path] = {}


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A real PEFT RandLoRA adapter directory of a tiny Llama (saved once per module)."""
    model = peft_model(copy.deepcopy(tiny_llama()), target_modules=TARGETS)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    return out, model


def copy_dir(src: Path, tmp: Path, name: str = "adapter") -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def bigger_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


ROWS = catalogue.Setups()
row = ROWS.row


@row("ERR-130")
def _missing_dir(tmp: Path, good: Path, pm: nn.Module):
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, tmp / "nope")


@row("ERR-131")
def _no_config(tmp: Path, good: Path, pm: nn.Module):
    (tmp / "empty").mkdir()
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, tmp / "empty")


@row("ERR-132")
def _config_not_json(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    (d / "adapter_config.json").write_text("{nope")
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-133")
def _lora_adapter(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    data = json.loads((d / "adapter_config.json").read_text())
    data["peft_type"] = "LORA"
    (d / "adapter_config.json").write_text(json.dumps(data))
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-134")
def _pickle_only(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    (d / "adapter_model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, d / "adapter_model.bin")
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-135")
def _into_peft_model(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    model = copy.deepcopy(pm)
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-136")
def _model_layers_differ(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    model = bigger_llama()
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-137")
def _truncated(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-138")
def _nan(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    weights = d / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.randlora_lambda"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-139")
def _no_weights(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    (d / "adapter_model.safetensors").unlink()
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, d)


@row("ERR-140")
def _bad_name(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    model = tiny_llama()
    return model, lambda: load_peft_adapter(model, d, adapter_name="a.b")


def core_model() -> nn.Module:
    return get_randlora_model(tiny_llama(), RandLoraConfig(r=4, target_modules=TARGETS))


@row("ERR-141")
def _save_not_randlora(tmp: Path, good: Path, pm: nn.Module):
    model = tiny_llama()
    return model, lambda: save_peft_adapter(model, tmp / "out")


@row("ERR-142")
def _save_bad_info(tmp: Path, good: Path, pm: nn.Module):
    model = core_model()
    return model, lambda: save_peft_adapter(model, tmp / "out", peft_info={"foo": 1})


@row("ERR-143")
def _save_onto_file(tmp: Path, good: Path, pm: nn.Module):
    (tmp / "file").write_text("x")
    model = core_model()
    return model, lambda: save_peft_adapter(model, tmp / "file")


@row("ERR-144")
def _save_unknown(tmp: Path, good: Path, pm: nn.Module):
    model = core_model()
    return model, lambda: save_peft_adapter(model, tmp / "out", adapter_name="ghost")


@row("ERR-145")
def _accelerate_compute(tmp: Path, good: Path, pm: nn.Module):
    model = copy.deepcopy(pm)
    return model, lambda: accelerate(model, compute="fast")


@row("ERR-146")
def _accelerate_plain(tmp: Path, good: Path, pm: nn.Module):
    model = tiny_llama()
    return model, lambda: accelerate(model)


@row("ERR-147")
def _read_without_shapes(tmp: Path, good: Path, pm: nn.Module):
    d = copy_dir(good, tmp)
    return None, lambda: read_peft_adapter(d)


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path, peft_dir: tuple[Path, nn.Module]) -> None:
    good, pm = peft_dir
    model, call = ROWS[row_id](tmp_path, good, pm)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)
