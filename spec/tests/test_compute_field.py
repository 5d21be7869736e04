"""The runtime-only ``compute`` field (SPEC 2.1): parsed and validated, never serialised."""

from __future__ import annotations

import json

import pytest

from randlora_spec.config import RUNTIME_FIELDS, RandLoraConfig
from randlora_spec.errors import ConfigError


def test_values_and_default() -> None:
    assert RandLoraConfig().compute == "auto"
    for value in ("auto", "factored", "dense"):
        assert RandLoraConfig.parse({"compute": value}).compute == value
    for bad in ("fast", "", None, 1, True):
        with pytest.raises(ConfigError, match="compute"):
            RandLoraConfig.parse({"compute": bad})


def test_not_in_canonical_json_or_peft_dict() -> None:
    cfg = RandLoraConfig(r=8, compute="dense")
    assert RUNTIME_FIELDS == ("compute",)
    assert "compute" not in json.loads(cfg.to_json())
    assert cfg.to_json() == RandLoraConfig(r=8).to_json()  # files do not depend on it
    assert "compute" not in cfg.to_peft_dict()
    assert RandLoraConfig.parse(cfg.to_json()).compute == "auto"
    assert RandLoraConfig.model_validate_json(cfg.model_dump_json()) == cfg  # the full dump keeps it


def test_schema_lists_it() -> None:
    from randlora_spec.config import json_schema

    prop = json_schema()["properties"]["compute"]
    assert prop["default"] == "auto" and set(prop["enum"]) == {"auto", "factored", "dense", "sparse"}
