"""Layer kinds and DoRA in the checkpoint format and the config (SPEC 2.1, 2.2, 6.2, 6.3 items 17, 21, 23, 26).

Also the error catalogue rows ERR-350 - ERR-359 of docs/errors.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from randlora_spec import checkpoint
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError
from randlora_spec.layer_kinds import ALL_FEATURES, LayerRecord, required_features
from randlora_spec.safetensors_io import decode, encode
from randlora_spec.testing import catalogue
from randlora_spec.testing.kind_cases import kind_checkpoint_inputs

TARGETS = ["embed", "features.0", "features.1", "head"]


def _ckpt(**overrides: Any) -> checkpoint.AdapterCheckpoint:
    config = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=TARGETS, **overrides)
    return kind_checkpoint_inputs("format", config)[0]


def _blob(**overrides: Any) -> bytes:
    return checkpoint.to_bytes(_ckpt(**overrides), readable_features=ALL_FEATURES)


def _edit_layers(blob: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    tensors, meta = decode(blob, "<test>")
    layers = json.loads(meta["layers"])
    edit(layers)
    meta["layers"] = json.dumps(layers, separators=(",", ":"))
    return encode(tensors, meta)


def _load_all(path: Path) -> Callable[[], object]:
    return lambda: checkpoint.load(path, supported_features=ALL_FEATURES)


def test_linear_records_are_written_as_in_spec_1_0() -> None:
    assert LayerRecord(12, 20).to_json() == {"in_features": 12, "out_features": 20, "fan_in_fan_out": False}
    conv = LayerRecord(27, 8, False, "conv2d", (3, 3), 1).to_json()
    assert list(conv) == ["in_features", "out_features", "fan_in_fan_out", "kind", "kernel_size", "groups"]
    assert LayerRecord(20, 12, True, "embedding").to_json()["kind"] == "embedding"


def test_use_dora_is_canonical_only_when_set() -> None:
    assert "use_dora" not in RandLoraConfig().to_json()
    assert json.loads(RandLoraConfig(use_dora=True).to_json())["use_dora"] is True
    assert RandLoraConfig.parse(RandLoraConfig(use_dora=True).to_json()).use_dora
    assert "use_dora" not in RandLoraConfig(target_modules=["q"]).to_peft_dict()


def test_round_trip_of_kinds_and_magnitudes(tmp_path: Path) -> None:
    ckpt = _ckpt(use_dora=True, save_projection=False)
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, ckpt, readable_features=ALL_FEATURES)
    loaded = checkpoint.load(path, supported_features=ALL_FEATURES)
    assert loaded.layers == ckpt.layers
    assert required_features(loaded.layers, loaded.config.use_dora) == {"conv1d", "conv2d", "embedding", "linear", "dora"}
    for p in TARGETS:
        np.testing.assert_array_equal(loaded.magnitude(p), ckpt.magnitude(p))
    assert loaded.magnitude("head").shape == (6,)
    assert checkpoint.to_bytes(loaded, readable_features=ALL_FEATURES) == path.read_bytes()


def test_dora_magnitude_is_expected_exactly_when_the_config_says_so() -> None:
    ckpt = _ckpt(use_dora=True)
    del ckpt.tensors["head" + checkpoint.MAGNITUDE_SUFFIX]
    with pytest.raises(CheckpointError, match="missing tensors"):
        checkpoint.validate(ckpt, supported_features=ALL_FEATURES)
    plain = _ckpt()
    plain.tensors["head" + checkpoint.MAGNITUDE_SUFFIX] = np.ones(6, np.float32)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        checkpoint.validate(plain, supported_features=ALL_FEATURES)


def test_explicit_linear_kind_is_accepted(tmp_path: Path) -> None:
    blob = _edit_layers(_blob(), lambda layers: layers["head"].update(kind="linear"))
    (tmp_path / "c.safetensors").write_bytes(blob)
    assert checkpoint.load(tmp_path / "c.safetensors", supported_features=ALL_FEATURES).layers["head"].kind == "linear"


# -- error catalogue ------------------------------------------------------------------------------


def test_err_350_readers_and_writers_of_the_1_0_set_refuse_other_kinds(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes(_blob())
    ckpt = _ckpt()
    calls = [
        lambda: checkpoint.load(path),
        lambda: checkpoint.open_checkpoint(path),
        lambda: checkpoint.from_bytes(path.read_bytes()),
        lambda: checkpoint.validate(ckpt),
        lambda: checkpoint.to_bytes(ckpt),
        lambda: checkpoint.save(tmp_path / "out.safetensors", ckpt),
    ]
    for call in calls:
        catalogue.check_row("ERR-350", call, None, tmp_path)


def test_dora_is_a_feature_of_its_own() -> None:
    ckpt = _ckpt(use_dora=True)
    with pytest.raises(CheckpointError, match=r"needs \['dora'\], but only"):
        checkpoint.validate(ckpt, supported_features=ALL_FEATURES - {"dora"})
    assert checkpoint.validate(ckpt, supported_features=ALL_FEATURES).config.use_dora


LAYER_ROWS: dict[str, Callable[[dict[str, Any]], None]] = {
    "ERR-351": lambda layers: layers["features.0"].update(kind="conv4d"),
    "ERR-352": lambda layers: layers["features.0"].pop("groups"),
    "ERR-353": lambda layers: layers["features.0"].update(kernel_size=[3]),
    "ERR-354": lambda layers: layers["features.0"].update(in_features=28),
    "ERR-355": lambda layers: layers["embed"].update(fan_in_fan_out=False),
    "ERR-357": lambda layers: layers["features.0"].update(groups=0),
}


@pytest.mark.parametrize("row_id", sorted(LAYER_ROWS))
def test_malformed_kind_records_are_refused(row_id: str, tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    path.write_bytes(_edit_layers(_blob(), LAYER_ROWS[row_id]))
    catalogue.check_row(row_id, _load_all(path), None, tmp_path)


def test_err_356_magnitude_of_the_wrong_length(tmp_path: Path) -> None:
    tensors, meta = decode(_blob(use_dora=True), "<test>")
    tensors["head.randlora_magnitude"] = tensors["head.randlora_magnitude"][:5].copy()
    path = tmp_path / "c.safetensors"
    path.write_bytes(encode(tensors, meta))
    catalogue.check_row("ERR-356", _load_all(path), None, tmp_path)


def test_err_358_a_dora_config_has_no_peft_form() -> None:
    with pytest.raises(Exception) as info:
        RandLoraConfig(use_dora=True, target_modules=["q"]).to_peft_dict()
    catalogue.check("ERR-358", info.value)


def test_err_359_peft_configs_hold_no_use_dora() -> None:
    with pytest.raises(Exception) as info:
        RandLoraConfig.from_peft_dict({"peft_type": "RANDLORA", "r": 4, "use_dora": False})
    catalogue.check("ERR-359", info.value)
