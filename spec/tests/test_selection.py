"""Module selection by name (SPEC 2.3), as randlora_spec.selection defines it for every implementation."""

import pytest

from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import TargetModuleError
from randlora_spec.selection import in_modules_to_save, layer_index, name_matches, nothing_matched, restrict


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        (["q_proj"], "model.layers.0.q_proj", True),
        (["q_proj"], "model.layers.0.xq_proj", False),
        (["layers.0.q_proj"], "model.layers.0.q_proj", True),
        (r".*\.q_proj", "model.layers.0.q_proj", True),
        ("q_proj", "model.layers.0.q_proj", False),  # a string must match the whole name
    ],
)
def test_name_matches(patterns, name, expected):
    assert name_matches(patterns, name) is expected


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("model.layers.3.q_proj", None, 3),
        ("model.3", None, None),  # the last component is never the index
        ("blocks.1.layers.4.q", "layers", 4),
        ("blocks.1.layers.4.q", ["missing", "blocks"], 1),
        ("model.decoder.layers.2.fc", "decoder.layers", 2),
        ("model.q_proj", None, None),
    ],
)
def test_layer_index(name, pattern, expected):
    assert layer_index(name, pattern) == expected


def test_modules_to_save_covers_the_module_and_what_is_inside():
    assert in_modules_to_save("model.head", ["head"]) and in_modules_to_save("model.head.dense", ["head"])
    assert not in_modules_to_save("model.header", ["head"]) and not in_modules_to_save("x", None)


def test_restrict_applies_steps_2_to_4_in_order_and_describes_them():
    names = ["m.layers.0.q", "m.layers.0.k", "m.layers.1.q", "m.head.q"]
    cfg = RandLoraConfig(target_modules=["q", "k"], modules_to_save=["head"], exclude_modules=["k"], layers_to_transform=[1])
    kept, described = restrict([(n, i) for i, n in enumerate(names)], cfg)
    assert kept == [("m.layers.1.q", 2)]
    assert described == "target_modules=['q', 'k'] minus exclude_modules=['k'] restricted to layers_to_transform=[1]"


def test_nothing_matched_lists_at_most_the_given_number():
    err = nothing_matched("target_modules=['x']", [f"l{i}" for i in range(12)], 10)
    assert isinstance(err, TargetModuleError) and str(err).endswith("l8, l9, ...]")
