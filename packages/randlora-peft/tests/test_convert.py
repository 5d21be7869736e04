"""PEFT adapter directory <-> AdapterCheckpoint conversion (no randlora-core model involved)."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft_helpers import LLAMA_TARGETS, np_equal, peft, tiny_gpt2
from safetensors.torch import load_file, save_file

from randlora_peft import MachineDependentBasesWarning, read_peft_adapter, regenerate_peft_bases, write_peft_adapter
from randlora_peft.convert import SIDECAR_NAME, peft_bases_shape
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PEFT_RULE, PORTABLE_RULE, BasesShape, generate_bases
from randlora_spec.checkpoint import AdapterCheckpoint, LayerRecord
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import BasisRuleError, CheckpointError

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
DOWN = "model.layers.0.mlp.down_proj"


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a PEFT directory, passing its tensors through ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(edit(dict(tensors)), str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_reads_peft_layout_with_layer_shapes_from_the_model(llama, make_peft_dir):
    peft_dir, pm = make_peft_dir(llama, target_modules=LLAMA_TARGETS)
    ckpt = read_peft_adapter(peft_dir, model=llama)
    assert ckpt.config.basis_rule == PEFT_RULE and ckpt.config.save_projection
    assert ckpt.layers[V] == LayerRecord(32, 16, False) and ckpt.layers[DOWN] == LayerRecord(48, 32, False)
    assert len(ckpt.layers) == 5
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert np_equal(ckpt.lam(Q), layer.randlora_lambda["default"].detach().numpy())
    assert np_equal(ckpt.gamma(Q), layer.randlora_gamma["default"].detach().numpy())
    a, b = ckpt.bases
    assert np_equal(a, pm.base_model.randlora_A["default"].numpy()) and np_equal(b, pm.base_model.randlora_B["default"].numpy())
    assert ckpt.bases_shape == BasesShape(r=4, m_max=48, M_max=48, nb_max=12)  # up 32->48, down 48->32


def test_bases_are_kept_exactly_and_compacted_to_bf16_only_when_lossless(llama, make_peft_dir):
    peft_dir, _ = make_peft_dir(llama, target_modules=LLAMA_TARGETS)
    compact = read_peft_adapter(peft_dir, model=llama)
    plain = read_peft_adapter(peft_dir, model=llama, compact_bases=False)
    assert {spec_ckpt.BASIS_A_KEY, spec_ckpt.BASIS_B_KEY} <= compact.bf16_keys  # PEFT draws them in bfloat16
    assert not {spec_ckpt.BASIS_A_KEY, spec_ckpt.BASIS_B_KEY} & plain.bf16_keys
    back = spec_ckpt.from_bytes(spec_ckpt.to_bytes(compact), supported_basis_rules={PEFT_RULE})
    for x, y in zip(back.bases, plain.bases, strict=True):
        assert np_equal(x, y)
    # bases that bf16 cannot hold exactly stay float32
    noisy = _rewrite(
        peft_dir, peft_dir.parent / "noisy", lambda t: {k: v + 1e-4 if k.endswith("randlora_A") else v for k, v in t.items()}
    )
    ckpt = read_peft_adapter(noisy, model=llama)
    assert spec_ckpt.BASIS_A_KEY not in ckpt.bf16_keys and spec_ckpt.BASIS_B_KEY in ckpt.bf16_keys


def test_bf16_tensors_in_the_file_stay_bf16(llama, make_peft_dir):
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj"])
    src = _rewrite(peft_dir, peft_dir.parent / "bf16", lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    ckpt = read_peft_adapter(src, model=llama, compact_bases=False)
    assert Q + ".randlora_lambda" in ckpt.bf16_keys and spec_ckpt.BASIS_B_KEY in ckpt.bf16_keys


def test_adapter_names_in_keys_older_layouts(llama, make_peft_dir):
    peft_dir, _ = make_peft_dir(llama, target_modules=LLAMA_TARGETS)
    plain = read_peft_adapter(peft_dir, model=llama)
    named = _rewrite(peft_dir, peft_dir.parent / "named", lambda t: {k + ".default": v for k, v in t.items()})
    ckpt = read_peft_adapter(named, model=llama)
    assert ckpt.layers == plain.layers and all(np_equal(ckpt.tensors[k], plain.tensors[k]) for k in plain.tensors)
    # two adapters' tensors in one file: the requested name is selected
    two = _rewrite(
        peft_dir,
        peft_dir.parent / "two",
        lambda t: {**{k + ".first": v for k, v in t.items()}, **{k + ".second": v * 2 for k, v in t.items()}},
    )
    second = read_peft_adapter(two, model=llama, adapter_name="second")
    assert second.adapter_name == "second" and np_equal(second.lam(Q), plain.lam(Q) * 2)
    with pytest.raises(CheckpointError, match="several adapter names"):
        read_peft_adapter(two, model=llama, adapter_name="third")


def test_only_per_layer_copies_of_the_bases(llama, make_peft_dir):
    peft_dir, _ = make_peft_dir(llama, target_modules=LLAMA_TARGETS)
    plain = read_peft_adapter(peft_dir, model=llama)
    src = _rewrite(peft_dir, peft_dir.parent / "layer-only", lambda t: {k: v for k, v in t.items() if k.count(".") > 1})
    ckpt = read_peft_adapter(src, model=llama)
    assert np_equal(ckpt.bases[0], plain.bases[0]) and np_equal(ckpt.bases[1], plain.bases[1])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: {**t, f"base_model.model.{Q}.randlora_A": t[f"base_model.model.{Q}.randlora_A"] * 2}, "differs"),
        (lambda t: {k: v for k, v in t.items() if "randlora_A" not in k and "randlora_B" not in k}, "save_projection=True"),
        (lambda t: {k: v for k, v in t.items() if "randlora_B" not in k}, "randlora_B is missing"),
        (lambda t: {k: v for k, v in t.items() if k != f"base_model.model.{Q}.randlora_gamma"}, "lacks randlora_gamma"),
        (lambda t: {**t, "base_model.model.model.norm.weight": torch.ones(32)}, "unexpected tensor"),
        (
            lambda t: {
                **t,
                f"base_model.model.{Q}.randlora_lambda": t[f"base_model.model.{Q}.randlora_lambda"][:, :2].contiguous(),
            },
            "needs",
        ),
        (lambda t: {**t, "base_model.model.model.norm.bias": torch.ones(32)}, "bias='none'"),
        (
            lambda t: {**t, f"base_model.model.{V}.randlora_lambda": t[f"base_model.model.{V}.randlora_lambda"] * float("nan")},
            "NaN",
        ),
    ],
)
def test_bad_files_are_rejected_with_named_problems(llama, make_peft_dir, edit, message):
    peft_dir, _ = make_peft_dir(llama, target_modules=LLAMA_TARGETS)
    src = _rewrite(peft_dir, peft_dir.parent / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        read_peft_adapter(src, model=llama)


def test_bad_directories_and_configs(tmp_path, llama, make_peft_dir):
    with pytest.raises(CheckpointError, match="not a directory"):
        read_peft_adapter(tmp_path / "missing", model=llama)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no adapter_config\.json"):
        read_peft_adapter(tmp_path / "empty", model=llama)
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj"])
    lora = tmp_path / "lora"
    shutil.copytree(peft_dir, lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(CheckpointError, match="peft_type"):
        read_peft_adapter(lora, model=llama)
    (lora / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_peft_adapter(lora, model=llama)
    pickled = tmp_path / "pickled"
    shutil.copytree(peft_dir, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        read_peft_adapter(pickled, model=llama)
    (pickled / "adapter_model.bin").unlink()
    (pickled / "adapter_model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="too short"):
        read_peft_adapter(pickled, model=llama)


def test_layer_shapes_must_match_the_model(llama, make_peft_dir):
    from peft_helpers import tiny_llama

    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj", "v_proj"])
    other = tiny_llama()
    other.model.layers[0].self_attn.v_proj = torch.nn.Linear(32, 24, bias=False)  # m stays 24 != 16
    with pytest.raises(CheckpointError, match="v_proj"):
        read_peft_adapter(peft_dir, model=other)
    del other.model.layers[0].self_attn.q_proj
    with pytest.raises(CheckpointError, match="no module"):
        read_peft_adapter(peft_dir, model=other)


def test_layer_shapes_without_a_model(llama, make_peft_dir):
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj", "v_proj"])
    with pytest.raises(CheckpointError, match="--base-model"):
        read_peft_adapter(peft_dir)  # v_proj is 32 -> 16: PEFT's files cannot tell
    ckpt = read_peft_adapter(peft_dir, layer_shapes={Q: (32, 32), V: (32, 16)})
    assert ckpt.layers == read_peft_adapter(peft_dir, model=llama).layers
    with pytest.raises(CheckpointError, match="lacks"):
        read_peft_adapter(peft_dir, layer_shapes={Q: (32, 32)})
    square, _ = make_peft_dir(llama, name="square", target_modules=["q_proj", "o_proj"])
    inferred = read_peft_adapter(square)  # square layers of the bases' size are unambiguous
    assert inferred.layers == read_peft_adapter(square, model=llama).layers


def test_save_projection_false_regenerates_with_peft_and_warns(llama, make_peft_dir):
    peft_dir, pm = make_peft_dir(llama, target_modules=LLAMA_TARGETS, save_projection=False)
    state = torch.random.get_rng_state()
    with pytest.warns(MachineDependentBasesWarning, match="machine"):
        ckpt = read_peft_adapter(peft_dir, model=llama)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG must not be consumed"
    assert ckpt.config.save_projection and ckpt.bases is not None  # the bases now travel with the adapter
    assert np_equal(ckpt.bases[0], pm.base_model.randlora_A["default"].numpy())
    assert np_equal(ckpt.bases[1], pm.base_model.randlora_B["default"].numpy())
    with pytest.raises(BasisRuleError, match="save_projection=False"):
        read_peft_adapter(peft_dir, model=llama, regenerate_missing_bases=False)


@pytest.mark.parametrize("kind", ["sparse", "very_sparse"])
def test_regenerated_sparse_bases_equal_peft(make_peft_dir, kind):
    gpt2 = tiny_gpt2()
    peft_dir, pm = make_peft_dir(gpt2, target_modules=["c_attn", "c_fc"], save_projection=False, **{kind: True})
    with pytest.warns(MachineDependentBasesWarning):
        ckpt = read_peft_adapter(peft_dir, model=gpt2)
    assert ckpt.layers["transformer.h.0.attn.c_attn"].fan_in_fan_out
    assert np_equal(ckpt.bases[0], pm.base_model.randlora_A["default"].numpy())
    assert np_equal(ckpt.bases[1], pm.base_model.randlora_B["default"].numpy())


def test_regenerate_peft_bases_matches_get_peft_model():
    layers = {"a.x": LayerRecord(20, 12), "b": LayerRecord(12, 30, True)}
    cfg = RandLoraConfig(r=3, projection_prng_key=7, basis_rule=PEFT_RULE)
    a, b = regenerate_peft_bases(cfg, layers)
    assert tuple(a.shape) == (3, 1, 20) and tuple(b.shape) == (30, 7, 3)  # in: max 20, out: max 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.nn.Module()
        model.a = torch.nn.Module()
        model.a.x = torch.nn.Linear(20, 12)
        from transformers.pytorch_utils import Conv1D

        model.b = Conv1D(30, 12)
        pm = peft.get_peft_model(model, peft.RandLoraConfig(r=3, projection_prng_key=7, target_modules=["x", "b"]))
    assert torch.equal(a, pm.base_model.randlora_A["default"].float()) and torch.equal(
        b, pm.base_model.randlora_B["default"].float()
    )


def _portable_ckpt(save_projection: bool) -> AdapterCheckpoint:
    cfg = RandLoraConfig(
        r=4, randlora_alpha=8.0, target_modules=["q", "v"], save_projection=save_projection, projection_prng_key=3
    )
    layers = {"blk.q": LayerRecord(16, 16), "blk.v": LayerRecord(16, 24)}
    shape = BasesShape(r=4, m_max=16, M_max=24, nb_max=4)
    rng = np.random.default_rng(0)
    tensors = {}
    for path in layers:
        tensors[path + ".randlora_lambda"] = rng.standard_normal((4, 4)).astype(np.float32)
        tensors[path + ".randlora_gamma"] = rng.standard_normal((4, 16)).astype(np.float32)
    bases = generate_bases(3, shape) if save_projection else None
    return AdapterCheckpoint(config=cfg, adapter_name="default", layers=layers, bases_shape=shape, tensors=tensors, bases=bases)


@pytest.mark.parametrize("save_projection", [True, False])
def test_ours_to_peft_and_back_is_lossless(tmp_path, save_projection):
    ckpt = _portable_ckpt(save_projection)
    out = write_peft_adapter(ckpt, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "RANDLORA" and config["save_projection"] is True
    assert config["target_modules"] == ["blk.q", "blk.v"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(k for k in tensors if "randlora_A" in k or "randlora_B" in k) == [
        "base_model.randlora_A",
        "base_model.randlora_B",
    ]
    assert json.loads((out / SIDECAR_NAME).read_text())["basis_rule"] == PORTABLE_RULE
    back = read_peft_adapter(out)  # layer shapes from the sidecar
    assert back.config.basis_rule == PORTABLE_RULE and back.config.save_projection == save_projection
    assert spec_ckpt.to_bytes(back) == spec_ckpt.to_bytes(ckpt)


def test_peft_allocation_is_written_and_per_layer_copies_on_request(tmp_path):
    ckpt = _portable_ckpt(True)
    ckpt.bases_shape = BasesShape(r=4, m_max=40, M_max=40, nb_max=10)  # a larger allocation, as a multi-adapter model has
    ckpt.bases = generate_bases(3, ckpt.bases_shape)
    out = write_peft_adapter(ckpt, tmp_path / "peft", per_layer_bases=True)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    want = peft_bases_shape(ckpt)
    assert tuple(tensors["base_model.randlora_A"].shape) == want.a_shape
    assert tuple(tensors["base_model.randlora_B"].shape) == want.b_shape
    assert torch.equal(tensors["base_model.model.blk.v.randlora_B"], tensors["base_model.randlora_B"])
    back = read_peft_adapter(out)
    assert back.config.basis_rule == PORTABLE_RULE and back.bases_shape == ckpt.bases_shape


def test_sidecar_claiming_portable_bases_is_verified(tmp_path):
    out = write_peft_adapter(_portable_ckpt(True), tmp_path / "peft")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    tensors = {k: v + 1.0 if k == "base_model.randlora_B" else v for k, v in tensors.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"))
    ckpt = read_peft_adapter(out)
    assert ckpt.config.basis_rule == PEFT_RULE  # not the portable values any more: kept as stored PEFT bases
    assert np_equal(ckpt.bases[1], tensors["base_model.randlora_B"].numpy())


def test_peft_loads_what_we_write_for_gpt2_layers(tmp_path):
    gpt2 = tiny_gpt2()
    cfg = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["c_attn"], fan_in_fan_out=True)
    layers = {"transformer.h.0.attn.c_attn": LayerRecord(32, 96, True)}
    shape = BasesShape(r=4, m_max=32, M_max=96, nb_max=8)
    rng = np.random.default_rng(1)
    tensors = {
        "transformer.h.0.attn.c_attn.randlora_lambda": rng.standard_normal((4, 8)).astype(np.float32),
        "transformer.h.0.attn.c_attn.randlora_gamma": rng.standard_normal((8, 32)).astype(np.float32),
    }
    ckpt = AdapterCheckpoint(cfg, "default", layers, shape, tensors, generate_bases(0, shape))
    out = write_peft_adapter(ckpt, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), str(out))
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    assert np_equal(layer.randlora_A["default"].numpy(), ckpt.bases[0])
    assert np_equal(layer.randlora_lambda["default"].detach().numpy(), tensors["transformer.h.0.attn.c_attn.randlora_lambda"])


@pytest.mark.parametrize("very_sparse", [False, True])
def test_larger_allocation_without_stored_bases_comes_back_loadable(tmp_path, very_sparse):
    """A core adapter saved without bases from a model whose allocation is larger than its own layers need."""
    from randlora_core import load_adapter

    layers = {"blk.q": LayerRecord(16, 16), "blk.v": LayerRecord(16, 24)}
    cfg = RandLoraConfig(r=4, target_modules=["q", "v"], save_projection=False, projection_prng_key=3, very_sparse=very_sparse)
    union = BasesShape(r=4, m_max=20, M_max=40, nb_max=5)  # another adapter of the model had larger layers
    rng = np.random.default_rng(0)
    tensors = {}
    for path in layers:
        tensors[path + ".randlora_lambda"] = rng.standard_normal((4, 4)).astype(np.float32)
        tensors[path + ".randlora_gamma"] = rng.standard_normal((4, 16)).astype(np.float32)
    ckpt = AdapterCheckpoint(config=cfg, adapter_name="default", layers=layers, bases_shape=union, tensors=tensors)
    back = read_peft_adapter(write_peft_adapter(ckpt, tmp_path / "peft"))
    assert back.config.basis_rule == PORTABLE_RULE and back.bases is None
    assert back.bases_shape == (union if very_sparse else BasesShape(r=4, m_max=16, M_max=24, nb_max=4))
    if very_sparse:
        return
    a_union, b_union = generate_bases(3, union)  # what the layers read from the larger allocation ...
    a_own, b_own = generate_bases(3, back.bases_shape)  # ... is what a reader of the converted file regenerates
    assert np.array_equal(a_union[:, :, :16], a_own) and np.array_equal(b_union[:24, :4, :], b_own)
    spec_ckpt.save(tmp_path / "back.safetensors", back)
    model = torch.nn.Module()
    model.blk = torch.nn.Module()
    model.blk.q, model.blk.v = torch.nn.Linear(16, 16), torch.nn.Linear(16, 24)
    load_adapter(model, tmp_path / "back.safetensors")  # randlora-core refuses the larger allocation without bases
