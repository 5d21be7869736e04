"""PEFT's bookkeeping fields (task_type, base_model_name_or_path, revision, auto_mapping): SPEC 2.1, 2.2, 6.2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from randlora_spec import checkpoint
from randlora_spec.checkpoint import AdapterCheckpoint, LayerRecord
from randlora_spec.config import BOOKKEEPING_FIELDS, RandLoraConfig
from randlora_spec.errors import CheckpointError
from randlora_spec.geometry import bases_shape_for_layers
from randlora_spec.safetensors_io import decode, encode
from randlora_spec.testing import catalogue

BOOKKEEPING = {
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
    "revision": "main",
    "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers.models.llama.modeling_llama"},
}


def _ckpt(**bookkeeping: object) -> AdapterCheckpoint:
    config = RandLoraConfig(r=2, target_modules=["q"], save_projection=False, **bookkeeping)  # type: ignore[arg-type]
    return AdapterCheckpoint(
        config=config,
        adapter_name="default",
        layers={"q": LayerRecord(4, 6)},
        bases_shape=bases_shape_for_layers([(4, 6)], 2),
        tensors={"q.randlora_lambda": np.ones((2, 2), np.float32), "q.randlora_gamma": np.ones((2, 4), np.float32)},
    )


def test_bookkeeping_is_not_canonical_but_travels_in_checkpoints() -> None:
    plain, kept = _ckpt(), _ckpt(**BOOKKEEPING)
    assert kept.config.to_json() == plain.config.to_json()  # the math's identity does not change
    blob = checkpoint.to_bytes(kept)
    meta = decode(blob)[1]
    assert json.loads(meta["bookkeeping"]) == BOOKKEEPING
    assert "bookkeeping" not in decode(checkpoint.to_bytes(plain))[1]
    back = checkpoint.from_bytes(blob).config
    assert {f: getattr(back, f) for f in BOOKKEEPING_FIELDS} == BOOKKEEPING


def test_peft_conversion_keeps_bookkeeping_both_ways() -> None:
    config = RandLoraConfig(r=4, target_modules=["q_proj"], **BOOKKEEPING)  # type: ignore[arg-type]
    data = config.to_peft_dict()
    assert {k: data[k] for k in BOOKKEEPING} == BOOKKEEPING and data["peft_type"] == "RANDLORA"
    back = RandLoraConfig.from_peft_dict({**data, "peft_version": "0.21.2"})
    assert back.bookkeeping() == BOOKKEEPING


def _with_meta(edit: dict[str, str]) -> bytes:
    tensors, meta = decode(checkpoint.to_bytes(_ckpt(task_type="SEQ_CLS")))
    meta.update(edit)
    return encode(tensors, meta)


@pytest.mark.parametrize(
    ("row_id", "edit"),
    [
        ("ERR-309", {"bookkeeping": json.dumps({"task_type": "SEQ_CLS", "r": 8})}),
        ("ERR-309", {"bookkeeping": json.dumps(["SEQ_CLS"])}),
        ("ERR-310", {"bookkeeping": json.dumps({"revision": ""})}),
    ],
)
def test_bad_bookkeeping_entries_are_refused(row_id: str, edit: dict[str, str]) -> None:
    with pytest.raises(CheckpointError) as info:
        checkpoint.from_bytes(_with_meta(edit), "adapter.safetensors")
    catalogue.check(row_id, info.value)


def test_bookkeeping_inside_the_config_is_refused() -> None:
    tensors, meta = decode(checkpoint.to_bytes(_ckpt(task_type="SEQ_CLS")))
    config = json.loads(meta["config"])
    config["task_type"] = "SEQ_CLS"
    meta["config"] = json.dumps(config)
    with pytest.raises(CheckpointError) as info:
        checkpoint.from_bytes(encode(tensors, meta), "adapter.safetensors")
    catalogue.check("ERR-311", info.value)
