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
"""

from randlora_peft._peft import import_peft
from randlora_peft.accelerate import accelerate, is_accelerated, unaccelerate
from randlora_peft.convert import MachineDependentBasesWarning, read_peft_adapter, regenerate_peft_bases, write_peft_adapter
from randlora_peft.interop import load_peft_adapter, save_peft_adapter

__version__ = "1.0.0"

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
