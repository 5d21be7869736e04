import json
import re

import pytest

from randlora_spec import ConfigError, RandLoraConfig
from randlora_spec.bases import PEFT_RULE, PORTABLE_RULE

# (field overrides, field the message must name, message fragment)
BAD_CONFIGS = [
    ({"r": 0}, "r", "greater than or equal to 1"),
    ({"r": -3}, "r", "greater than or equal to 1"),
    ({"r": 2.5}, "r", "valid integer"),
    ({"r": "8"}, "r", "valid integer"),
    ({"randlora_alpha": 0}, "randlora_alpha", "greater than 0"),
    ({"randlora_alpha": -1.0}, "randlora_alpha", "greater than 0"),
    ({"randlora_alpha": float("nan")}, "randlora_alpha", "finite"),
    ({"randlora_dropout": 1.0}, "randlora_dropout", "less than 1"),
    ({"randlora_dropout": -0.1}, "randlora_dropout", "greater than or equal to 0"),
    ({"projection_prng_key": -1}, "projection_prng_key", "greater than or equal to 0"),
    ({"projection_prng_key": 2**64}, "projection_prng_key", "less than"),
    ({"sparse": True, "very_sparse": True}, "very_sparse", "mutually exclusive"),
    ({"bias": "lora_only"}, "bias", "'none', 'all' or 'randlora_only'"),
    ({"unknown_field": 1}, "unknown_field", "unknown field"),
    ({"target_modules": ""}, "target_modules", "at least 1 character"),
    ({"target_modules": ["q", ""]}, "target_modules", "at least 1 character"),
    ({"modules_to_save": [""]}, "modules_to_save", "at least 1 character"),
    ({"layers_to_transform": [-1]}, "layers_to_transform", "greater than or equal to 0"),
    ({"layers_pattern": "layers"}, "layers_pattern", "together with layers_to_transform"),
    ({"basis_rule": "Not A Rule"}, "basis_rule", "pattern"),
    ({"spec_version": "2.0"}, "spec_version", "pattern"),
    ({"save_projection": "yes"}, "save_projection", "valid boolean"),
]


@pytest.mark.parametrize(("overrides", "field", "fragment"), BAD_CONFIGS)
def test_bad_config_names_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as info:
        RandLoraConfig(**overrides)
    assert re.search(rf"\b{field}[.:]", str(info.value))
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


def test_assignment_is_validated():
    cfg = RandLoraConfig()
    with pytest.raises(ConfigError, match="r:"):
        cfg.r = 0
    assert cfg.r == 32


def test_cross_field_rules_hold_on_assignment():
    cfg = RandLoraConfig(very_sparse=True)
    with pytest.raises(ConfigError, match="sparse, very_sparse: mutually exclusive"):
        cfg.sparse = True
    cfg = RandLoraConfig(layers_to_transform=[0], layers_pattern="layers")
    with pytest.raises(ConfigError, match="layers_pattern: only meaningful"):
        cfg.layers_to_transform = None


def test_parse_reports_the_field_once():
    with pytest.raises(ConfigError) as info:
        RandLoraConfig.parse({"r": 0})
    assert str(info.value) == "invalid RandLoraConfig: r: Input should be greater than or equal to 1"


def test_defaults_match_peft_but_save_projection():
    cfg = RandLoraConfig()
    assert (cfg.r, cfg.randlora_alpha, cfg.projection_prng_key) == (32, 640.0, 0)
    assert cfg.basis_rule == PORTABLE_RULE and cfg.scaling == 20.0
    # the portable rule regenerates bases bit-exactly, so they are not stored by default (SPEC 2.1)
    assert cfg.save_projection is False


def test_from_peft_dict_keeps_peft_default_for_missing_save_projection():
    data = {"peft_type": "RANDLORA", "target_modules": ["q"]}
    assert RandLoraConfig.from_peft_dict(data).save_projection is True  # PEFT's default: its file has bases
    assert RandLoraConfig.from_peft_dict({**data, "save_projection": False}).save_projection is False


def test_json_round_trip_is_canonical():
    cfg = RandLoraConfig(r=8, target_modules=["q", "v"], projection_prng_key=2**64 - 1, sparse=True)
    text = cfg.to_json()
    assert RandLoraConfig.parse(text) == cfg
    assert RandLoraConfig.parse(json.loads(text)).to_json() == text


def test_parse_rejects_non_objects():
    with pytest.raises(ConfigError, match="JSON object"):
        RandLoraConfig.parse([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid RandLoraConfig"):
        RandLoraConfig.parse("{not json")


def test_peft_round_trip():
    cfg = RandLoraConfig(r=4, randlora_alpha=8, target_modules=["v", "q"], bias="all", init_weights=False)
    peft_dict = json.loads(json.dumps(cfg.to_peft_dict()))
    assert peft_dict["peft_type"] == "RANDLORA" and peft_dict["target_modules"] == ["v", "q"]
    back = RandLoraConfig.from_peft_dict(peft_dict)
    assert back.basis_rule == PEFT_RULE  # bases made by PEFT follow PEFT's rule
    assert back.model_copy(update={"basis_rule": cfg.basis_rule}) == cfg
    assert "exclude_modules" not in RandLoraConfig(exclude_modules=["x"]).to_peft_dict()


def test_from_peft_dict_of_real_peft_shape():
    data = {
        "task_type": None,
        "peft_type": "RANDLORA",
        "auto_mapping": None,
        "peft_version": "0.21.2",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": False,
        "r": 32,
        "target_modules": ["q"],
        "projection_prng_key": 0,
        "save_projection": True,
        "sparse": False,
        "very_sparse": False,
        "randlora_dropout": 0.0,
        "fan_in_fan_out": False,
        "randlora_alpha": 640,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    assert RandLoraConfig.from_peft_dict(data).r == 32
    with pytest.raises(ConfigError, match="peft_type must be 'RANDLORA'"):
        RandLoraConfig.from_peft_dict({**data, "peft_type": "LORA"})
    with pytest.raises(ConfigError, match="mystery: unknown field"):
        RandLoraConfig.from_peft_dict({**data, "mystery": 1})


def test_from_peft_dict_drops_layers_pattern_peft_ignores():
    cfg = RandLoraConfig.from_peft_dict({"peft_type": "RANDLORA", "target_modules": ["q"], "layers_pattern": "layers"})
    assert cfg.layers_pattern is None
