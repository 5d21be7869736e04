"""Plug the bitsandbytes wrappers into randlora-core's layer registry.

randlora-core finds wrappers for layer types in a registry; packages extend it through the
``randlora.layers`` entry-point group, whose entry points are no-argument callables that call
:func:`randlora_core.register_layer_wrapper`. This package's entry point is :func:`register`, so
installing randlora-bnb is enough for :func:`randlora_core.get_randlora_model` and
:func:`randlora_core.load_adapter` to adapt bitsandbytes layers: core runs the entry points lazily,
once, the first time it adapts a model.

``Linear8bitLt`` and ``Linear4bit`` subclass ``nn.Linear``, which core's built-in wrapper would
also accept; registered wrappers take precedence over built-in ones, so these win.
"""

from __future__ import annotations

import bitsandbytes as bnb

from randlora_bnb.layer import RandLoraLinear4bit, RandLoraLinear8bitLt
from randlora_core import register_layer_wrapper

_registered = False


def register() -> None:
    """Register the wrappers for ``Linear8bitLt`` and ``Linear4bit`` (idempotent).

    Called by core through the entry point; call it yourself only where entry points are not
    available (e.g. a vendored, uninstalled copy of this package).
    """
    global _registered
    if _registered:
        return
    # Set first: register_layer_wrapper loads the entry points, which may call back into register().
    _registered = True
    register_layer_wrapper(bnb.nn.Linear8bitLt, RandLoraLinear8bitLt)
    register_layer_wrapper(bnb.nn.Linear4bit, RandLoraLinear4bit)
