"""randlora-peft: the bridge between Hugging Face PEFT's RandLoRA and randlora.

* :func:`load_peft_adapter` / :func:`save_peft_adapter`: PEFT adapter directories into and out of
  randlora-core models.
* :func:`read_peft_adapter` / :func:`write_peft_adapter`: PEFT directories <-> the spec's
  :class:`~randlora_spec.checkpoint.AdapterCheckpoint` (no model needed); the ``randlora-peft convert``
  command line is built on them.
* :func:`accelerate` / :func:`unaccelerate`: run an existing PEFT RandLoRA model on randlora-core's
  kernels, in place, with PEFT's API unchanged.
* :class:`~randlora_peft.driver.PeftDriver`: the ``peft`` conformance driver.

PEFT itself is imported on first use, through :func:`import_peft`, which keeps bitsandbytes'
import-time log noise out (PEFT imports bitsandbytes eagerly when it is installed).

The names below are imported on first access (torch, PEFT and transformers take seconds to
import; the command line's ``--help`` and ``--version`` need none of them).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "1.0.0"

_EXPORTS = {
    "MachineDependentBasesWarning": "randlora_peft.peft_bases",
    "accelerate": "randlora_peft.accelerate",
    "import_peft": "randlora_peft._peft",
    "is_accelerated": "randlora_peft.accelerate",
    "load_peft_adapter": "randlora_peft.interop",
    "read_peft_adapter": "randlora_peft.reader",
    "regenerate_peft_bases": "randlora_peft.peft_bases",
    "save_peft_adapter": "randlora_peft.interop",
    "unaccelerate": "randlora_peft.accelerate",
    "write_peft_adapter": "randlora_peft.writer",
}

__all__ = [
    "MachineDependentBasesWarning",
    "accelerate",
    "import_peft",
    "is_accelerated",
    "load_peft_adapter",
    "read_peft_adapter",
    "regenerate_peft_bases",
    "save_peft_adapter",
    "unaccelerate",
    "write_peft_adapter",
]

if TYPE_CHECKING:
    from randlora_peft._peft import import_peft
    from randlora_peft.accelerate import accelerate, is_accelerated, unaccelerate
    from randlora_peft.interop import load_peft_adapter, save_peft_adapter
    from randlora_peft.peft_bases import MachineDependentBasesWarning, regenerate_peft_bases
    from randlora_peft.reader import read_peft_adapter
    from randlora_peft.writer import write_peft_adapter


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps ``randlora_peft.accelerate`` the function when the submodule of that name is imported.

    Importing a submodule sets the package attribute of its name to the module; the package
    exports the function ``accelerate`` under that name, as it always has.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
