"""Hot-swapping: replace a loaded adapter's values in place from another checkpoint of the same geometry.

PEFT's ``hotswap_adapter`` semantics for RandLoRA: the adapter keeps its modules, parameters (the
same tensor objects, so optimizers and compiled graphs keep them) and shared bases; only the
values of lambda, gamma (and DoRA magnitudes), trained biases and ``modules_to_save`` copies change. A compiled model
therefore runs the new adapter without recompiling. A checkpoint whose ``randlora_alpha``
differs is applied by rescaling its lambda by ``alpha_new / alpha_old``, so the layers' scaling
(a constant a compiled graph holds) stays. Everything is checked before anything changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from randlora_core.planning import same_on_overlap
from randlora_core.state import FEATURES, check_fits, checkpoint_bases, values_for, write_values
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import AdapterNotFoundError, CheckpointError

if TYPE_CHECKING:
    from randlora_core.model import RandLoraModel

MATH_FIELDS = (
    "r",
    "randlora_dropout",
    "projection_prng_key",
    "sparse",
    "very_sparse",
    "basis_rule",
    "bias",
    "fan_in_fan_out",
    "use_dora",
)
"""Config fields that must agree for a swap: they fix shapes, bases and the graph; alpha may differ."""


def _check_config(model: RandLoraModel, adapter_name: str, config: RandLoraConfig, source: str) -> None:
    if adapter_name not in model.peft_config:
        raise AdapterNotFoundError(f"adapter {adapter_name!r} not found; the model has {list(model.peft_config)}")
    if adapter_name in model.merged_adapters:
        raise CheckpointError(f"{source}: adapter {adapter_name!r} is merged; unmerge it before hot-swapping")
    mine = model.peft_config[adapter_name]
    differ = [f for f in MATH_FIELDS if getattr(mine, f) != getattr(config, f)]
    if differ:
        pairs = ", ".join(f"{f}={getattr(config, f)!r} (loaded: {getattr(mine, f)!r})" for f in differ)
        raise CheckpointError(f"{source}: cannot hot-swap into {adapter_name!r}: the checkpoint has {pairs}")


def _check_geometry(model: RandLoraModel, adapter_name: str, header: spec_ckpt.CheckpointHeader, source: str) -> None:
    check_fits(model.model, header, source)
    have = sorted(model._targets[adapter_name])
    if sorted(header.layers) != have:
        raise CheckpointError(
            f"{source}: cannot hot-swap into {adapter_name!r}: it adapts {have}, the checkpoint {sorted(header.layers)}"
        )
    biases, saved = sorted(model._bias_params(adapter_name)), sorted(model._saved[adapter_name])
    if sorted(header.biases) != biases or sorted(header.modules_to_save) != saved:
        raise CheckpointError(
            f"{source}: cannot hot-swap into {adapter_name!r}: trained biases / modules_to_save differ "
            f"(loaded {biases} / {saved}, checkpoint {sorted(header.biases)} / {sorted(header.modules_to_save)})"
        )


def _check_bases(model: RandLoraModel, ckpt: spec_ckpt.AdapterCheckpoint, source: str) -> None:
    bases = model.randlora_bases
    assert bases is not None
    if ckpt.bases is None and bases.regenerable:
        return  # both follow the portable rule for the same seed and kind (checked with the config)
    if not same_on_overlap(checkpoint_bases(ckpt), (bases.randlora_A, bases.randlora_B)):
        raise CheckpointError(f"{source}: the checkpoint's bases differ from the model's shared bases; cannot hot-swap")


def hotswap_adapter(
    model: RandLoraModel, checkpoint: str | Path | spec_ckpt.AdapterCheckpoint, adapter_name: str = "default"
) -> None:
    """Replace the values of ``adapter_name`` in ``model`` by those of ``checkpoint`` (a path or an in-memory checkpoint).

    Raises:
        AdapterNotFoundError: the model has no such adapter.
        CheckpointError: the checkpoint is malformed or its geometry (layers, sizes, rank, bases,
            dropout, biases, modules_to_save) differs from the loaded adapter's; nothing changed.

    """
    if isinstance(checkpoint, spec_ckpt.AdapterCheckpoint):
        ckpt, source = checkpoint, "<checkpoint>"
        header = spec_ckpt.validate(ckpt, source=source, supported_features=FEATURES)
        _check_config(model, adapter_name, ckpt.config, source)
        _check_geometry(model, adapter_name, header, source)
    else:
        source = str(checkpoint)
        with spec_ckpt.open_checkpoint(checkpoint, source=source, supported_features=FEATURES) as reader:
            _check_config(model, adapter_name, reader.header.config, source)
            _check_geometry(model, adapter_name, reader.header, source)
            ckpt = reader.load()
    _check_bases(model, ckpt, source)
    layers = dict(model.named_randlora_layers())
    wrappers = {path: layers[path] for path in ckpt.layers}  # the adapter's own layers (checked above)
    values = values_for(model.model, wrappers, ckpt, source, adapter_name)  # in the adapter's own dtypes
    ratio = ckpt.config.randlora_alpha / model.peft_config[adapter_name].randlora_alpha
    if ratio != 1.0:
        for slot in [s for s in values if s[2] == "randlora_lambda"]:
            values[slot] = values[slot] * ratio
            if not bool(torch.isfinite(values[slot]).all()):
                raise CheckpointError(f"{source}: {slot[1]}.randlora_lambda overflows when rescaled to the loaded alpha")
    write_values(model.model, adapter_name, values)
