"""The in-memory checkpoint seam (SPEC 6.3): validate() on objects, header-first lazy reading, one parse per file.

``validate(ckpt)`` must refuse exactly what a reader refuses in a file holding ``ckpt``, with the same
exception and message; ``to_bytes`` must validate and encode once, without re-reading its output;
``open_checkpoint`` must validate the header before reading any tensor and read each tensor once.
"""

from __future__ import annotations

import dataclasses
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from randlora_spec import checkpoint, safetensors_io
from randlora_spec.bases import PEFT_RULE, bases_shape_for_layers, generate_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import BasisRuleError, CheckpointError, RandLoraError
from randlora_spec.safetensors_io import encode

LAYERS = {"a.q": checkpoint.LayerRecord(12, 20), "a.o": checkpoint.LayerRecord(20, 12, True)}
SOURCE = "<under test>"


def make(save_projection: bool = True, **overrides: object) -> checkpoint.AdapterCheckpoint:
    cfg = RandLoraConfig(r=4, target_modules=["q", "o"], save_projection=save_projection, **overrides)
    shape = bases_shape_for_layers([(r.in_features, r.out_features) for r in LAYERS.values()], 4)
    rng = np.random.default_rng(1)
    tensors = {}
    for path, rec in LAYERS.items():
        nb = -(-rec.m // 4)
        tensors[path + ".randlora_lambda"] = rng.standard_normal((4, nb)).astype(np.float32)
        tensors[path + ".randlora_gamma"] = rng.standard_normal((nb, rec.m)).astype(np.float32)
    bases = generate_bases(cfg.projection_prng_key, shape) if save_projection else None
    return checkpoint.AdapterCheckpoint(cfg, "default", dict(LAYERS), shape, tensors, bases)


def unvalidated_bytes(ckpt: checkpoint.AdapterCheckpoint) -> bytes:
    """What a writer without validation would produce for ``ckpt``."""
    tensors = dict(ckpt.tensors)
    if ckpt.bases is not None:
        tensors["randlora_A"], tensors["randlora_B"] = ckpt.bases
    return encode(tensors, checkpoint.metadata_for(ckpt), bf16=ckpt.bf16_keys)


def _set(field: str, value: object) -> Callable[[checkpoint.AdapterCheckpoint], None]:
    return lambda c: setattr(c, field, value)


def _tensor(key: str, value: object) -> Callable[[checkpoint.AdapterCheckpoint], None]:
    return lambda c: c.tensors.__setitem__(key, value)


def _config(**fields: object) -> Callable[[checkpoint.AdapterCheckpoint], None]:
    return lambda c: setattr(c, "config", RandLoraConfig(**{**c.config.model_dump(), **fields}))


def _nan(c: checkpoint.AdapterCheckpoint) -> None:
    c.tensors["a.o.randlora_gamma"][1, 2] = np.nan


def _bias_of_unadapted(c: checkpoint.AdapterCheckpoint) -> None:
    _config(bias="randlora_only")(c)
    c.biases = ["head"]
    c.tensors["head.bias"] = np.zeros(3, np.float32)


# Each defect of an in-memory checkpoint that a file can also hold.
DEFECTS: dict[str, Callable[[checkpoint.AdapterCheckpoint], None]] = {
    "lambda shape": _tensor("a.q.randlora_lambda", np.zeros((4, 2), np.float32)),
    "missing tensor": lambda c: c.tensors.pop("a.o.randlora_gamma"),
    "unexpected tensor": _tensor("a.k.randlora_lambda", np.zeros((4, 3), np.float32)),
    "integer tensor": _tensor("a.q.randlora_lambda", np.zeros((4, 3), np.int32)),
    "nan value": _nan,
    "inf value": _tensor("a.q.randlora_lambda", np.full((4, 3), -np.inf, np.float32)),
    "adapter name with a dot": _set("adapter_name", "a.b"),
    "empty adapter name": _set("adapter_name", ""),
    "layer in_features 0": lambda c: c.layers.__setitem__("a.q", checkpoint.LayerRecord(0, 20)),
    "layer in_features boolean": lambda c: c.layers.__setitem__("a.q", checkpoint.LayerRecord(True, 20)),
    "layer fan_in_fan_out not boolean": lambda c: c.layers.__setitem__("a.q", checkpoint.LayerRecord(12, 20, 1)),  # type: ignore[arg-type]
    "layer too big": lambda c: c.layers.__setitem__("a.q", checkpoint.LayerRecord(12, 999)),
    "no layers": _set("layers", {}),
    "empty layer path": lambda c: c.layers.__setitem__("", checkpoint.LayerRecord(12, 20)),
    "bases_shape r": lambda c: setattr(c, "bases_shape", dataclasses.replace(c.bases_shape, r=5)),
    "bases_shape nb_max": lambda c: setattr(c, "bases_shape", dataclasses.replace(c.bases_shape, nb_max=9)),
    "bases wrong shape": lambda c: setattr(c, "bases", (c.bases[0][:, :, :3].copy(), c.bases[1])),
    "bases float16": lambda c: setattr(c, "bases", (c.bases[0], c.bases[1].astype(np.float16))),
    "bases as BF16": _set("bf16_keys", frozenset({"randlora_A"})),
    "bases absent with save_projection": _set("bases", None),
    "bias although bias='none'": lambda c: (_set("biases", ["a.q"])(c), _tensor("a.q.bias", np.zeros(20, np.float32))(c)),
    "bias of the wrong length": lambda c: (
        _config(bias="all")(c),
        _set("biases", ["a.q"])(c),
        _tensor("a.q.bias", np.zeros(7, np.float32))(c),
    ),
    "bias of a non-adapted module under randlora_only": _bias_of_unadapted,
    "modules_to_save tensor missing": _set("modules_to_save", {"head": ["weight"]}),
    "empty bias path": lambda c: (_config(bias="all")(c), _set("biases", [""])(c)),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_validate_refuses_what_a_reader_refuses_with_the_same_message(defect: str) -> None:
    ckpt = make(True)
    DEFECTS[defect](ckpt)
    with pytest.raises(RandLoraError) as from_file:
        checkpoint.from_bytes(unvalidated_bytes(ckpt), source=SOURCE)
    with pytest.raises(RandLoraError) as from_object:
        checkpoint.validate(ckpt, source=SOURCE)
    assert type(from_object.value) is type(from_file.value)
    assert str(from_object.value) == str(from_file.value)


def test_validate_refuses_an_unregenerable_rule_as_the_reader_does() -> None:
    ckpt = make(False, basis_rule=PEFT_RULE)
    with pytest.raises(BasisRuleError) as from_file:
        checkpoint.from_bytes(unvalidated_bytes(ckpt), source=SOURCE)
    with pytest.raises(BasisRuleError) as from_object:
        checkpoint.validate(ckpt, source=SOURCE)
    assert str(from_object.value) == str(from_file.value)
    assert checkpoint.validate(ckpt, supported_basis_rules=[PEFT_RULE]).bases_stored is False


@pytest.mark.parametrize("save_projection", [True, False])
def test_validate_returns_the_header_a_reader_sees(tmp_path: Path, save_projection: bool) -> None:
    ckpt = make(save_projection, bias="all")
    ckpt.biases = ["a.q"]
    ckpt.tensors["a.q.bias"] = np.zeros(20, np.float32)
    ckpt.modules_to_save = {"head": ["weight"]}
    ckpt.tensors["head.weight"] = np.ones((3, 2), np.float64)
    ckpt.bf16_keys = frozenset({"a.o.randlora_gamma"})
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, ckpt)
    with checkpoint.open_checkpoint(path) as reader:
        read = reader.header
    made = checkpoint.validate(ckpt)
    assert made.tensors == {k: safetensors_io.TensorSpec(v.dtype, v.shape) for k, v in read.tensors.items()}
    assert dataclasses.replace(made, tensors={}) == dataclasses.replace(read, tensors={})
    assert made.bf16_keys == {"a.o.randlora_gamma"}
    assert read.tensors["head.weight"].dtype == "F64"


def test_bytes_and_files_are_checked_by_the_same_code(tmp_path: Path) -> None:
    """Every defect of test_checkpoint's list gives the same message through load() and from_bytes()."""
    from test_checkpoint import BAD_FILES  # the existing corpus of defective files

    blob = checkpoint.to_bytes(make(True))
    path = tmp_path / "bad.safetensors"
    for name, corrupt, _ in BAD_FILES:
        bad = corrupt(blob)
        path.write_bytes(bad)
        with pytest.raises(CheckpointError) as from_file:
            checkpoint.load(path)
        with pytest.raises(CheckpointError) as from_bytes:
            checkpoint.from_bytes(bad, source=str(path))
        assert str(from_file.value) == str(from_bytes.value), name


def test_to_bytes_validates_without_parsing_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    parse = safetensors_io.parse_header
    monkeypatch.setattr(safetensors_io, "parse_header", lambda *a: calls.append(a) or parse(*a))
    blob = checkpoint.to_bytes(make(True))
    assert calls == []
    checkpoint.from_bytes(blob)
    assert len(calls) == 1  # the spy does see parses: a reader parses the header once


def test_to_bytes_copies_the_tensors_once() -> None:
    """Peak memory of to_bytes is one output buffer; encoding and re-decoding would need two."""
    cfg = RandLoraConfig(r=1, target_modules=["q"], save_projection=False)
    layers = {"m.q": checkpoint.LayerRecord(1024, 2048)}
    tensors = {
        "m.q.randlora_lambda": np.ones((1, 1024), np.float32),
        "m.q.randlora_gamma": np.ones((1024, 1024), np.float32),
    }
    ckpt = checkpoint.AdapterCheckpoint(cfg, "default", layers, bases_shape_for_layers([(1024, 2048)], 1), tensors)
    tracemalloc.start()
    try:
        blob = checkpoint.to_bytes(ckpt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(blob) > 4 * 2**20
    assert peak < 1.25 * len(blob), f"to_bytes peaked at {peak / len(blob):.2f}x its output"


def test_a_header_is_validated_without_reading_tensor_values(tmp_path: Path) -> None:
    ckpt = make(True)
    ckpt.tensors["a.o.randlora_gamma"][0, 0] = np.nan  # a writer refuses this, so write it unvalidated
    path = tmp_path / "nan.safetensors"
    path.write_bytes(unvalidated_bytes(ckpt))
    with checkpoint.open_checkpoint(path) as reader:
        assert reader.header.layers == LAYERS
        assert np.array_equal(reader.read("a.q.randlora_lambda"), ckpt.tensors["a.q.randlora_lambda"])
        with pytest.raises(CheckpointError, match=r"'a\.o\.randlora_gamma' contains NaN or Inf values"):
            reader.read("a.o.randlora_gamma")
        with pytest.raises(CheckpointError, match="contains NaN"):
            reader.load()


def test_the_file_is_opened_once(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    first, second = make(True), make(False)
    checkpoint.save(path, first)
    with checkpoint.open_checkpoint(path) as reader:
        checkpoint.save(path, second)  # an atomic replace: the open file keeps the old contents
        loaded = reader.load()
    assert loaded.bases is not None
    assert all(np.array_equal(loaded.tensors[k], v) for k, v in first.tensors.items())
    assert checkpoint.load(path).bases is None


def test_reads_are_writable_copies_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, make(True))
    loaded = checkpoint.load(path)
    assert all(t.flags.writeable and t.flags.owndata for t in loaded.tensors.values())
    assert list(loaded.tensors) == sorted(loaded.tensors)
    blob = path.read_bytes()
    from_blob = checkpoint.from_bytes(blob)
    from_blob.tensors["a.q.randlora_lambda"][0, 0] = 7.0  # a copy: the bytes are untouched
    assert checkpoint.from_bytes(blob).tensors["a.q.randlora_lambda"][0, 0] != 7.0


def test_reader_errors_name_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, make(True))
    with checkpoint.open_checkpoint(path) as reader, pytest.raises(KeyError):
        reader.read("nope")


def test_bf16_rounding_limit_is_exact() -> None:
    largest = np.array(0x7F7F7FFF, np.uint32).view(np.float32)
    ckpt = make(False)
    ckpt.bf16_keys = frozenset({"a.q.randlora_lambda"})
    ckpt.tensors["a.q.randlora_lambda"][0, 0] = -largest  # rounds to the largest finite BF16
    loaded = checkpoint.from_bytes(checkpoint.to_bytes(ckpt))
    assert np.isfinite(loaded.tensors["a.q.randlora_lambda"]).all()
    ckpt.tensors["a.q.randlora_lambda"][0, 0] = np.nextafter(largest, np.float32(np.inf))  # rounds to infinity
    with pytest.raises(CheckpointError, match="once rounded to BF16"):
        checkpoint.to_bytes(ckpt)
    ckpt.tensors["a.q.randlora_lambda"] = ckpt.tensors["a.q.randlora_lambda"].astype(np.float64)
    ckpt.tensors["a.q.randlora_lambda"][0, 0] = 1e300  # float64 beyond float32: infinity before BF16
    with pytest.raises(CheckpointError, match="once rounded to BF16"):
        checkpoint.validate(ckpt)


def test_old_entry_points_keep_their_signatures(tmp_path: Path) -> None:
    ckpt = make(False, basis_rule=PEFT_RULE)
    blob = checkpoint.to_bytes(ckpt, readable_basis_rules=[PEFT_RULE])
    assert checkpoint.from_bytes(blob, "<b>", [PEFT_RULE]).config.basis_rule == PEFT_RULE
    (tmp_path / "p.safetensors").write_bytes(blob)
    assert checkpoint.load(tmp_path / "p.safetensors", supported_basis_rules=[PEFT_RULE]).bases is None
    tensors, meta = safetensors_io.decode(blob)
    assert safetensors_io.read_dtypes(blob) == {k: "F32" for k in tensors} and meta["bases"] == "absent"
    assert os.fspath(tmp_path / "p.safetensors")  # paths as str and PathLike both work
    assert checkpoint.load(str(tmp_path / "p.safetensors"), [PEFT_RULE]).adapter_name == "default"
