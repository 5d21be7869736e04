"""The bnb-int8 / bnb-nf4 / bnb-fp4 drivers on cases built here with the spec reference (golden suite: conformance/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from randlora_bnb.driver import BnbDriver, BnbFp4Driver, BnbInt8Driver, BnbNf4Driver
from randlora_spec.config import RandLoraConfig
from randlora_spec.driver import Driver, ReferenceDriver, Unsupported, discover_drivers
from randlora_spec.golden import GoldenCase
from randlora_spec.testing import LayerSpec, assert_driver_matches, checkpoint_case, layer_case

QUANTS = ("int8", "nf4", "fp4")
LAYERS = [
    LayerSpec("12x20", 12, 20, {"default": 4}, x_shape=(2, 3), seed=5),
    LayerSpec("16x16-two-r-fifo", 16, 16, {"big": 4, "small": 2}, active=("small", "big"), fan_in_fan_out=True, seed=5),
    LayerSpec("20x12", 20, 12, {"a": 3, "b": 3}, active=("b",), alphas={"b": 1.5}, x_shape=(2, 3), seed=5),
]


def matches_reference(driver: BnbDriver, case: GoldenCase) -> None:
    assert_driver_matches(driver, case, ReferenceDriver().run(case))


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("kind", ["forward", "backward", "merge"])
@pytest.mark.parametrize("spec", LAYERS, ids=lambda s: s.name)
def test_layer_cases_match_reference(quant: str, kind: str, spec: LayerSpec) -> None:
    matches_reference(BnbDriver(quant), layer_case(spec, kind, "float64" if kind == "forward" else "float32"))


@pytest.mark.parametrize("quant", QUANTS)
def test_checkpoint_case_matches_reference(tmp_path: Path, quant: str) -> None:
    config = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q_proj", "o_proj", "c_fc"], bias="randlora_only")
    matches_reference(BnbDriver(quant), checkpoint_case(tmp_path, "c", config, trained_biases=True))


def test_bases_case_is_core_generator() -> None:
    params = {"seed": 3, "basis_kind": "sparse", "bases_shape": {"r": 3, "m_max": 11, "M_max": 17, "nb_max": 4}}
    case = GoldenCase(id="b", kind="bases", dtype="float32", params=params, inputs={}, expected={}, exact=True)
    matches_reference(BnbDriver("int8"), case)


def test_driver_names_tolerances_and_entry_points() -> None:
    drivers = discover_drivers({"bnb-int8", "bnb-nf4", "bnb-fp4"})
    assert [(type(d), d.name) for d in drivers] == [
        (BnbFp4Driver, "bnb-fp4"),
        (BnbInt8Driver, "bnb-int8"),
        (BnbNf4Driver, "bnb-nf4"),
    ]
    assert all(isinstance(d, Driver) for d in drivers)
    merge = layer_case(LAYERS[0], "merge", "float64")
    assert BnbDriver("fp4").tolerance_dtype(merge, "merged_weight") == "fp4"
    assert BnbDriver("fp4").tolerance_dtype(merge, "default.delta_weight") == "float32"
    forward = layer_case(LAYERS[0], "forward", "float32")
    assert BnbDriver("int8").tolerance_dtype(forward, "y") == "float32"
    half = GoldenCase(id="h", kind="forward", dtype="bfloat16", params={}, inputs={}, expected={})
    assert isinstance(BnbDriver("nf4").run(half), Unsupported)
    with pytest.raises(ValueError, match="quant_type"):
        BnbDriver("int4")
