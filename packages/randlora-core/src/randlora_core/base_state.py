"""The base model's own ``state_dict`` under its original keys (PEFT's ``get/set_base_model_state_dict``).

Inside a :class:`~randlora_core.model.RandLoraModel` a targeted layer ``q_proj`` keeps its weight at
``q_proj.base_layer.weight`` and a ``modules_to_save`` module ``head`` at ``head.original_module.*``.
These functions translate between those keys and the ones the unadapted model has, and leave the
adapters' own tensors (lambda/gamma, ``modules_to_save`` copies) out, so base weights can be saved or
loaded (e.g. after sharding) as if no adapter were there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from randlora_spec.errors import CheckpointError, MergeError

if TYPE_CHECKING:
    from randlora_core.model import RandLoraModel

_INFIX = {"layer": "base_layer", "saved": "original_module"}
"""The attribute through which each kind of wrapper holds the base model's module."""

MAX_LISTED = 10


class IncompatibleKeys(NamedTuple):
    """Keys of the model missing from a loaded state dict, and keys of the state dict the model lacks."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _wrappers(model: RandLoraModel) -> dict[str, str]:
    """Path of every wrapper -> its kind (``layer`` or ``saved``)."""
    kinds = {path: "layer" for path, _ in model.named_randlora_layers()}
    kinds.update({path: "saved" for path, _ in model._modules_to_save()})
    return kinds


def _original_key(key: str, wrappers: dict[str, str]) -> str | None:
    """The unadapted model's key for ``key`` of the wrapped model, or ``None`` for an adapter tensor."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        kind = wrappers.get(".".join(parts[:i]))
        if kind is None:
            continue
        if parts[i] != _INFIX[kind]:
            return None  # lambda/gamma, or a modules_to_save copy
        return ".".join(parts[:i] + parts[i + 1 :])
    return key


def _key_map(model: RandLoraModel) -> dict[str, str]:
    """Original key -> key in ``model.model.state_dict()``, for every base-model tensor."""
    wrappers = _wrappers(model)
    out = {}
    for key in model.model.state_dict():
        original = _original_key(key, wrappers)
        if original is not None:
            out[original] = key
    return out


def get_base_model_state_dict(model: RandLoraModel) -> dict[str, torch.Tensor]:
    """The base model's tensors under the keys the unadapted model has (merged adapters are in the weights, as PEFT)."""
    state = model.model.state_dict()
    return {original: state[key] for original, key in _key_map(model).items()}


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:MAX_LISTED]) + (", ..." if len(keys) > MAX_LISTED else "")


def set_base_model_state_dict(
    model: RandLoraModel, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load base-model tensors given under the unadapted model's keys; the adapters are untouched.

    Everything is checked before anything is copied: with ``strict`` every base key must be given
    and no other; each given tensor must have the model's shape for its key.

    Raises:
        MergeError: an adapter is merged into the base weights (unmerging later would subtract it
            from the new weights).
        CheckpointError: missing or unexpected keys (``strict``), a value that is not a tensor, or a
            shape mismatch.

    """
    if model.merged_adapters:
        raise MergeError(f"adapters {model.merged_adapters} are merged into the base weights; call unmerge_adapter() first")
    mapping = _key_map(model)
    unexpected = [k for k in state_dict if k not in mapping]
    missing = [k for k in mapping if k not in state_dict]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"set_base_model_state_dict: missing keys [{_listing(missing)}], unexpected keys [{_listing(unexpected)}]"
        )
    current = model.model.state_dict()
    translated = {}
    for original, value in state_dict.items():
        if original not in mapping:
            continue
        want = current[mapping[original]].shape
        if not isinstance(value, torch.Tensor) or value.shape != want:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"set_base_model_state_dict: {original!r} is {got}, the model's is {tuple(want)}")
        translated[mapping[original]] = value
    model.model.load_state_dict(translated, strict=False)
    return IncompatibleKeys(missing, unexpected)
