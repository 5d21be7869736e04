"""Where the base-layer shapes of a PEFT adapter come from.

PEFT's files record neither which side of a layer is the input nor the larger side (lambda and
gamma only reveal ``m = min(in, out)``), so reading a PEFT adapter needs the base-layer shapes from
one of four sources, in this order of preference:

1. a model (``model=``): the sizes and weight layout of its layers;
2. an explicit mapping (``layer_shapes=``, the CLI's ``--layer-shapes`` file);
3. the sidecar ``randlora_layers.json`` that our writer leaves next to PEFT's files;
4. for square layers only, the shapes of the bases themselves.

Whatever the source, the shapes must then fit the file's lambda and gamma (:func:`check_trainable_shapes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from randlora_peft._peft import import_peft
from randlora_peft.layout import PeftTensors
from randlora_peft.limits import flag_value, size_value
from randlora_spec.bases import num_bases
from randlora_spec.checkpoint import LayerRecord
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError

_RECORD_FIELDS = {"in_features", "out_features", "fan_in_fan_out"}

LayerShape = tuple[int, int] | tuple[int, int, bool] | LayerRecord
"""A layer's ``(in_features, out_features)``, optionally with ``fan_in_fan_out``, or a LayerRecord."""


def as_record(path: str, shape: LayerShape, source: str = "layer_shapes") -> LayerRecord:
    """``shape`` as a :class:`LayerRecord` (the layer at ``path`` and the ``source`` of the shape named in messages).

    Sizes must be integers in ``[1, MAX_SIZE]`` (numpy integers too; not bools, floats or strings) and
    ``fan_in_fan_out`` a boolean.
    """
    if isinstance(shape, LayerRecord):
        shape = (shape.in_features, shape.out_features, shape.fan_in_fan_out)
    if not isinstance(shape, (tuple, list)) or len(shape) not in (2, 3):
        raise CheckpointError(f"{source}[{path!r}] must be (in_features, out_features[, fan_in_fan_out]), got {shape!r:.80}")
    where = f"{source}[{path!r}]"
    in_f = size_value(shape[0], "in_features", where)
    out_f = size_value(shape[1], "out_features", where)
    return LayerRecord(in_f, out_f, flag_value(shape[2], "fan_in_fan_out", where) if len(shape) == 3 else False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose submodule paths PEFT keys use: a PeftModel's or RandLoraModel's base model, else ``model``."""
    peft = import_peft()
    if isinstance(model, peft.PeftModel):
        base: nn.Module = model.get_base_model()
        return base
    from randlora_core import RandLoraModel

    if isinstance(model, RandLoraModel):
        return model.model
    return model


def layer_records_from_model(model: nn.Module, paths: Iterable[str]) -> dict[str, LayerRecord]:
    """Sizes and weight layout of the base layers at ``paths`` in ``model``.

    ``model`` may be a plain module, a PEFT model or a randlora-core model; adapter wrappers are
    looked through to their base layer. Raises :class:`CheckpointError` for a missing path or a
    module that is not ``nn.Linear`` or Conv1D-like.
    """
    from randlora_core import is_conv1d_like

    root = unwrap_model(model)
    records = {}
    for path in paths:
        try:
            module = root.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"the model has no module {path!r}, which the adapter adapts") from None
        get_base_layer = getattr(module, "get_base_layer", None)
        base: nn.Module = get_base_layer() if get_base_layer is not None else module
        if is_conv1d_like(base):
            in_f, out_f = base.get_parameter("weight").shape
            records[path] = LayerRecord(int(in_f), int(out_f), True)
        elif isinstance(base, nn.Linear):
            records[path] = LayerRecord(int(base.in_features), int(base.out_features), False)
        else:
            raise CheckpointError(f"module {path!r} is {type(base).__name__}; RandLoRA adapts only nn.Linear and Conv1D layers")
    return records


def records_from_mapping(layer_shapes: Mapping[str, LayerShape], paths: list[str]) -> dict[str, LayerRecord]:
    """The records of ``paths`` from an explicit ``{path: shape}`` mapping, which must name every one."""
    missing = [p for p in paths if p not in layer_shapes]
    if missing:
        raise CheckpointError(f"layer_shapes lacks adapted layers {missing[:10]}")
    return {p: as_record(p, layer_shapes[p]) for p in paths}


def square_layers_from_bases(parsed: PeftTensors, config: RandLoraConfig, source: str) -> dict[str, LayerRecord]:
    """Layer shapes from the bases alone: possible only when every layer is square with m = M_max."""
    a, b = parsed.bases.get("A"), parsed.bases.get("B")
    if a is None and parsed.layer_bases:
        a = next((v for (_, which), v in parsed.layer_bases.items() if which == "A"), None)
        b = next((v for (_, which), v in parsed.layer_bases.items() if which == "B"), None)
    records = {}
    for path, gamma in parsed.gamma.items():
        m = int(gamma.shape[-1]) if gamma.ndim == 2 else -1
        if a is None or b is None or a.ndim != 3 or b.ndim != 3 or not (m == a.shape[2] == b.shape[0]):
            raise CheckpointError(
                f"{source}: cannot tell the in/out sizes of layer {path!r} from PEFT's files (they only record "
                "m = min(in, out)); pass the base model (model= / --base-model) or layer_shapes (--layer-shapes)"
            )
        records[path] = LayerRecord(m, m, config.fan_in_fan_out)
    return records


def check_trainable_shapes(layers: Mapping[str, LayerRecord], parsed: PeftTensors, r: int, source: str) -> None:
    """Each layer's lambda is (r, nb) and gamma (nb, m) for its recorded sizes."""
    for path, rec in layers.items():
        lam, gamma = parsed.lam[path], parsed.gamma[path]
        nb = num_bases(rec.m, r)
        if lam.shape != (r, nb) or gamma.shape != (nb, rec.m):
            raise CheckpointError(
                f"{source}: layer {path!r} is {rec.in_features}x{rec.out_features} (in x out), so with r={r} it needs "
                f"randlora_lambda {(r, nb)} and randlora_gamma {(nb, rec.m)}; the file has {lam.shape} and {gamma.shape}"
            )


def _json_shape(value: Any) -> Any:
    """A shape written as ``{"in_features": I, "out_features": O[, "fan_in_fan_out": F]}`` as a list."""
    if isinstance(value, dict) and {"in_features", "out_features"} <= set(value) <= _RECORD_FIELDS:
        return [value["in_features"], value["out_features"], value.get("fan_in_fan_out", False)]
    return value


def layer_shapes_from_json(data: Any, source: str) -> dict[str, LayerShape]:
    """A ``--layer-shapes`` file's content: ``{path: [in, out(, fan_in_fan_out)]}`` or ``{path: {in_features, ...}}``."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: layer shapes must be a JSON object of module path -> shape")
    shapes: dict[str, LayerShape] = {}
    for key, value in data.items():
        rec = as_record(key, _json_shape(value), source)
        shapes[key] = (rec.in_features, rec.out_features, rec.fan_in_fan_out)
    return shapes
