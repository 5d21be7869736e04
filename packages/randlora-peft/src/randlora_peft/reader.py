"""Reading a PEFT RandLoRA adapter directory into an :class:`~randlora_spec.checkpoint.AdapterCheckpoint`.

A short pipeline over the directory's files, read once (:class:`~randlora_peft.directory.PeftDirectory`):
config -> tensors sorted by role (:mod:`~randlora_peft.layout`) -> layer shapes
(:mod:`~randlora_peft.shapes`) -> the bases, stored or regenerated (:mod:`~randlora_peft.peft_bases`)
-> the checkpoint -> what the sidecar lets us restore (:mod:`~randlora_peft.sidecar`) -> compaction.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from randlora_peft import _spec_seam as seam
from randlora_peft.directory import PeftDirectory, read_peft_directory
from randlora_peft.layout import PEFT_PICKLE_NAME, PEFT_WEIGHTS_NAME, PeftTensors, parse_peft_tensors
from randlora_peft.limits import check_bases_budget, weight_bytes
from randlora_peft.peft_bases import (
    BASES_KEYS,
    MachineDependentBasesWarning,
    check_bases_shape,
    compact_bases,
    pick_bases,
    regenerate_peft_bases,
)
from randlora_peft.shapes import (
    LayerShape,
    check_trainable_shapes,
    layer_records_from_model,
    records_from_mapping,
    square_layers_from_bases,
)
from randlora_peft.sidecar import Sidecar, parse_sidecar, restore_from_sidecar, sidecar_layers
from randlora_spec.bases import PEFT_RULE, BasesShape, bases_shape_for_layers
from randlora_spec.checkpoint import AdapterCheckpoint, LayerRecord
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import BasisRuleError, CheckpointError, ConfigError

_REGENERATED_WARNING = (
    "{source} was saved with save_projection=False: its bases were regenerated with PEFT's own code on this "
    "machine. PEFT draws them in bfloat16 when the machine supports it and float16 otherwise, and torch's RNG "
    "may change between versions, so they may differ from the bases the adapter was trained with. The "
    "converted checkpoint stores the bases, so from here on they travel with the adapter."
)


@dataclass(frozen=True)
class ReadOptions:
    """The choices :func:`read_peft_adapter` takes (see its arguments)."""

    model: nn.Module | None = None
    layer_shapes: Mapping[str, LayerShape] | None = None
    adapter_name: str = "default"
    regenerate_missing_bases: bool = True
    compact_bases: bool = True


def config_from_peft(data: dict[str, Any], source: str) -> RandLoraConfig:
    """Our config from PEFT's ``adapter_config.json`` content; :class:`CheckpointError` if it is not RandLoRA's."""
    if data.get("layers_pattern") is not None and data.get("layers_to_transform") is None:
        # PEFT accepts this combination and ignores layers_pattern; our schema rejects it as meaningless
        data = {**data, "layers_pattern": None}
    try:
        return RandLoraConfig.from_peft_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: adapter config is not a valid RandLoRA config: {exc}") from None


def _weights(snapshot: PeftDirectory) -> bytes:
    if snapshot.weights is not None:
        return snapshot.weights
    if snapshot.has_pickle:
        raise CheckpointError(
            f"{snapshot.path}: only {PEFT_PICKLE_NAME} (a pickle) is present; pickles are not loaded for safety. "
            "Re-save the adapter with save_pretrained(safe_serialization=True)"
        )
    raise CheckpointError(f"{snapshot.path}: no {PEFT_WEIGHTS_NAME}")


def _check_may_regenerate(config: RandLoraConfig, options: ReadOptions, snapshot: PeftDirectory) -> None:
    """A file without bases is acceptable only for ``save_projection=False`` and when regeneration is allowed."""
    if config.save_projection:
        raise CheckpointError(
            f"{snapshot.weights_source}: the config says save_projection=True but the file holds no randlora_A / "
            "randlora_B (PEFT would silently draw new bases; refusing)"
        )
    if not options.regenerate_missing_bases:
        raise BasisRuleError(
            f"{snapshot.path}: saved with save_projection=False: its bases exist only as PEFT's machine-dependent draw"
        )


def _sidecar(snapshot: PeftDirectory) -> Sidecar | None:
    return None if snapshot.sidecar is None else parse_sidecar(snapshot.sidecar, snapshot.sidecar_source)


def _layers(
    parsed: PeftTensors, config: RandLoraConfig, snapshot: PeftDirectory, sidecar: Sidecar | None, options: ReadOptions
) -> dict[str, LayerRecord]:
    """The layer shapes from the first source available (see :mod:`randlora_peft.shapes`)."""
    paths = sorted(parsed.lam)
    if options.model is not None:
        return layer_records_from_model(options.model, paths)
    if options.layer_shapes is not None:
        return records_from_mapping(options.layer_shapes, paths)
    if sidecar is not None:
        return sidecar_layers(sidecar, paths)
    return square_layers_from_bases(parsed, config, snapshot.weights_source)


def _check_bias_scope(config: RandLoraConfig, parsed: PeftTensors, paths: list[str], source: str) -> None:
    if config.bias == "randlora_only":
        stray = sorted(set(parsed.biases) - set(paths))
        if stray:
            raise CheckpointError(f"{source}: bias='randlora_only' but biases of non-adapted modules {stray[:5]} are stored")


def _bases(
    picked: tuple[np.ndarray, np.ndarray] | None,
    parsed: PeftTensors,
    config: RandLoraConfig,
    layers: dict[str, LayerRecord],
    snapshot: PeftDirectory,
    options: ReadOptions,
) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, str | None]]:
    """``((A, B), their file dtype codes)``: the stored pair, or PEFT's draw on this machine (``None`` codes).

    PEFT's draw is made only within the budget of :mod:`randlora_peft.limits`: the layer sizes come
    from a model or the caller, or else from the files, which cannot vouch for gigabytes of bases.
    """
    if picked is not None:
        return picked, {key: parsed.dtype.get(key) for key in BASES_KEYS}
    shape = bases_shape_for_layers([(rec.in_features, rec.out_features) for rec in layers.values()], config.r)
    vouched = options.model is not None or options.layer_shapes is not None
    check_bases_budget(
        shape,
        "regenerating PEFT's bases for these layers",
        snapshot.weights_source,
        snapshot.size,
        weight_bytes(layers.values()) if vouched else 0,
        remedy="" if vouched else " (pass the base model if these layer sizes are real)",
    )
    warnings.warn(_REGENERATED_WARNING.format(source=snapshot.path), MachineDependentBasesWarning, stacklevel=4)
    a, b = regenerate_peft_bases(config, layers)
    return (a.numpy(), b.numpy()), dict.fromkeys(BASES_KEYS)


def _check_layers_fit(layers: dict[str, LayerRecord], shape: BasesShape, source: str) -> None:
    for path, rec in layers.items():
        if rec.m > shape.m_max or rec.M > shape.M_max:
            raise CheckpointError(f"{source}: layer {path!r} ({rec.in_features}x{rec.out_features}) does not fit bases {shape}")


def checkpoint_from_directory(snapshot: PeftDirectory, options: ReadOptions) -> AdapterCheckpoint:
    """The checkpoint a PEFT directory's files describe, every PEFT-side check done; not yet validated by the spec."""
    config = config_from_peft(snapshot.config, str(snapshot.path))
    weights = _weights(snapshot)
    if not options.adapter_name or "." in options.adapter_name:
        raise CheckpointError(f"adapter_name {options.adapter_name!r} must be non-empty and contain no '.'")
    source = snapshot.weights_source
    tensors, dtypes = seam.decode_weights(weights, source)
    parsed = parse_peft_tensors(tensors, dtypes, config, options.adapter_name, source)
    del tensors
    paths = parsed.layer_paths(source)
    picked = pick_bases(parsed, source)
    if picked is None:
        _check_may_regenerate(config, options, snapshot)
    sidecar = _sidecar(snapshot)
    layers = _layers(parsed, config, snapshot, sidecar, options)
    check_trainable_shapes(layers, parsed, config.r, source)
    _check_bias_scope(config, parsed, paths, source)
    (a, b), codes = _bases(picked, parsed, config, layers, snapshot, options)
    shape = check_bases_shape(a, b, config.r, source)
    _check_layers_fit(layers, shape, source)
    ckpt = AdapterCheckpoint(
        config=RandLoraConfig.parse({**config.model_dump(mode="json"), "save_projection": True}),
        adapter_name=options.adapter_name,
        layers=layers,
        bases_shape=shape,
        tensors=parsed.checkpoint_tensors(paths),
        bases=(a, b),
        biases=sorted(parsed.biases),
        modules_to_save={p: sorted(v) for p, v in sorted(parsed.saved.items())},
        bf16_keys=frozenset(k for k, code in parsed.dtype.items() if code == "BF16") - set(BASES_KEYS),
    )
    if sidecar is not None:
        ckpt = restore_from_sidecar(ckpt, sidecar, snapshot.size)
    if ckpt.config.basis_rule == PEFT_RULE:
        compact_bases(ckpt, codes, options.compact_bases)
    return ckpt


def read_peft_adapter(
    peft_dir: str | Path,
    *,
    model: nn.Module | None = None,
    layer_shapes: Mapping[str, LayerShape] | None = None,
    adapter_name: str = "default",
    regenerate_missing_bases: bool = True,
    compact_bases: bool = True,
) -> AdapterCheckpoint:
    """Parse and validate a PEFT RandLoRA adapter directory into an :class:`AdapterCheckpoint`.

    Args:
        peft_dir: directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        model: the base model (plain, PEFT-wrapped or randlora-core-wrapped) the adapter belongs to;
            the source of each layer's sizes and layout, and checked against the adapter.
        layer_shapes: ``{module path: (in_features, out_features[, fan_in_fan_out])}`` when no model
            is at hand (ignored when ``model`` is given).
        adapter_name: name given to the adapter, and the name selected when the file's keys carry
            several adapter names.
        regenerate_missing_bases: for ``save_projection=False`` checkpoints, regenerate the bases
            with PEFT's own code (see :func:`regenerate_peft_bases`) and warn with
            :class:`MachineDependentBasesWarning`; when false, such a checkpoint raises
            :class:`BasisRuleError`.
        compact_bases: store PEFT's bases as BF16 (or F16) in the checkpoint when that is exact
            (PEFT draws them in bfloat16, so this halves their size without changing a value).

    Returns:
        A validated checkpoint: config from ``RandLoraConfig.from_peft_dict`` (``basis_rule`` is
        PEFT's rule) with ``save_projection=True``, because its bases are stored. If the directory
        carries the sidecar written by :func:`write_peft_adapter` and the bases are bit-identical to
        the portable rule, the portable rule and the original ``save_projection`` are restored.

    Raises:
        CheckpointError: missing or malformed files (only regular files are read; JSON files must be
            standard JSON of at most 4 MiB), unexpected or inconsistent tensors, layers that do not
            match ``model`` or ``layer_shapes``, layer sizes that cannot be determined, or sizes the
            files record that would need more memory for bases than the input justifies
            (:mod:`randlora_peft.limits`); nothing that large is allocated before the refusal.
        BasisRuleError: bases are absent and ``regenerate_missing_bases`` is false.

    """
    options = ReadOptions(model, layer_shapes, adapter_name, regenerate_missing_bases, compact_bases)
    ckpt = checkpoint_from_directory(read_peft_directory(peft_dir), options)
    seam.validate(ckpt)
    return ckpt
