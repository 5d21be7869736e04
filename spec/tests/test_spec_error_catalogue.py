"""Error catalogue rows for randlora-spec (docs/errors.md): config fields, writers, bases, tolerances.

Config rows are checked three ways: building a config with the bad value, parsing it from JSON, and
assigning it to a valid config (which must stay unchanged). Writer rows check that the target file
and its directory are unchanged after the refused write.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from randlora_spec import checkpoint, generate_bases, tolerance
from randlora_spec.bases import bases_shape_for_layers
from randlora_spec.config import RandLoraConfig
from randlora_spec.testing import catalogue

# row id -> the bad fields (applied to a config that is otherwise valid: sparse=True for ERR-011)
CONFIG_ROWS: dict[str, dict[str, Any]] = {
    "ERR-001": {"r": 0},
    "ERR-002": {"r": True},
    "ERR-003": {"r": 2.0},
    "ERR-004": {"randlora_alpha": 0},
    "ERR-005": {"randlora_alpha": math.inf},
    "ERR-006": {"randlora_alpha": math.nan},
    "ERR-007": {"randlora_dropout": 1.0},
    "ERR-008": {"randlora_dropout": math.nan},
    "ERR-009": {"projection_prng_key": -1},
    "ERR-010": {"projection_prng_key": 2**64},
    "ERR-011": {"very_sparse": True},
    "ERR-012": {"save_projection": "yes"},
    "ERR-013": {"fan_in_fan_out": 1},
    "ERR-014": {"bias": "lora_only"},
    "ERR-015": {"target_modules": ""},
    "ERR-016": {"target_modules": ["q_proj", ""]},
    "ERR-017": {"target_modules": [1]},
    "ERR-018": {"exclude_modules": [""]},
    "ERR-019": {"layers_to_transform": [0, -1]},
    "ERR-020": {"layers_pattern": "layers"},
    "ERR-021": {"modules_to_save": [""]},
    "ERR-022": {"init_weights": "gaussian"},
    "ERR-023": {"basis_rule": "Philox"},
    "ERR-024": {"spec_version": "2.0"},
    "ERR-025": {"compute": "fast"},
    "ERR-026": {"rank": 4},
}


def _base(row_id: str) -> dict[str, Any]:
    return {"sparse": True} if row_id == "ERR-011" else {}


@pytest.mark.parametrize("row_id", sorted(CONFIG_ROWS))
def test_config_row(row_id: str) -> None:
    bad = CONFIG_ROWS[row_id]
    fields = {**_base(row_id), **bad}
    with pytest.raises(Exception) as info:
        RandLoraConfig(**fields)
    catalogue.check(row_id, info.value)
    if not any(isinstance(v, float) and not math.isfinite(v) for v in bad.values()):  # JSON has no inf/nan
        with pytest.raises(Exception) as info:
            RandLoraConfig.parse(json.dumps(fields))
        catalogue.check(row_id, info.value)
    if row_id == "ERR-026":
        return  # an unknown field cannot be assigned; nothing else to check
    config = RandLoraConfig(**_base(row_id))
    before = config.to_json(), config.compute
    for name, value in bad.items():
        with pytest.raises(Exception) as info:
            setattr(config, name, value)
        catalogue.check(row_id, info.value)
    assert (config.to_json(), config.compute) == before, f"{row_id}: the config changed"


@pytest.mark.parametrize(("row_id", "text"), [("ERR-027", "{r: 4"), ("ERR-028", "[1]")])
def test_config_text_rows(row_id: str, text: str) -> None:
    with pytest.raises(Exception) as info:
        RandLoraConfig.parse(text)
    catalogue.check(row_id, info.value)


def test_config_row_peft_type() -> None:
    data = {"peft_type": "LORA", "r": 4}
    with pytest.raises(Exception) as info:
        RandLoraConfig.from_peft_dict(data)
    catalogue.check("ERR-029", info.value)
    assert data == {"peft_type": "LORA", "r": 4}


def _checkpoint(nan: bool = False) -> checkpoint.AdapterCheckpoint:
    layers = {"m.q": checkpoint.LayerRecord(6, 10)}
    config = RandLoraConfig(r=2, target_modules=["q"])
    shape = bases_shape_for_layers([(6, 10)], 2)
    tensors = {"m.q.randlora_lambda": np.ones((2, 3), np.float32), "m.q.randlora_gamma": np.ones((3, 6), np.float32)}
    if nan:
        tensors["m.q.randlora_gamma"][1, 1] = np.nan
    return checkpoint.AdapterCheckpoint(config, "default", layers, shape, tensors, generate_bases(0, shape))


def test_writer_refuses_nan(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, _checkpoint())
    catalogue.check_row("ERR-123", lambda: checkpoint.save(path, _checkpoint(nan=True)), None, tmp_path)


def test_writer_refuses_unreadable_file(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    ckpt.config = RandLoraConfig(r=2, target_modules=["q"], save_projection=False, basis_rule="peft-torch-v1")
    ckpt.bases = None
    catalogue.check_row("ERR-124", lambda: checkpoint.save(tmp_path / "a.safetensors", ckpt), None, tmp_path)


def test_reader_of_bytes() -> None:
    with pytest.raises(Exception) as info:
        checkpoint.from_bytes(b"xx")
    catalogue.check("ERR-125", info.value)


def test_bases_bad_seed() -> None:
    with pytest.raises(Exception) as info:
        generate_bases(-1, bases_shape_for_layers([(6, 10)], 2))
    catalogue.check("ERR-126", info.value)


def test_undeclared_tolerance() -> None:
    with pytest.raises(Exception) as info:
        tolerance("int4")
    catalogue.check("ERR-127", info.value)
