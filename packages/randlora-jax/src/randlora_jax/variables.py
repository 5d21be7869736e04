"""Variable types of RandLoRA state and the filter that selects what trains.

NNX has no ``requires_grad``: what an optimizer updates is chosen by a filter over the model's
variables. RandLoRA marks the variables that train with the metadata flag ``randlora_trainable``
(the active adapters' lambda and gamma, trainable biases, ``modules_to_save`` copies) and keeps the
flag current as adapters are activated, so one static filter, :func:`trainable`, works with
``nnx.Optimizer(model, tx, wrt=trainable)`` and ``nnx.DiffState(0, trainable)`` and survives
``nnx.jit`` (metadata travels with the variables).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

TRAINABLE = "randlora_trainable"
"""Metadata key: True on every variable the active adapters train."""


class RandLoraParam(nnx.Param[jax.Array]):
    """A trainable RandLoRA tensor (``lambda`` or ``gamma``); metadata ``adapter`` names its adapter."""


class RandLoraBasis(nnx.Variable[jax.Array]):
    """One shared random basis (``randlora_A`` or ``randlora_B``): float32, frozen, not an ``nnx.Param``."""


def trainable(path: tuple[Any, ...], value: Any) -> bool:
    """NNX filter: the variables the active adapters train (use as ``wrt=`` / in ``nnx.DiffState``)."""
    del path
    return isinstance(value, nnx.Variable) and bool(value.get_metadata().get(TRAINABLE, False))


def set_trainable(variable: nnx.Variable[Any], flag: bool) -> None:
    """Mark ``variable`` as trained (or not) by the active adapters."""
    variable.set_metadata(TRAINABLE, bool(flag))


def is_trainable(variable: nnx.Variable[Any]) -> bool:
    """Whether ``variable`` is marked as trained by the active adapters."""
    return bool(variable.get_metadata().get(TRAINABLE, False))
