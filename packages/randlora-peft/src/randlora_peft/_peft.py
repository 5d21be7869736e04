"""Importing PEFT quietly, and the few PEFT names this package uses.

``import peft`` imports bitsandbytes when it is installed (``peft.helpers`` does so eagerly), and
bitsandbytes' CPU backend logs a warning at import time when an optional kernel package is
missing. This package never uses bitsandbytes; to keep that noise out of users' logs, the first
import of PEFT made through :func:`import_peft` raises the ``bitsandbytes`` logger's level for the
duration of the import only, and restores it afterwards. Nothing else about logging is changed.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peft.tuners.randlora.layer import Linear as PeftRandLoraLinear
    from peft.tuners.randlora.model import RandLoraModel as PeftRandLoraModel


def import_peft() -> ModuleType:
    """``import peft`` with bitsandbytes' import-time log warnings suppressed (see module docstring)."""
    logger = logging.getLogger("bitsandbytes")
    previous = logger.level
    if previous < logging.ERROR:
        logger.setLevel(logging.ERROR)
    try:
        import peft
        import peft.tuners.randlora  # makes the submodule available as an attribute
    finally:
        logger.setLevel(previous)
    return peft


def peft_randlora_linear() -> type[PeftRandLoraLinear]:
    """PEFT's RandLoRA layer class for ``nn.Linear`` and Conv1D bases (``peft.tuners.randlora.layer.Linear``)."""
    import_peft()
    from peft.tuners.randlora.layer import Linear

    return Linear


def peft_randlora_model() -> type[PeftRandLoraModel]:
    """PEFT's RandLoRA tuner class (``peft.tuners.randlora.model.RandLoraModel``)."""
    import_peft()
    from peft.tuners.randlora.model import RandLoraModel

    return RandLoraModel


def peft_version() -> str:
    """The installed PEFT version string."""
    return str(import_peft().__version__)
