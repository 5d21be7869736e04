"""Checkpoints: bit-exact round trips (also in a fresh process), size, dtypes, validation before mutation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GPT2ish, TinyLM, assert_same, np64, randomize_adapters, snapshot
from safetensors.numpy import load_file
from torch import nn

from randlora_core import (
    AdapterNotFoundError,
    CheckpointError,
    RandLoraConfig,
    RandLoraModel,
    get_randlora_model,
    load_adapter,
)
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape, generate_bases
from randlora_spec.tolerances import check_close

TESTS = Path(__file__).resolve().parent


def cfg(**kw) -> RandLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("randlora_alpha", 8.0)
    kw.setdefault("target_modules", "all-linear")
    kw.setdefault("save_projection", True)  # these tests read the stored bases; the default is not to store them
    return RandLoraConfig(**kw)


def trained(config: RandLoraConfig, seed: int = 0) -> RandLoraModel:
    torch.manual_seed(seed)
    model = get_randlora_model(TinyLM(), config)
    randomize_adapters(model, seed)
    return model


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_roundtrip_bit_exact(tmp_path: Path, save_projection: bool, kind: str) -> None:
    config = cfg(save_projection=save_projection, sparse=kind == "sparse", very_sparse=kind == "very_sparse", bias="all")
    model = trained(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.25)  # trained biases travel with the checkpoint
    x = torch.randn(3, 16)
    path = tmp_path / "a.safetensors"
    model.save_adapter(path)
    ckpt = spec_ckpt.load(path)
    assert (ckpt.bases is not None) is save_projection
    torch.manual_seed(0)
    restored = load_adapter(TinyLM(), path)
    assert restored.active_adapters == ["default"]
    assert torch.equal(restored(x), model(x))


def test_roundtrip_in_fresh_process(tmp_path: Path) -> None:
    model = trained(cfg(save_projection=False, modules_to_save=["classifier"]), seed=3)
    with torch.no_grad():
        model.model.classifier.modules_to_save["default"].weight.mul_(2.0)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    script = f"""
import sys, torch
sys.path.insert(0, {str(TESTS)!r})
from conftest import TinyLM
from randlora_core import load_adapter
torch.manual_seed(3)
model = load_adapter(TinyLM(), {str(path)!r})
x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
torch.save(model(x).detach(), {str(tmp_path / "y.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "1"})
    assert torch.equal(torch.load(tmp_path / "y.pt"), model(x).detach())


def test_conv1d_roundtrip_records_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_randlora_model(GPT2ish(), cfg(fan_in_fan_out=True))
    randomize_adapters(model)
    path = tmp_path / "gpt.safetensors"
    model.save_adapter(path)
    ckpt = spec_ckpt.load(path)
    assert all(rec.fan_in_fan_out for rec in ckpt.layers.values())
    torch.manual_seed(0)
    restored = load_adapter(GPT2ish(), path)
    x = torch.randn(2, 12)
    assert torch.equal(restored(x), model(x))


def test_file_contents_and_safetensors_compat(tmp_path: Path) -> None:
    model = trained(cfg(target_modules=["q_proj", "o_proj"]))
    path = tmp_path / "a.safetensors"
    model.save_adapter(path)
    tensors = load_file(path)  # the reference safetensors library reads our files
    assert set(tensors) == {"randlora_A", "randlora_B"} | {
        f"layers.{i}.{p}.randlora_{t}" for i in range(3) for p in ("q_proj", "o_proj") for t in ("lambda", "gamma")
    }
    shape = BasesShape(r=4, m_max=24, M_max=24, nb_max=6)  # in/out maxima taken separately (SPEC 3.1)
    a, b = generate_bases(0, shape)
    assert np.array_equal(tensors["randlora_A"], a) and np.array_equal(tensors["randlora_B"], b)
    np.testing.assert_array_equal(
        tensors["layers.1.q_proj.randlora_lambda"], model.model.layers[1].q_proj.randlora_lambda["default"].detach().numpy()
    )


def test_bf16_parameters_stored_as_bf16(tmp_path: Path) -> None:
    model = trained(cfg(target_modules=["q_proj"]))
    model.to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    model.save_adapter(path)
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["layers.0.q_proj.randlora_lambda"]["dtype"] == "BF16"
    assert header["randlora_A"]["dtype"] == "F32"
    x = torch.randn(2, 16).to(torch.bfloat16)
    torch.manual_seed(0)
    restored = load_adapter(TinyLM().to(torch.bfloat16), path, autocast_adapter_dtype=False)
    lam = restored.model.layers[2].q_proj.randlora_lambda["default"]
    assert lam.dtype == torch.bfloat16 and torch.equal(lam, model.model.layers[2].q_proj.randlora_lambda["default"])
    assert torch.equal(restored(x), model(x))
    torch.manual_seed(0)
    upcast = load_adapter(TinyLM().to(torch.bfloat16), path)  # PEFT's default: float32 lambda/gamma, same values
    lam = upcast.model.layers[2].q_proj.randlora_lambda["default"]
    assert lam.dtype == torch.float32 and torch.equal(lam, model.model.layers[2].q_proj.randlora_lambda["default"].float())
    assert check_close(np64(upcast(x)), np64(model(x)), "bfloat16")[0]


def test_size_acceptance(tmp_path: Path) -> None:
    """8 targeted 512x512 layers, r=32: file minus header <= 1.05 x trainable bytes; bases add one copy."""
    net = nn.ModuleDict({f"l{i}": nn.Linear(512, 512) for i in range(8)})
    config = RandLoraConfig(r=32, target_modules=[f"l{i}" for i in range(8)], save_projection=False)
    model = get_randlora_model(net, config)
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert trainable_bytes == 8 * (32 * 16 + 16 * 512) * 4
    sizes = {}
    for save_projection in (False, True):
        model.peft_config["default"].save_projection = save_projection
        path = tmp_path / f"{save_projection}.safetensors"
        model.save_adapter(path)
        blob = path.read_bytes()
        header_len = 8 + int.from_bytes(blob[:8], "little")
        sizes[save_projection] = len(blob) - header_len
    assert sizes[False] <= 1.05 * trainable_bytes
    bases_bytes = (32 * 512 + 512 * 16 * 32) * 4
    assert sizes[True] - sizes[False] == bases_bytes


def test_load_into_existing_model_adds_adapter(tmp_path: Path) -> None:
    source = trained(cfg(target_modules=["q_proj"]))
    path = tmp_path / "q.safetensors"
    source.save_adapter(path)
    torch.manual_seed(0)
    target = get_randlora_model(TinyLM(), cfg(target_modules=["v_proj"]))
    same = load_adapter(target, path, adapter_name="loaded")
    assert same is target and set(target.peft_config) == {"default", "loaded"}
    assert target.active_adapters == ["default"]  # loading does not activate (as PEFT's load_adapter)
    target.set_adapter("loaded")
    x = torch.randn(2, 16)
    assert torch.equal(target(x), source(x))


def test_save_unknown_adapter(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFoundError, match="nope"):
        trained(cfg()).save_adapter(tmp_path / "x.safetensors", adapter_name="nope")


def corrupt(path: Path, tmp_path: Path, mutate) -> Path:
    ckpt = spec_ckpt.load(path)
    mutate(ckpt)
    out = tmp_path / "bad.safetensors"
    out.write_bytes(spec_ckpt.to_bytes(ckpt))
    return out


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("truncated", "truncated|outside the data buffer"),
        ("missing_module", "no module 'layers.0.attn'"),
        ("wrong_shape", r"'layers.0.q_proj' is 16x24 .* but 16x20"),
        ("wrong_layout", "fan_in_fan_out"),
        ("nan", "NaN or Inf"),
    ],
)
def test_bad_file_leaves_model_unchanged(tmp_path: Path, case: str, match: str) -> None:
    path = tmp_path / "good.safetensors"
    trained(cfg(target_modules=["q_proj"])).save_adapter(path)
    if case == "truncated":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(path.read_bytes()[:-10])
    elif case == "missing_module":

        def mutate(c):
            c.layers["layers.0.attn"] = c.layers.pop("layers.0.q_proj")
            c.tensors["layers.0.attn.randlora_lambda"] = c.tensors.pop("layers.0.q_proj.randlora_lambda")
            c.tensors["layers.0.attn.randlora_gamma"] = c.tensors.pop("layers.0.q_proj.randlora_gamma")

        bad = corrupt(path, tmp_path, mutate)
    elif case == "wrong_shape":
        bad = corrupt(path, tmp_path, lambda c: c.layers.update({"layers.0.q_proj": spec_ckpt.LayerRecord(16, 20)}))
    elif case == "wrong_layout":
        bad = corrupt(path, tmp_path, lambda c: c.layers.update({"layers.0.q_proj": spec_ckpt.LayerRecord(16, 24, True)}))
    else:
        blob = bytearray(path.read_bytes())
        ckpt = spec_ckpt.load(path)
        raw = spec_ckpt.to_bytes(ckpt)
        assert raw == bytes(blob)
        lam_bytes = ckpt.tensors["layers.0.q_proj.randlora_lambda"].tobytes()
        at = bytes(blob).index(lam_bytes)
        blob[at : at + 4] = np.array([np.nan], np.float32).tobytes()
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(bytes(blob))
    torch.manual_seed(0)
    plain = TinyLM()
    state = snapshot(plain)
    with pytest.raises(CheckpointError, match=match):
        load_adapter(plain, bad)
    assert_same(snapshot(plain), state)
    assert isinstance(plain.layers[0].q_proj, nn.Linear)
    torch.manual_seed(0)
    existing = get_randlora_model(TinyLM(), cfg(target_modules=["v_proj"]))
    state = snapshot(existing)
    with pytest.raises(CheckpointError, match=match):
        load_adapter(existing, bad, adapter_name="x")
    assert_same(snapshot(existing), state)
    assert list(existing.peft_config) == ["default"]


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_adapter(TinyLM(), "/nonexistent/a.safetensors")


def test_stored_bases_conflicting_with_model(tmp_path: Path) -> None:
    source = trained(cfg(target_modules=["q_proj"]))
    source.set_shared_bases(source.randlora_bases.randlora_A * 2, source.randlora_bases.randlora_B)
    path = tmp_path / "other-bases.safetensors"
    source.save_adapter(path)
    target = trained(cfg(target_modules=["v_proj"]))
    with pytest.raises(CheckpointError, match="differ from the model's shared bases"):
        load_adapter(target, path, adapter_name="x")
    assert list(target.peft_config) == ["default"]


def test_tight_injected_bases_and_very_sparse_second_adapter(tmp_path: Path) -> None:
    # layers 12x20 and 20x12: the formula allocation has m_max = 20, but windows need only m <= 12
    net = nn.ModuleDict({"up": nn.Linear(12, 20), "down": nn.Linear(20, 12)})
    model = get_randlora_model(net, RandLoraConfig(r=4, target_modules=["up", "down"]))
    randomize_adapters(model)
    a, b = generate_bases(0, BasesShape(r=4, m_max=12, M_max=20, nb_max=3))
    model.set_shared_bases(torch.from_numpy(a), torch.from_numpy(b))
    path = tmp_path / "tight.safetensors"
    model.save_adapter(path)
    assert spec_ckpt.load(path).bases_shape == BasesShape(r=4, m_max=12, M_max=20, nb_max=3)
    x = torch.randn(2, 12)
    restored = load_adapter(nn.ModuleDict({"up": nn.Linear(12, 20), "down": nn.Linear(20, 12)}), path)
    with torch.no_grad():
        for name in ("up", "down"):
            restored.model[name].base_layer.load_state_dict(net[name].base_layer.state_dict())
    assert torch.equal(restored.model.down(restored.model.up(x)), model.model.down(model.model.up(x)))


def test_very_sparse_adapter_on_smaller_layers_regenerates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_randlora_model(TinyLM(), cfg(target_modules="all-linear", very_sparse=True, save_projection=False))
    model.add_adapter("small", cfg(target_modules=["classifier"], very_sparse=True, save_projection=False))
    randomize_adapters(model)
    model.set_adapter("small")
    path = tmp_path / "vs.safetensors"
    model.save_adapter(path, "small")
    assert spec_ckpt.load(path).bases_shape.m_max == model.randlora_bases.shape.m_max
    torch.manual_seed(0)
    restored = load_adapter(TinyLM(), path)
    x = torch.randn(2, 16)
    assert torch.equal(restored.model.classifier(x), model.model.classifier(x))
