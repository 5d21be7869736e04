"""The bnb-int8 / bnb-nf4 / bnb-fp4 drivers on cases built here with the spec reference (golden suite: conformance/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from randlora_bnb.driver import BnbDriver, BnbFp4Driver, BnbInt8Driver, BnbNf4Driver
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape, bases_shape_for_layers, generate_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.driver import Driver, ReferenceDriver, Unsupported, discover_drivers
from randlora_spec.golden import GoldenCase
from randlora_spec.tolerances import check_close

QUANTS = ("int8", "nf4", "fp4")
CASES = [
    (12, 20, False, {"default": {"r": 4, "alpha": 8.0}}, ["default"]),
    (16, 16, True, {"big": {"r": 4, "alpha": 8.0}, "small": {"r": 2, "alpha": 4.0}}, ["small", "big"]),
    (20, 12, False, {"a": {"r": 3, "alpha": 6.0}, "b": {"r": 3, "alpha": 1.5}}, ["b"]),
]


def layer_case(kind: str, dtype: str, in_f: int, out_f: int, fifo: bool, adapters: dict, active: list[str]) -> GoldenCase:
    rng = np.random.default_rng(in_f * 100 + out_f)
    npdt = np.float64 if dtype == "float64" else np.float32
    m = min(in_f, out_f)
    shape = bases_shape_for_layers([(in_f, out_f)], max(a["r"] for a in adapters.values()))
    shape = BasesShape(shape.r, shape.m_max, shape.M_max, max(-(-m // a["r"]) for a in adapters.values()))
    a, b = generate_bases(5, shape)
    inputs = {
        "randlora_A": a,
        "randlora_B": b,
        "weight": rng.standard_normal((in_f, out_f) if fifo else (out_f, in_f)).astype(npdt),
        "bias": rng.standard_normal(out_f).astype(npdt),
        "x": rng.standard_normal((2, 3, in_f)).astype(npdt),
        "grad_y": rng.standard_normal((2, 3, out_f)).astype(npdt),
    }
    for name, spec in adapters.items():
        nb = -(-m // spec["r"])
        inputs[f"{name}.lambda"] = rng.standard_normal((spec["r"], nb)).astype(npdt) * 0.3
        inputs[f"{name}.gamma"] = rng.standard_normal((nb, m)).astype(npdt) * 0.3
    params = {
        "in_features": in_f,
        "out_features": out_f,
        "fan_in_fan_out": fifo,
        "has_bias": True,
        "adapters": adapters,
        "active": active,
        "seed": 5,
        "basis_kind": "dense",
    }
    return GoldenCase(id=f"{kind}-{in_f}x{out_f}", kind=kind, dtype=dtype, params=params, inputs=inputs, expected={})


def compare(driver: BnbDriver, case: GoldenCase) -> None:
    ours, ref = driver.run(case), ReferenceDriver().run(case)
    assert not isinstance(ours, Unsupported)
    for key, expected in ref.items():
        assert ours[key].shape == expected.shape, key
        ok, err, bound = check_close(ours[key], expected, driver.tolerance_dtype(case, key))
        assert ok, (key, err, bound)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("kind", ["forward", "backward", "merge"])
@pytest.mark.parametrize("spec", CASES, ids=[f"{c[0]}x{c[1]}" for c in CASES])
def test_layer_cases_match_reference(quant: str, kind: str, spec: tuple) -> None:
    compare(BnbDriver(quant), layer_case(kind, "float64" if kind == "forward" else "float32", *spec))


@pytest.mark.parametrize("quant", QUANTS)
def test_checkpoint_case_matches_reference(tmp_path: Path, quant: str) -> None:
    rng = np.random.default_rng(0)
    layers = {
        "enc.q": spec_ckpt.LayerRecord(12, 20),
        "enc.o": spec_ckpt.LayerRecord(20, 12),
        "c_fc": spec_ckpt.LayerRecord(16, 16, True),
    }
    config = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q", "o", "c_fc"], bias="randlora_only")
    shape = bases_shape_for_layers([(r.in_features, r.out_features) for r in layers.values()], 4)
    tensors, inputs = {}, {}
    for path, rec in layers.items():
        nb = -(-rec.m // 4)
        tensors[path + ".randlora_lambda"] = rng.standard_normal((4, nb)).astype(np.float32)
        tensors[path + ".randlora_gamma"] = rng.standard_normal((nb, rec.m)).astype(np.float32)
        tensors[path + ".bias"] = rng.standard_normal(rec.out_features).astype(np.float32)
        w_shape = (rec.in_features, rec.out_features) if rec.fan_in_fan_out else (rec.out_features, rec.in_features)
        inputs[path + ".weight"] = rng.standard_normal(w_shape).astype(np.float32)
        inputs[path + ".x"] = rng.standard_normal((3, rec.in_features)).astype(np.float32)
    ckpt = spec_ckpt.AdapterCheckpoint(
        config=config,
        adapter_name="default",
        layers=layers,
        bases_shape=shape,
        tensors=tensors,
        bases=generate_bases(0, shape),
        biases=sorted(layers),
    )
    path = tmp_path / "c.safetensors"
    spec_ckpt.save(path, ckpt)
    files = {"checkpoint": path}
    case = GoldenCase(id="c", kind="checkpoint", dtype="float32", params={}, inputs=inputs, expected={}, files=files)
    compare(BnbDriver(quant), case)


def test_bases_case_is_core_generator() -> None:
    params = {"seed": 3, "basis_kind": "sparse", "bases_shape": {"r": 3, "m_max": 11, "M_max": 17, "nb_max": 4}}
    case = GoldenCase(id="b", kind="bases", dtype="float32", params=params, inputs={}, expected={}, exact=True)
    ours, ref = BnbDriver("int8").run(case), ReferenceDriver().run(case)
    for key in ("randlora_A", "randlora_B"):
        assert ours[key].dtype == np.float32 and np.array_equal(ours[key].view(np.uint32), ref[key].view(np.uint32))


def test_driver_names_tolerances_and_entry_points() -> None:
    drivers = discover_drivers({"bnb-int8", "bnb-nf4", "bnb-fp4"})
    assert [(type(d), d.name) for d in drivers] == [
        (BnbFp4Driver, "bnb-fp4"),
        (BnbInt8Driver, "bnb-int8"),
        (BnbNf4Driver, "bnb-nf4"),
    ]
    assert all(isinstance(d, Driver) for d in drivers)
    merge = layer_case("merge", "float64", *CASES[0])
    assert BnbDriver("fp4").tolerance_dtype(merge, "merged_weight") == "fp4"
    assert BnbDriver("fp4").tolerance_dtype(merge, "default.delta_weight") == "float32"
    forward = layer_case("forward", "float32", *CASES[0])
    assert BnbDriver("int8").tolerance_dtype(forward, "y") == "float32"
    half = GoldenCase(id="h", kind="forward", dtype="bfloat16", params={}, inputs={}, expected={})
    assert isinstance(BnbDriver("nf4").run(half), Unsupported)
    with pytest.raises(ValueError, match="quant_type"):
        BnbDriver("int4")
