"""Conformance drivers ``peft``, ``peft-dense``, ``peft-factored`` and ``peft-native``: golden cases through real PEFT models.

``peft`` runs PEFT's RandLoRA layers accelerated by randlora-core (``peft-dense`` and
``peft-factored`` force one compute path); ``peft-native`` runs the same models on PEFT's own
code, unaccelerated, to show where PEFT itself stands against the spec. All share what follows.

* Layer cases (forward, backward, merge): a tiny module holding one ``nn.Linear`` (or, with
  ``fan_in_fan_out``, a transformers ``Conv1D``) is wrapped by ``peft.get_peft_model`` with one
  PEFT ``RandLoraConfig`` per adapter, accelerated with :func:`randlora_peft.accelerate` (not for
  ``peft-native``), and given the case's weight, bias, lambda and gamma. PEFT reads each
  adapter's bases from its own entry of the shared buffer dicts and does not slice the rank, so
  adapter ``name`` gets ``A[:r]`` and ``B[..., :r]`` of the case's allocation (which may be larger
  than the layer needs; PEFT slices the other axes itself). Outputs come from PEFT's API: the
  model's forward, autograd, and the layer's ``merge`` / ``unmerge`` / ``get_delta_weight``.
* Checkpoint cases: the checkpoint file (format v1) is converted to a PEFT adapter directory by
  :func:`randlora_peft.convert.write_peft_adapter`, loaded with ``peft.PeftModel.from_pretrained``
  over a model holding the recorded layers, accelerated (not for ``peft-native``), and run. This
  exercises our file format -> PEFT's loader -> core's kernels (or PEFT's) end to end.
* Cases of other layer kinds (convolutions, embeddings) or with DoRA adapters (SPEC 3.10, 3.11):
  :class:`~randlora_spec.driver.Unsupported`. PEFT 0.21's RandLoRA adapts only ``nn.Linear`` and
  transformers' ``Conv1D`` and has no DoRA variant (DoRA exists in PEFT for LoRA only).
* Bases cases: :class:`~randlora_spec.driver.Unsupported`. PEFT draws bases with its own
  machine-dependent rule (``peft-torch-v1``), not the portable Philox rule; generating the portable
  rule is randlora-core's job and its driver already runs these cases, so routing them there would
  test nothing of this package.
* ``peft-native`` also skips layer cases whose adapters need different numbers of bases
  (``nb = ceil(m / r)``) on one layer: PEFT keeps a single ``num_bases`` per layer, set by the
  adapter added last, and slices every adapter's bases with it, so its forward and merge fail with
  a shape error on such a layer (randlora-core's kernels, used by the accelerated drivers, read
  each adapter's own ``nb``).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from randlora_core.testing import SingleLayer, tree_of
from randlora_peft._peft import import_peft, peft_randlora_linear
from randlora_peft.accelerate import accelerate
from randlora_peft.convert import write_peft_adapter
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.driver import Unsupported, unsupported_features, variant
from randlora_spec.geometry import LayerGeometry
from randlora_spec.golden import GoldenCase
from randlora_spec.layer_kinds import BASE_FEATURES

if TYPE_CHECKING:
    from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear

_ONLY_LINEAR = "PEFT 0.21's RandLoRA adapts only nn.Linear and transformers' Conv1D and has no DoRA variant"
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _make_layer(in_features: int, out_features: int, has_bias: bool, fan_in_fan_out: bool, dtype: torch.dtype) -> nn.Module:
    """``nn.Linear``, or a transformers ``Conv1D`` (weight stored (in, out)) when ``fan_in_fan_out``.

    Conv1D always adds a bias; without one it gets a zero bias, which changes no value.
    """
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        layer: nn.Module = Conv1D(out_features, in_features)
        if not has_bias:
            nn.init.zeros_(layer.get_parameter("bias"))
    else:
        layer = nn.Linear(in_features, out_features, bias=has_bias)
    return layer.to(dtype)


def _t(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    values: np.ndarray = (t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().copy()
    return values


class PeftDriver:
    """Runs golden cases through PEFT's RandLoRA with randlora-core's kernels (see the module docstring).

    ``compute`` is passed to :func:`~randlora_peft.accelerate`: ``auto`` here, ``dense`` and
    ``factored`` in the ``peft-dense`` / ``peft-factored`` drivers, so both evaluation paths of
    the accelerated layers meet the golden values whatever the cost model picks; ``None`` (the
    ``peft-native`` driver) leaves PEFT's layers as PEFT made them.
    """

    name = "peft"
    compute: str | None = "auto"

    def tolerance_dtype(self, case: GoldenCase, output: str) -> str:
        """The case's own dtype: PEFT computes in it (float32 and float64 alike)."""
        return case.dtype

    def run(self, case: GoldenCase) -> dict[str, np.ndarray] | Unsupported:
        """Outputs for every expected key of ``case``, or :class:`Unsupported` for bases cases."""
        if case.kind == "bases":
            return Unsupported(
                "PEFT's bases follow its machine-dependent rule (peft-torch-v1), not the portable rule; "
                "randlora-core's driver covers portable generation"
            )
        if case.dtype not in _DTYPES:
            return Unsupported(f"dtype {case.dtype} is not run through PEFT")
        skip = unsupported_features(case, BASE_FEATURES, _ONLY_LINEAR)
        if skip is not None:
            return skip
        reason = self._inexpressible(case)
        if reason is not None:
            return Unsupported(reason)
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # PEFT's advisory warnings (fan_in_fan_out fix-ups, missing keys)
            if case.kind == "checkpoint":
                return self._checkpoint(case)
            if case.kind in ("forward", "backward", "merge"):
                return self._layer_case(case)
        return Unsupported(f"unknown case kind {case.kind!r}")

    def _inexpressible(self, case: GoldenCase) -> str | None:
        """Why the models this driver runs cannot express ``case`` (``None``: they can)."""
        return None

    def _accelerate(self, model: nn.Module) -> None:
        if self.compute is not None:
            accelerate(model, compute=self.compute)

    # -- layer cases ----------------------------------------------------------------------------

    def _layer_model(self, case: GoldenCase) -> tuple[nn.Module, PeftRandLoraLinear]:
        """``(peft_model, peft_layer)`` for a layer case, accelerated, with the case's tensors injected."""
        peft = import_peft()
        p, i = case.params, case.inputs
        dtype = _DTYPES[case.dtype]
        fan = bool(p["fan_in_fan_out"])
        layer = _make_layer(p["in_features"], p["out_features"], p["has_bias"], fan, dtype)
        with torch.no_grad():
            layer.get_parameter("weight").copy_(_t(i["weight"], dtype))
            if p["has_bias"]:
                layer.get_parameter("bias").copy_(_t(i["bias"], dtype))
        specs = p["adapters"]
        # PEFT sizes the shared bases by the first adapter and refuses a later one of larger rank.
        order = sorted(specs, key=lambda n: -int(specs[n]["r"]))
        model = None
        for name in order:
            cfg = peft.RandLoraConfig(
                r=int(specs[name]["r"]),
                randlora_alpha=float(specs[name]["alpha"]),
                target_modules=["layer"],
                fan_in_fan_out=fan,
                randlora_dropout=0.0,
            )
            if model is None:
                model = peft.get_peft_model(SingleLayer(layer), cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
        assert model is not None
        peft_layer = model.get_base_model().get_submodule("layer")
        assert isinstance(peft_layer, peft_randlora_linear())
        a_all, b_all = _t(i["randlora_A"], dtype), _t(i["randlora_B"], dtype)
        bases_a, bases_b = peft_layer.randlora_A, peft_layer.randlora_B
        assert bases_a is not None and bases_b is not None, "PEFT sets the bases when it adds an adapter"
        with torch.no_grad():
            for name, spec in specs.items():
                r = int(spec["r"])
                bases_a[name] = a_all[:r].clone()
                bases_b[name] = b_all[:, :, :r].contiguous()
                peft_layer.randlora_lambda[name].copy_(_t(i[f"{name}.lambda"], dtype))
                peft_layer.randlora_gamma[name].copy_(_t(i[f"{name}.gamma"], dtype))
        model.base_model.set_adapter(list(p["active"]))
        self._accelerate(model)
        return model, peft_layer

    def _layer_case(self, case: GoldenCase) -> dict[str, np.ndarray]:
        model, layer = self._layer_model(case)
        dtype = _DTYPES[case.dtype]
        i, p = case.inputs, case.params
        if case.kind == "forward":
            with torch.no_grad():
                return {"y": _np(model(_t(i["x"], dtype)))}
        if case.kind == "backward":
            x = _t(i["x"], dtype).requires_grad_(True)
            model(x).backward(_t(i["grad_y"], dtype))
            assert x.grad is not None
            out = {"grad_x": _np(x.grad)}
            for name in p["active"]:
                lam, gamma = layer.randlora_lambda[name], layer.randlora_gamma[name]
                out[f"{name}.grad_lambda"] = _np(lam.grad if lam.grad is not None else torch.zeros_like(lam))
                out[f"{name}.grad_gamma"] = _np(gamma.grad if gamma.grad is not None else torch.zeros_like(gamma))
            return out
        with torch.no_grad():
            out = {f"{name}.delta_weight": _np(layer.get_delta_weight(name)) for name in p["adapters"]}
            layer.merge(adapter_names=list(p["active"]))
            out["merged_weight"] = _np(layer.get_base_layer().get_parameter("weight"))
            layer.unmerge()
            out["unmerged_weight"] = _np(layer.get_base_layer().get_parameter("weight"))
        return out

    # -- checkpoint cases -----------------------------------------------------------------------

    def _checkpoint(self, case: GoldenCase) -> dict[str, np.ndarray]:
        peft = import_peft()
        ckpt = spec_ckpt.load(case.files["checkpoint"])
        dtype = _DTYPES[case.dtype]
        layers: dict[str, nn.Module] = {}
        for path, rec in sorted(ckpt.layers.items()):
            bias = case.inputs.get(f"{path}.bias")
            layer = _make_layer(
                rec.in_features, rec.out_features, bias is not None or path in ckpt.biases, rec.fan_in_fan_out, dtype
            )
            with torch.no_grad():
                layer.get_parameter("weight").copy_(_t(case.inputs[f"{path}.weight"], dtype))
                if bias is not None:
                    layer.get_parameter("bias").copy_(_t(bias, dtype))
            layers[path] = layer
        root = tree_of(layers)
        with tempfile.TemporaryDirectory(prefix="randlora-peft-driver-") as tmp:
            write_peft_adapter(ckpt, Path(tmp) / "adapter")
            model = peft.PeftModel.from_pretrained(root, str(Path(tmp) / "adapter"))
        self._accelerate(model)
        base = model.get_base_model()
        out = {}
        with torch.no_grad():
            for path in ckpt.layers:
                out[f"{path}.y"] = _np(base.get_submodule(path)(_t(case.inputs[f"{path}.x"], dtype)))
        return out


PeftDenseDriver = variant(
    PeftDriver, "peft-dense", ":class:`PeftDriver` with the accelerated layers on the dense path.", compute="dense"
)
PeftFactoredDriver = variant(
    PeftDriver, "peft-factored", ":class:`PeftDriver` with the accelerated layers on the factored path.", compute="factored"
)


class PeftNativeDriver(PeftDriver):
    """PEFT's own RandLoRA layers, not accelerated, on every golden case PEFT can express (see the module docstring)."""

    name = "peft-native"
    compute = None

    def _inexpressible(self, case: GoldenCase) -> str | None:
        if case.kind not in ("forward", "backward", "merge"):
            return None
        p = case.params
        nbs = {
            name: LayerGeometry(p["in_features"], p["out_features"], int(spec["r"])).nb for name, spec in p["adapters"].items()
        }
        if len(set(nbs.values())) > 1:
            needs = ", ".join(f"{name}: r={p['adapters'][name]['r']}, nb={nb}" for name, nb in sorted(nbs.items()))
            return (
                "PEFT keeps one num_bases per layer (set by the adapter added last) and slices every adapter's bases "
                f"with it, so adapters needing different numbers of bases on one layer ({needs}) fail in PEFT's "
                "forward and merge with a shape error"
            )
        return None
