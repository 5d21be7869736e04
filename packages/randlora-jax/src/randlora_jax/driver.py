"""Conformance drivers (``randlora.conformance`` entry points ``jax``, ``jax-factored``, ``jax-dense``).

``jax`` uses ``compute="auto"`` (the cost model of :mod:`randlora_jax.compute` picks the path per
call); the other two force one path for every case, so both are proven against every golden vector.

Every case goes through the public API: bases cases through :func:`randlora_jax.generate_bases`;
layer cases build an ``nnx.Linear`` in the case's dtype, adapt it with
:func:`~randlora_jax.get_randlora_model` / ``add_adapter``, set the case's bases and lambda/gamma,
then run forward, ``jax.vjp`` or merge/unmerge; checkpoint cases build the recorded layers and
call :func:`~randlora_jax.load_adapter`. float64 cases run with JAX's x64 mode enabled for the
duration of the case only. Cases of other layer kinds (convolutions, embeddings) or with DoRA
adapters (SPEC 3.10, 3.11) are :class:`Unsupported`: randlora-jax adapts linear layers only, and
its checkpoint reader refuses such files.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from randlora_jax.arrays import to_device
from randlora_jax.bases import generate_bases
from randlora_jax.checkpoint import load_adapter
from randlora_jax.model import RandLoraModel, get_randlora_model
from randlora_jax.variables import trainable
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape
from randlora_spec.config import RandLoraConfig
from randlora_spec.driver import Unsupported, unsupported_features, variant
from randlora_spec.golden import GoldenCase
from randlora_spec.layer_kinds import BASE_FEATURES

_ONLY_LINEAR = "randlora-jax adapts nnx.Linear and plain-linear nnx.Einsum layers only, without the DoRA variant"


@contextlib.contextmanager
def x64(enabled: bool) -> Iterator[None]:
    """JAX's 64-bit mode for a block (float64 arrays stay float64), without changing it globally."""
    if not enabled:
        yield
        return
    scoped = getattr(jax, "enable_x64", None)
    if scoped is None:  # jax < 0.5 spelled it jax.experimental.enable_x64
        scoped = importlib.import_module("jax.experimental").enable_x64
    with scoped(True):
        yield


class Holder(nnx.Module):
    """A module with one linear layer named ``layer``, so the layer has a path to target."""

    def __init__(self, layer: nnx.Linear) -> None:
        self.layer = layer

    def __call__(self, x: jax.Array) -> jax.Array:
        """Call the layer."""
        return self.layer(x)


def make_linear(
    in_features: int, out_features: int, weight: np.ndarray, bias: np.ndarray | None, fan_in_fan_out: bool
) -> nnx.Linear:
    """An ``nnx.Linear`` holding ``weight`` given in storage layout (``(O, I)``, or ``(I, O)`` with ``fan_in_fan_out``)."""
    kernel = np.asarray(weight) if fan_in_fan_out else np.asarray(weight).T
    dtype = jnp.dtype(kernel.dtype)
    # Abstract construction: the values are set below, so no initializer has to be compiled and run.
    layer = nnx.eval_shape(
        lambda: nnx.Linear(in_features, out_features, use_bias=bias is not None, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    layer.kernel.set_value(to_device(kernel, dtype))
    if bias is not None and layer.bias is not None:  # the layer has a bias exactly when one is given
        layer.bias.set_value(to_device(bias, dtype))
    return layer


def tree_of_layers(layers: dict[str, nnx.Linear]) -> nnx.Dict[Any]:
    """A module tree (nested ``nnx.Dict``) with each layer at its dotted path."""
    root: nnx.Dict[Any] = nnx.Dict()
    for path, layer in layers.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            if part not in node:
                node[part] = nnx.Dict()
            node = node[part]
        node[leaf] = layer
    return root


class JaxDriver:
    """Runs golden cases through randlora-jax with ``compute="auto"``."""

    name = "jax"
    compute = "auto"

    def tolerance_dtype(self, case: GoldenCase, output: str) -> str:
        """The case's own dtype: float32 cases run in float32, float64 cases in float64."""
        return case.dtype

    def run(self, case: GoldenCase) -> dict[str, np.ndarray] | Unsupported:
        """Every expected output of ``case``."""
        skip = unsupported_features(case, BASE_FEATURES, _ONLY_LINEAR)
        if skip is not None:
            return skip
        with x64(case.dtype == "float64"):
            if case.kind == "bases":
                p = case.params
                a, b = generate_bases(p["seed"], BasesShape(**p["bases_shape"]), p["basis_kind"])
                return {"randlora_A": np.asarray(a), "randlora_B": np.asarray(b)}
            if case.kind == "checkpoint":
                return self._checkpoint(case)
            return self._layer(case)

    def _model(self, case: GoldenCase) -> RandLoraModel:
        p, i = case.params, case.inputs
        layer = make_linear(p["in_features"], p["out_features"], i["weight"], i.get("bias"), p["fan_in_fan_out"])
        adapters = list(p["adapters"].items())

        def config(spec: dict[str, Any]) -> RandLoraConfig:
            return RandLoraConfig(r=spec["r"], randlora_alpha=spec["alpha"], target_modules=["layer"], compute=self.compute)

        model = get_randlora_model(Holder(layer), config(adapters[0][1]), adapter_name=adapters[0][0])
        for name, spec in adapters[1:]:
            model.add_adapter(name, config(spec))
        # The case's bases: an allocation at least as large as every window (SPEC 8.2).
        model.randlora_bases.randlora_A.set_value(to_device(i["randlora_A"]))
        model.randlora_bases.randlora_B.set_value(to_device(i["randlora_B"]))
        wrapped = model.randlora_layers()["layer"]
        for name, _ in adapters:
            wrapped.set_parameters(name, i[f"{name}.lambda"], i[f"{name}.gamma"])
        model.set_adapter(p["active"])
        return model

    def _layer(self, case: GoldenCase) -> dict[str, np.ndarray]:
        p, i = case.params, case.inputs
        model = self._model(case)
        if case.kind == "forward":
            return {"y": np.asarray(nnx.jit(lambda m, x: m(x))(model, to_device(i["x"])))}
        if case.kind == "backward":
            return self._backward(model, case)
        storage = (lambda k: np.asarray(k)) if p["fan_in_fan_out"] else (lambda k: np.asarray(k).T)
        layer = model.randlora_layers()["layer"]
        out = {f"{n}.delta_weight": np.asarray(storage(layer.get_delta_weight(n))) for n in p["adapters"]}
        model.merge_adapter(p["active"])
        out["merged_weight"] = np.asarray(storage(layer.base_layer.kernel.get_value()))
        model.unmerge_adapter()
        out["unmerged_weight"] = np.asarray(storage(layer.base_layer.kernel.get_value()))
        return out

    def _backward(self, model: RandLoraModel, case: GoldenCase) -> dict[str, np.ndarray]:
        graphdef, params, *rest = nnx.split(model, trainable, ...)  # rest: the one other state

        def forward(x: jax.Array, params: nnx.State[Any, Any]) -> jax.Array:
            y: jax.Array = nnx.merge(graphdef, params, *rest)(x)
            return y

        @jax.jit
        def pullback(x: jax.Array, params: nnx.State[Any, Any], grad_y: jax.Array) -> tuple[jax.Array, nnx.State[Any, Any]]:
            grads: tuple[jax.Array, nnx.State[Any, Any]] = jax.vjp(forward, x, params)[1](grad_y)
            return grads

        grad_x, grads = pullback(to_device(case.inputs["x"]), params, to_device(case.inputs["grad_y"]))
        layer_grads = grads["model"]["layer"]
        out = {"grad_x": np.asarray(grad_x)}
        for name in case.params["active"]:
            out[f"{name}.grad_lambda"] = np.asarray(layer_grads["randlora_lambda"][name].get_value())
            out[f"{name}.grad_gamma"] = np.asarray(layer_grads["randlora_gamma"][name].get_value())
        return out

    def _checkpoint(self, case: GoldenCase) -> dict[str, np.ndarray]:
        ckpt = spec_ckpt.load(case.files["checkpoint"])
        dtype = np.dtype(case.dtype)
        layers = {}
        for path, rec in ckpt.layers.items():
            has_bias = path in ckpt.biases or f"{path}.bias" in case.inputs
            bias = case.inputs.get(f"{path}.bias", np.zeros(rec.out_features))
            weight = case.inputs[f"{path}.weight"].astype(dtype)
            layers[path] = make_linear(
                rec.in_features, rec.out_features, weight, bias.astype(dtype) if has_bias else None, rec.fan_in_fan_out
            )
        model = load_adapter(tree_of_layers(layers), case.files["checkpoint"])
        wrapped = model.randlora_layers()
        call = nnx.jit(lambda layer, x: layer(x))
        return {f"{path}.y": np.asarray(call(wrapped[path], to_device(case.inputs[f"{path}.x"]))) for path in ckpt.layers}


JaxFactoredDriver = variant(
    JaxDriver, "jax-factored", "Every layer call on the factored path (two thin products per adapter).", compute="factored"
)
JaxDenseDriver = variant(
    JaxDriver,
    "jax-dense",
    "Every layer call on the dense path (``delta_W`` folded into the base matmul, rebuilt in backward).",
    compute="dense",
)
