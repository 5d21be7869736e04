"""The conformance driver interface and the reference driver (SPEC.md section 8).

A driver adapts one implementation to the golden cases: it receives a :class:`GoldenCase` and
returns the outputs the case expects, by name. Packages register drivers under the entry-point
group ``randlora.conformance`` (``name = "module:Factory"``); the conformance suite discovers them,
so adding an implementation adds a driver and no test code.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import numpy as np

from randlora_spec import checkpoint, reference, reference_dora
from randlora_spec.bases import BasesShape, generate_bases
from randlora_spec.geometry import LayerGeometry
from randlora_spec.golden import GoldenCase
from randlora_spec.layer_kinds import ALL_FEATURES, BASE_FEATURES, CONV_KINDS, EMBEDDING, LINEAR, LayerRecord
from randlora_spec.reference_dora import ViewAdapter, stored_of, view_of
from randlora_spec.reference_inputs import ConvGeometry, ConvInput, EmbeddingInput, LinearInput

ENTRY_POINT_GROUP = "randlora.conformance"

_D = TypeVar("_D")


@dataclass(frozen=True)
class Unsupported:
    """Returned by a driver for a case it cannot run, with the reason (reported as a skip)."""

    reason: str


@runtime_checkable
class Driver(Protocol):
    """What the conformance suite calls. ``name`` labels results; ``run`` computes the outputs."""

    name: str

    def run(self, case: GoldenCase) -> dict[str, np.ndarray] | Unsupported:
        """Outputs for every key of ``case.expected``, or :class:`Unsupported`."""
        ...

    def tolerance_dtype(self, case: GoldenCase, output: str) -> str:
        """Which declared tolerance applies to ``output`` (normally ``case.dtype``)."""
        ...


def discover_drivers(names: set[str] | None = None, distributions: set[str] | None = None) -> list[Driver]:
    """Instantiate the registered drivers, sorted by name.

    Args:
        names: keep only drivers with these entry-point names.
        distributions: keep only drivers registered by these distributions (e.g. ``randlora-core``),
            so one package's drivers can be run in a venv that also holds its dependencies'.
    """
    drivers = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else None
        if (names is None or ep.name in names) and (distributions is None or dist in distributions):
            drivers.append(ep.load()())
    return drivers


def variant(base: type[_D], name: str, doc: str, **settings: object) -> type[_D]:
    """A subclass of the driver class ``base`` registered as ``name``, differing only in class attributes.

    One implementation often runs the golden cases several ways (a forced evaluation path, a
    quantization type); each way is a driver of its own, so the summary reports it. The class is
    named after ``name`` (``core-dense`` -> ``CoreDenseDriver``) and lives in ``base``'s module.
    """
    title = "".join(part.capitalize() for part in name.split("-")) + "Driver"
    attrs = {"name": name, "__doc__": doc, "__module__": base.__module__, "__qualname__": title, **settings}
    return cast("type[_D]", type(title, (base,), attrs))


def unsupported_features(case: GoldenCase, supported: frozenset[str], why: str) -> Unsupported | None:
    """:class:`Unsupported` naming the features ``case`` needs beyond ``supported`` (and ``why``), else ``None``."""
    beyond = sorted(case.features - supported)
    return Unsupported(f"the case needs {beyond}: {why}") if beyond else None


class ReferenceDriver:
    """Runs the float64 numpy reference: the first implementation, and the source of the goldens."""

    name = "reference"

    def tolerance_dtype(self, case: GoldenCase, output: str) -> str:
        """The case's own dtype: the reference claims nothing looser."""
        return case.dtype

    def run(self, case: GoldenCase) -> dict[str, np.ndarray] | Unsupported:
        """Compute every expected output of ``case`` with :mod:`randlora_spec.reference`."""
        if case.kind == "bases":
            p = case.params
            a, b = generate_bases(p["seed"], BasesShape(**p["bases_shape"]), p["basis_kind"])
            return {"randlora_A": a, "randlora_B": b}
        if case.kind == "checkpoint":
            return _run_checkpoint(case)
        return run_layer_case(case)


def run_layer_case(case: GoldenCase) -> dict[str, np.ndarray]:
    """Forward, backward or merge outputs of a layer case, by the reference."""
    if case.features != BASE_FEATURES:
        return run_view_case(case)
    p, i = case.params, case.inputs
    adapters = case.adapters()
    args = (adapters, p["active"], i["randlora_A"], i["randlora_B"], p["fan_in_fan_out"])
    if case.kind == "forward":
        return {"y": reference.forward(i["x"], i["weight"], i.get("bias"), *args)}
    if case.kind == "backward":
        grad_x, grads = reference.backward(i["x"], i["grad_y"], i["weight"], *args)
        out = {"grad_x": grad_x}
        for name, (g_lam, g_gamma) in grads.items():
            out[f"{name}.grad_lambda"], out[f"{name}.grad_gamma"] = g_lam, g_gamma
        return out
    if case.kind == "merge":
        merged = reference.merge(i["weight"], *args)
        out = {"merged_weight": merged, "unmerged_weight": reference.unmerge(merged, *args)}
        for name, adapter in adapters.items():
            geom = LayerGeometry(p["in_features"], p["out_features"], adapter.r)
            out[f"{name}.delta_weight"] = reference.delta_weight(
                geom, adapter, i["randlora_A"], i["randlora_B"], p["fan_in_fan_out"]
            )
        return out
    raise ValueError(f"unknown case kind {case.kind!r}")


def conv_geometry(params: dict[str, Any], kind: str) -> ConvGeometry:
    """The convolution a conv layer case or checkpoint ``base_layers`` entry describes (SPEC 8.2)."""
    dims = len(params["kernel_size"])
    if kind not in CONV_KINDS or dims != CONV_KINDS.index(kind) + 1:
        raise ValueError(f"kernel_size {params['kernel_size']} does not fit layer kind {kind!r}")
    return ConvGeometry(
        in_channels=params["in_channels"],
        out_channels=params["out_features"],
        kernel_size=tuple(params["kernel_size"]),
        stride=tuple(params["stride"]),
        padding=tuple(params["padding"]),
        dilation=tuple(params["dilation"]),
        groups=params["groups"],
    )


def input_map(kind: str, x: np.ndarray, params: dict[str, Any]) -> reference_dora.InputMap:
    """The input map of SPEC 3.10 for a layer of ``kind`` described by ``params`` (in_features, conv settings)."""
    if kind in CONV_KINDS:
        return ConvInput(x, conv_geometry(params, kind))
    if kind == EMBEDDING:
        return EmbeddingInput(x, params["in_features"])
    return LinearInput(x)


def run_view_case(case: GoldenCase) -> dict[str, np.ndarray]:
    """A layer case of another kind than linear, or with DoRA adapters (SPEC 3.10, 3.11, 8.2)."""
    p, i = case.params, case.inputs
    kind, fifo = case.layer_kind, p["fan_in_fan_out"]
    w = view_of(i["weight"], kind, fifo)
    adapters = case.view_adapters()
    args = (adapters, p["active"], i["randlora_A"], i["randlora_B"], p.get("padding_idx"))
    if case.kind == "forward":
        return {"y": reference_dora.forward(input_map(kind, i["x"], p), w, i.get("bias"), *args)}
    if case.kind == "backward":
        grad_x, grads = reference_dora.backward(input_map(kind, i["x"], p), i["grad_y"], w, *args)
        out = {} if grad_x is None else {"grad_x": grad_x}
        for name, (g_lam, g_gamma, g_mag) in grads.items():
            out[f"{name}.grad_lambda"], out[f"{name}.grad_gamma"] = g_lam, g_gamma
            if g_mag is not None:
                out[f"{name}.grad_magnitude"] = g_mag
        return out
    merged, factors = reference_dora.merge(w, *args)
    unmerged = reference_dora.unmerge(merged, adapters, p["active"], i["randlora_A"], i["randlora_B"], factors, args[-1])
    shape = np.shape(i["weight"])
    out = {"merged_weight": stored_of(merged, shape, kind, fifo), "unmerged_weight": stored_of(unmerged, shape, kind, fifo)}
    for name, adapter in adapters.items():
        delta = reference_dora.delta_view(w.shape, adapter.adapter, i["randlora_A"], i["randlora_B"], args[-1])
        out[f"{name}.delta_weight"] = stored_of(delta, shape, kind, fifo)
    return out


def _run_checkpoint(case: GoldenCase) -> dict[str, np.ndarray]:
    ckpt = checkpoint.load(case.files["checkpoint"], supported_features=ALL_FEATURES)
    a, b = checkpoint.resolve_bases(ckpt)
    out = {}
    for path, rec in ckpt.layers.items():
        adapter = reference.Adapter(ckpt.config.r, ckpt.config.randlora_alpha, ckpt.lam(path), ckpt.gamma(path))
        bias = ckpt.tensors.get(f"{path}.bias", case.inputs.get(f"{path}.bias"))
        x, weight = case.inputs[f"{path}.x"], case.inputs[f"{path}.weight"]
        if rec.kind == LINEAR and not ckpt.config.use_dora:
            out[f"{path}.y"] = reference.forward(x, weight, bias, {"a": adapter}, ["a"], a, b, rec.fan_in_fan_out)
            continue
        base = {**case.params.get("base_layers", {}).get(path, {}), **_record_params(rec)}
        adapters = {"a": ViewAdapter(adapter, ckpt.magnitude(path))}
        w = view_of(weight, rec.kind, rec.fan_in_fan_out)
        inputs = input_map(rec.kind, x, base)
        out[f"{path}.y"] = reference_dora.forward(inputs, w, bias, adapters, ["a"], a, b, base.get("padding_idx"))
    return out


def _record_params(rec: LayerRecord) -> dict[str, Any]:
    return {
        "in_features": rec.in_features,
        "out_features": rec.out_features,
        "kernel_size": list(rec.kernel_size),
        "groups": rec.groups,
    }
