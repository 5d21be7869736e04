import json

import numpy as np
import pytest

from randlora_spec import checkpoint
from randlora_spec.bases import PEFT_RULE, bases_shape_for_layers, generate_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import BasisRuleError, CheckpointError
from randlora_spec.reference import LayerGeometry
from randlora_spec.safetensors_io import MAX_HEADER_BYTES, decode, encode

LAYERS = {"a.q": checkpoint.LayerRecord(12, 20), "a.o": checkpoint.LayerRecord(20, 12, True)}


def make(save_projection=True, **overrides):
    cfg = RandLoraConfig(r=4, target_modules=["q", "o"], save_projection=save_projection, **overrides)
    shape = bases_shape_for_layers([(r.in_features, r.out_features) for r in LAYERS.values()], 4)
    rng = np.random.default_rng(0)
    tensors = {}
    for path, rec in LAYERS.items():
        g = LayerGeometry(rec.in_features, rec.out_features, 4)
        tensors[path + ".randlora_lambda"] = rng.standard_normal((4, g.nb)).astype(np.float32)
        tensors[path + ".randlora_gamma"] = rng.standard_normal((g.nb, g.m)).astype(np.float32)
    bases = generate_bases(cfg.projection_prng_key, shape) if save_projection else None
    return checkpoint.AdapterCheckpoint(cfg, "default", dict(LAYERS), shape, tensors, bases)


def rewrite(blob, mutate_tensors=None, mutate_meta=None):
    tensors, meta = decode(blob)
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    return encode(tensors, meta)


@pytest.mark.parametrize("save_projection", [True, False])
def test_round_trip(tmp_path, save_projection):
    ckpt = make(save_projection)
    path = tmp_path / "adapter.safetensors"
    checkpoint.save(path, ckpt)
    loaded = checkpoint.load(path)
    assert loaded.config == ckpt.config and loaded.layers == ckpt.layers and loaded.bases_shape == ckpt.bases_shape
    for key, value in ckpt.tensors.items():
        assert np.array_equal(loaded.tensors[key], value)
    a, b = checkpoint.resolve_bases(loaded)
    ea, eb = generate_bases(0, ckpt.bases_shape)
    assert np.array_equal(a, ea) and np.array_equal(b, eb)
    assert checkpoint.to_bytes(loaded) == path.read_bytes()  # deterministic bytes


def test_bases_stored_once_and_size_budget():
    with_bases, without = checkpoint.to_bytes(make(True)), checkpoint.to_bytes(make(False))
    basis_bytes = sum(b.nbytes for b in generate_bases(0, make(True).bases_shape))
    header = int.from_bytes(without[:8], "little") + 8
    trainable = sum(t.nbytes for t in make(False).tensors.values())
    assert len(without) - header == trainable
    assert len(with_bases) - (int.from_bytes(with_bases[:8], "little") + 8) == trainable + basis_bytes


def test_bf16_storage_round_trips_representable_values():
    ckpt = make(False)
    for key in ckpt.tensors:
        ckpt.tensors[key] = (ckpt.tensors[key].view(np.uint32) & 0xFFFF0000).view(np.float32)
    ckpt.bf16_keys = frozenset(ckpt.tensors)
    loaded = checkpoint.from_bytes(checkpoint.to_bytes(ckpt))
    assert loaded.bf16_keys == ckpt.bf16_keys
    for key, value in ckpt.tensors.items():
        assert np.array_equal(loaded.tensors[key], value)


def _raw_header(blob, metadata_json):
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = json.loads(metadata_json)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def _set(key, value):
    return lambda meta: meta.__setitem__(key, value)


BAD_FILES = [
    ("empty", lambda blob: b"", "too short"),
    ("truncated", lambda blob: blob[: len(blob) // 2], "truncated|byte length|outside"),
    ("not safetensors", lambda blob: b"PK\x03\x04 definitely a zip file", "header length|JSON"),
    ("oversized header", lambda blob: (MAX_HEADER_BYTES + 1).to_bytes(8, "little") + blob[8:], "exceeds the limit"),
    (
        "malformed header",
        lambda blob: blob[:8] + b"{" * (int.from_bytes(blob[:8], "little")) + blob[8 + int.from_bytes(blob[:8], "little") :],
        "valid UTF-8 JSON",
    ),
    ("trailing bytes", lambda blob: blob + b"\x00" * 4, "trailing bytes"),
    ("wrong format id", lambda blob: rewrite(blob, mutate_meta=_set("format", "peft")), "format is 'peft'"),
    ("unknown format version", lambda blob: rewrite(blob, mutate_meta=_set("format_version", "9")), "format_version '9'"),
    ("unknown spec version", lambda blob: rewrite(blob, mutate_meta=_set("spec_version", "7.0")), "spec_version '7.0'"),
    ("no metadata", lambda blob: encode(decode(blob)[0]), "metadata lacks"),
    ("bad config", lambda blob: rewrite(blob, mutate_meta=_set("config", '{"r": 0}')), "embedded config is invalid"),
    ("config not json", lambda blob: rewrite(blob, mutate_meta=_set("config", "{")), "not valid JSON"),
    ("rule mismatch", lambda blob: rewrite(blob, mutate_meta=_set("basis_rule", "other-v1")), "disagrees"),
    ("missing key", lambda blob: rewrite(blob, lambda t: t.pop("a.q.randlora_gamma")), "missing tensors"),
    (
        "extra key",
        lambda blob: rewrite(blob, lambda t: t.__setitem__("a.k.randlora_lambda", np.zeros(2, np.float32))),
        "unexpected tensors",
    ),
    (
        "wrong shape",
        lambda blob: rewrite(blob, lambda t: t.__setitem__("a.q.randlora_lambda", np.zeros((4, 2), np.float32))),
        "has shape",
    ),
    (
        "integer dtype",
        lambda blob: rewrite(blob, lambda t: t.__setitem__("a.q.randlora_lambda", np.zeros((4, 3), np.int32))),
        "only floating point",
    ),
    ("nan value", lambda blob: rewrite(blob, lambda t: t["a.q.randlora_lambda"].__setitem__((0, 0), np.nan)), "NaN or Inf"),
    (
        "bases missing",
        lambda blob: rewrite(blob, lambda t: (t.pop("randlora_A"), t.pop("randlora_B")), _set("bases", "absent")),
        "save_projection=True",
    ),
    (
        "bases wrong shape",
        lambda blob: rewrite(blob, lambda t: t.__setitem__("randlora_A", np.zeros((4, 1, 3), np.float32))),
        "stored bases have shapes",
    ),
    (
        "layer too big",
        lambda blob: rewrite(
            blob,
            mutate_meta=_set(
                "layers",
                json.dumps(
                    {
                        "a.q": {"in_features": 999, "out_features": 20, "fan_in_fan_out": False},
                        "a.o": {"in_features": 20, "out_features": 12, "fan_in_fan_out": True},
                    }
                ),
            ),
        ),
        "does not fit",
    ),
]


@pytest.mark.parametrize(("name", "corrupt", "fragment"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_rejected(name, corrupt, fragment):
    blob = corrupt(checkpoint.to_bytes(make(True)))
    with pytest.raises(CheckpointError, match=fragment):
        checkpoint.from_bytes(blob)


def test_unknown_rule_without_bases_is_an_error_not_a_regeneration():
    ckpt = make(False, basis_rule=PEFT_RULE)
    blob = encode(dict(ckpt.tensors), checkpoint.metadata_for(ckpt))
    with pytest.raises(BasisRuleError, match="refusing to substitute"):
        checkpoint.from_bytes(blob)
    assert checkpoint.from_bytes(blob, supported_basis_rules=[PEFT_RULE]).bases is None


def test_bias_shapes_are_checked():
    ckpt = make(True, bias="randlora_only")
    ckpt.biases = ["a.q"]
    ckpt.tensors["a.q.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError, match=r"'a.q.bias' has shape \(7,\), expected \(20,\)"):
        checkpoint.to_bytes(ckpt)
    ckpt.tensors["a.q.bias"] = np.zeros(20, np.float32)
    assert np.array_equal(checkpoint.from_bytes(checkpoint.to_bytes(ckpt)).tensors["a.q.bias"], np.zeros(20))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "nope.safetensors")


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, make(True))
    checkpoint.save(path, make(False))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert checkpoint.load(path).bases is None


def test_invalid_checkpoint_is_not_written(tmp_path):
    ckpt = make(True)
    ckpt.tensors["a.q.randlora_lambda"] = np.zeros((1, 1), np.float32)
    with pytest.raises(CheckpointError):
        checkpoint.save(tmp_path / "x.safetensors", ckpt)
    assert not list(tmp_path.iterdir())


def test_interoperates_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    blob = checkpoint.to_bytes(make(True))
    theirs = st.load(blob)
    ours, _ = decode(blob)
    assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)
    round_trip, _ = decode(st.save(ours))
    assert all(np.array_equal(round_trip[k], ours[k]) for k in ours)


def test_writer_refuses_a_file_readers_cannot_load():
    ckpt = make(False, basis_rule=PEFT_RULE)
    with pytest.raises(BasisRuleError, match="refusing to substitute"):
        checkpoint.to_bytes(ckpt)
    assert checkpoint.from_bytes(checkpoint.to_bytes(ckpt, readable_basis_rules=[PEFT_RULE]), supported_basis_rules=[PEFT_RULE])


def test_bytes_budget_counts_bf16_at_two_bytes():
    ckpt = make(False)
    full = checkpoint.checkpoint_bytes_budget(ckpt)
    ckpt.bf16_keys = frozenset(ckpt.tensors)
    assert checkpoint.checkpoint_bytes_budget(ckpt) * 2 == full
