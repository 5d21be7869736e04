"""CoreDriver on cases built here with the spec reference (the golden suite runs in conformance/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from randlora_core.driver import CoreDriver
from randlora_spec.config import RandLoraConfig
from randlora_spec.driver import Driver, ReferenceDriver, discover_drivers
from randlora_spec.golden import GoldenCase
from randlora_spec.testing import LayerSpec, assert_driver_matches, checkpoint_case, layer_case

LAYERS = [
    LayerSpec("12x20", 12, 20, {"default": 4}, x_shape=(2, 3), seed=5),
    LayerSpec("20x12-fifo", 20, 12, {"default": 4}, fan_in_fan_out=True, x_shape=(2, 3), seed=5),
    LayerSpec("3x8", 3, 8, {"default": 5}, x_shape=(2, 3), seed=5),
    LayerSpec("16x16-two-r", 16, 16, {"big": 4, "small": 2}, active=("small", "big"), x_shape=(2, 3), seed=5),
    LayerSpec(
        "14x9-fifo", 14, 9, {"a": 3, "b": 3}, active=("b",), fan_in_fan_out=True, alphas={"b": 1.5}, x_shape=(2, 3), seed=5
    ),
]


def matches_reference(case: GoldenCase) -> None:
    assert_driver_matches(CoreDriver(), case, ReferenceDriver().run(case))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["forward", "backward", "merge"])
@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: s.name)
def test_layer_cases_match_reference(kind: str, dtype: str, spec: LayerSpec) -> None:
    matches_reference(layer_case(spec, kind, dtype))


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_bases_case_bit_exact(kind: str) -> None:
    params = {"seed": 2**63 + 7, "basis_kind": kind, "bases_shape": {"r": 3, "m_max": 11, "M_max": 17, "nb_max": 4}}
    matches_reference(GoldenCase(id="b", kind="bases", dtype="float32", params=params, inputs={}, expected={}, exact=True))


@pytest.mark.parametrize(("stored", "bias", "bf16"), [(True, False, False), (False, True, False), (False, False, True)])
def test_checkpoint_case_matches_reference(tmp_path: Path, stored: bool, bias: bool, bf16: bool) -> None:
    config = RandLoraConfig(
        r=4,
        randlora_alpha=8.0,
        target_modules=["q_proj", "o_proj", "c_fc"],
        save_projection=stored,
        bias="randlora_only" if bias else "none",
    )
    matches_reference(checkpoint_case(tmp_path, "c", config, trained_biases=bias, bf16=bf16))


def test_driver_protocol_and_entry_point() -> None:
    driver = CoreDriver()
    assert isinstance(driver, Driver) and driver.name == "core"
    assert [type(d) for d in discover_drivers({"core"})] == [CoreDriver]
    case = layer_case(LAYERS[0], "forward", "float32")
    assert driver.tolerance_dtype(case, "y") == "float32"
