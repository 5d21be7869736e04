"""CoreDriver on cases built here with the spec reference (the golden suite runs in conformance/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from randlora_core.driver import CoreDriver
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape, bases_shape_for_layers, generate_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.driver import Driver, ReferenceDriver, discover_drivers
from randlora_spec.golden import GoldenCase
from randlora_spec.tolerances import check_close


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
        inputs[f"{name}.lambda"] = rng.standard_normal((spec["r"], nb)).astype(npdt)
        inputs[f"{name}.gamma"] = rng.standard_normal((nb, m)).astype(npdt)
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


CASES = [
    (12, 20, False, {"default": {"r": 4, "alpha": 8.0}}, ["default"]),
    (20, 12, True, {"default": {"r": 4, "alpha": 8.0}}, ["default"]),
    (3, 8, False, {"default": {"r": 5, "alpha": 10.0}}, ["default"]),
    (16, 16, False, {"big": {"r": 4, "alpha": 8.0}, "small": {"r": 2, "alpha": 4.0}}, ["small", "big"]),
    (14, 9, True, {"a": {"r": 3, "alpha": 6.0}, "b": {"r": 3, "alpha": 1.5}}, ["b"]),
]


def compare(case: GoldenCase, ours: dict, ref: dict) -> None:
    assert set(ref) <= set(ours)
    for key, expected in ref.items():
        assert ours[key].shape == expected.shape, key
        ok, err, bound = check_close(ours[key], expected, case.dtype)
        assert ok, (key, err, bound)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", ["forward", "backward", "merge"])
@pytest.mark.parametrize("spec", CASES, ids=[f"{c[0]}x{c[1]}" for c in CASES])
def test_layer_cases_match_reference(kind: str, dtype: str, spec: tuple) -> None:
    case = layer_case(kind, dtype, *spec)
    compare(case, CoreDriver().run(case), ReferenceDriver().run(case))


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_bases_case_bit_exact(kind: str) -> None:
    params = {"seed": 2**63 + 7, "basis_kind": kind, "bases_shape": {"r": 3, "m_max": 11, "M_max": 17, "nb_max": 4}}
    case = GoldenCase(id="b", kind="bases", dtype="float32", params=params, inputs={}, expected={}, exact=True)
    ours, ref = CoreDriver().run(case), ReferenceDriver().run(case)
    for key in ("randlora_A", "randlora_B"):
        assert ours[key].dtype == np.float32
        assert np.array_equal(ours[key].view(np.uint32), ref[key].view(np.uint32))


@pytest.mark.parametrize(("stored", "bias", "bf16"), [(True, False, False), (False, True, False), (False, False, True)])
def test_checkpoint_case_matches_reference(tmp_path: Path, stored: bool, bias: bool, bf16: bool) -> None:
    rng = np.random.default_rng(0)
    layers = {
        "enc.layers.0.q": spec_ckpt.LayerRecord(12, 20),
        "enc.layers.0.o": spec_ckpt.LayerRecord(20, 12),
        "head.c_fc": spec_ckpt.LayerRecord(16, 16, True),
    }
    config = RandLoraConfig(
        r=4,
        randlora_alpha=8.0,
        target_modules=["q", "o", "c_fc"],
        save_projection=stored,
        bias="randlora_only" if bias else "none",
    )
    shape = bases_shape_for_layers([(r.in_features, r.out_features) for r in layers.values()], 4)
    tensors, inputs = {}, {}
    for path, rec in layers.items():
        nb = -(-rec.m // 4)
        tensors[path + ".randlora_lambda"] = rng.standard_normal((4, nb)).astype(np.float32)
        tensors[path + ".randlora_gamma"] = rng.standard_normal((nb, rec.m)).astype(np.float32)
        w_shape = (rec.in_features, rec.out_features) if rec.fan_in_fan_out else (rec.out_features, rec.in_features)
        inputs[path + ".weight"] = rng.standard_normal(w_shape).astype(np.float32)
        inputs[path + ".x"] = rng.standard_normal((3, rec.in_features)).astype(np.float32)
        (tensors if bias else inputs)[path + ".bias"] = rng.standard_normal(rec.out_features).astype(np.float32)
    ckpt = spec_ckpt.AdapterCheckpoint(
        config=config,
        adapter_name="default",
        layers=layers,
        bases_shape=shape,
        tensors=tensors,
        bases=generate_bases(0, shape) if stored else None,
        biases=sorted(layers) if bias else [],
        bf16_keys=frozenset(k for k in tensors if k.endswith("lambda")) if bf16 else frozenset(),
    )
    path = tmp_path / "c.safetensors"
    spec_ckpt.save(path, ckpt)
    case = GoldenCase(
        id="c", kind="checkpoint", dtype="float32", params={}, inputs=inputs, expected={}, files={"checkpoint": path}
    )
    compare(case, CoreDriver().run(case), ReferenceDriver().run(case))


def test_driver_protocol_and_entry_point() -> None:
    driver = CoreDriver()
    assert isinstance(driver, Driver) and driver.name == "core"
    assert [type(d) for d in discover_drivers({"core"})] == [CoreDriver]
    case = layer_case("forward", "float32", *CASES[0])
    assert driver.tolerance_dtype(case, "y") == "float32"
