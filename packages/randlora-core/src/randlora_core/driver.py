"""Conformance drivers for randlora-core (``randlora.conformance`` entry points ``core``, ``core-factored``, ``core-dense``).

``core`` runs the default (``compute="auto"``: the cost model picks the path per call); the other two
force one compute path for every case (:func:`~randlora_core.compute.compute_override`), so both
paths are proven against every golden vector whatever the cost model would pick for these shapes.

Every case goes through the public API on a real torch model in the case's dtype: layer cases build
a module holding one ``nn.Linear`` (or a Conv1D-like layer when ``fan_in_fan_out``, or the
convolution or embedding of the case's ``layer_kind``; DoRA adapters get their magnitudes), adapt it with
:func:`~randlora_core.get_randlora_model` / ``add_adapter``, inject the case's bases and
lambda/gamma, then run forward, backward or merge/unmerge; checkpoint cases build the recorded
layers and call :func:`~randlora_core.load_adapter`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from randlora_core.bases import generate_bases
from randlora_core.checkpoint import load_adapter
from randlora_core.compute import Compute, compute_override
from randlora_core.model import RandLoraModel, get_randlora_model
from randlora_core.state import FEATURES
from randlora_core.testing import Conv1DLike, SingleLayer, build_model, make_kind_layer, make_layer, tree_of
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape
from randlora_spec.config import RandLoraConfig
from randlora_spec.driver import Unsupported, variant
from randlora_spec.golden import GoldenCase
from randlora_spec.layer_kinds import BASE_FEATURES

DTYPES = {"float64": torch.float64, "float32": torch.float32}

__all__ = [
    "Conv1DLike",
    "CoreDenseDriver",
    "CoreDriver",
    "CoreFactoredDriver",
    "SingleLayer",
    "build_model",
    "layer_case_model",
    "make_layer",
]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _grad(t: torch.Tensor) -> np.ndarray:
    assert t.grad is not None, "backward left no gradient"
    return _np(t.grad)


def layer_case_model(layer: nn.Module, case: GoldenCase, fan_in_fan_out: bool) -> RandLoraModel:
    """``SingleLayer(layer)`` adapted with the adapters of a layer case, holding the case's bases, lambda and gamma.

    Every adapter of ``case.params["adapters"]`` is added through the public API (the first by
    :func:`get_randlora_model`, the others by ``add_adapter``), the case's bases are injected with
    ``set_shared_bases``, and ``case.params["active"]`` are made active. ``layer`` holds the case's
    weight already; ``fan_in_fan_out`` is the configs' value for it.
    """
    p, i = case.params, case.inputs
    model: RandLoraModel | None = None
    for name, spec in p["adapters"].items():
        config = RandLoraConfig(
            r=spec["r"],
            randlora_alpha=float(spec["alpha"]),
            target_modules=["layer"],
            fan_in_fan_out=fan_in_fan_out,
            projection_prng_key=p.get("seed", 0),
            sparse=p.get("basis_kind") == "sparse",
            very_sparse=p.get("basis_kind") == "very_sparse",
            use_dora=bool(spec.get("use_dora", False)),
        )
        if model is None:
            model = get_randlora_model(SingleLayer(layer), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    assert model is not None, f"layer case {case.id} has no adapter"
    model.set_shared_bases(_t(i["randlora_A"]), _t(i["randlora_B"]))
    wrapper = dict(model.named_randlora_layers())["layer"]
    with torch.no_grad():  # copy_ casts to the parameters' dtype
        for name in p["adapters"]:
            wrapper.randlora_lambda[name].copy_(_t(i[f"{name}.lambda"]))
            wrapper.randlora_gamma[name].copy_(_t(i[f"{name}.gamma"]))
            if f"{name}.magnitude" in i:
                wrapper.randlora_magnitude[name].copy_(_t(i[f"{name}.magnitude"]))
    model.set_adapter(list(p["active"]))
    return model


class CoreDriver:
    """Runs golden cases through randlora-core's public API (torch, CPU)."""

    name = "core"

    def tolerance_dtype(self, case: GoldenCase, output: str) -> str:
        """The case's own dtype: core computes in float64/float32 as asked."""
        return case.dtype

    compute: Compute | None = None
    """The compute path forced for every call (``None``: the configs' default, ``auto``)."""

    def run(self, case: GoldenCase) -> dict[str, np.ndarray] | Unsupported:
        """Outputs for every expected key of ``case``."""
        with compute_override(self.compute):
            return self._run(case)

    def _run(self, case: GoldenCase) -> dict[str, np.ndarray] | Unsupported:
        if case.dtype not in DTYPES:
            return Unsupported(f"dtype {case.dtype} is not a case dtype core runs")
        if case.kind == "bases":
            p = case.params
            a, b = generate_bases(p["seed"], BasesShape(**p["bases_shape"]), p["basis_kind"])
            return {"randlora_A": _np(a), "randlora_B": _np(b)}
        if case.kind == "checkpoint":
            return self._checkpoint(case)
        if case.kind in ("forward", "backward", "merge"):
            return self._layer_case(case)
        return Unsupported(f"unknown case kind {case.kind!r}")

    def _layer_model(self, case: GoldenCase) -> RandLoraModel:
        p, i = case.params, case.inputs
        layer = make_kind_layer(p, DTYPES[case.dtype])
        with torch.no_grad():
            layer.get_parameter("weight").copy_(_t(i["weight"]))
            if p["has_bias"]:
                layer.get_parameter("bias").copy_(_t(i["bias"]))
        return layer_case_model(layer, case, p["fan_in_fan_out"])

    def _layer_case(self, case: GoldenCase) -> dict[str, np.ndarray]:
        p, i = case.params, case.inputs
        model = self._layer_model(case)
        wrapper = dict(model.named_randlora_layers())["layer"]
        if case.kind == "forward":
            with torch.no_grad():
                return {"y": _np(model(_t(i["x"])))}
        if case.kind == "backward":
            x = _t(i["x"]).requires_grad_(x_grad := bool(i["x"].dtype.kind == "f"))
            model(x).backward(_t(i["grad_y"]))
            out = {"grad_x": _grad(x)} if x_grad else {}
            for name in p["active"]:
                out[f"{name}.grad_lambda"] = _grad(wrapper.randlora_lambda[name])
                out[f"{name}.grad_gamma"] = _grad(wrapper.randlora_gamma[name])
                if name in wrapper.randlora_magnitude:
                    out[f"{name}.grad_magnitude"] = _grad(wrapper.randlora_magnitude[name])
            return out
        weight = wrapper.get_base_layer().get_parameter("weight")
        out = {f"{name}.delta_weight": _np(wrapper.get_delta_weight(name)) for name in p["adapters"]}
        model.merge_adapter(list(p["active"]))
        out["merged_weight"] = _np(weight).copy()
        model.unmerge_adapter()
        out["unmerged_weight"] = _np(weight).copy()
        return out

    def _checkpoint(self, case: GoldenCase) -> dict[str, np.ndarray]:
        path = case.files["checkpoint"]
        # Only to learn which layers carry a bias; load_adapter validates again.
        ckpt = spec_ckpt.load(path, supported_features=FEATURES)
        dtype = DTYPES[case.dtype]
        layers = {
            p: (rec.in_features, rec.out_features, p in ckpt.biases or f"{p}.bias" in case.inputs, rec.fan_in_fan_out)
            for p, rec in ckpt.layers.items()
        }
        if case.features == BASE_FEATURES:
            base = build_model(layers, dtype)
        else:
            base = tree_of({p: make_kind_layer(checkpoint_layer_params(case, p, rec), dtype) for p, rec in ckpt.layers.items()})
        with torch.no_grad():
            for p in layers:
                base.get_parameter(f"{p}.weight").copy_(_t(case.inputs[f"{p}.weight"]))
                if f"{p}.bias" in case.inputs:
                    base.get_parameter(f"{p}.bias").copy_(_t(case.inputs[f"{p}.bias"]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_adapter(base, path, adapter_name=ckpt.adapter_name)
        out = {}
        with torch.no_grad():
            for p in layers:
                out[f"{p}.y"] = _np(model.model.get_submodule(p)(_t(case.inputs[f"{p}.x"])))
        return out


def checkpoint_layer_params(case: GoldenCase, path: str, rec: spec_ckpt.LayerRecord) -> dict[str, object]:
    """What :func:`~randlora_core.testing.make_kind_layer` needs for layer ``path`` of a checkpoint case."""
    params = {
        "in_features": rec.in_features,
        "out_features": rec.out_features,
        "fan_in_fan_out": rec.fan_in_fan_out,
        "has_bias": f"{path}.bias" in case.inputs,
        "layer_kind": rec.kind,
        "kernel_size": list(rec.kernel_size),
        "groups": rec.groups,
    }
    return {**params, **case.params.get("base_layers", {}).get(path, {})}


CoreFactoredDriver = variant(
    CoreDriver, "core-factored", "randlora-core with every layer call on the factored path.", compute="factored"
)
CoreDenseDriver = variant(
    CoreDriver,
    "core-dense",
    "randlora-core with every layer call on the dense path (delta_W folded into the base matmul).",
    compute="dense",
)
CoreSparseDriver = variant(
    CoreDriver, "core-sparse", "randlora-core with ternary bases on the sparse kernels (dense bases: factored).", compute="sparse"
)
