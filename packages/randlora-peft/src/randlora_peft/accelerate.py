"""Run PEFT RandLoRA models on randlora-core's kernels, in place, with PEFT's API unchanged.

Mechanism: :func:`accelerate` switches the class of every PEFT RandLoRA ``Linear`` instance in the
model to :class:`~randlora_peft._accelerated.AcceleratedRandLoraLinear`, a subclass that overrides
only ``forward`` and ``get_delta_weight`` (plus a plain ``randlora_compute`` attribute holding the
compute preference). Nothing global is patched (other PEFT models in the
process are unaffected), no parameter, buffer or hook is added or replaced (``state_dict`` and
``save_pretrained`` produce the same files), and PEFT's own methods (``set_adapter``,
``disable_adapter``, ``merge``/``unmerge``, ``merge_and_unload``, ``add_adapter`` on already
adapted layers) keep working because the layers are still instances of PEFT's class.
:func:`unaccelerate` switches them back.

Layers PEFT creates after the call (adding an adapter that targets new modules) are plain PEFT
layers; call :func:`accelerate` again, which is idempotent. PEFT's bitsandbytes RandLoRA layers are
left on PEFT's code path (with a warning).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torch import nn

from randlora_core.compute import COMPUTE_VALUES
from randlora_peft._peft import import_peft, peft_randlora_linear
from randlora_spec.errors import ConfigError, TargetModuleError

if TYPE_CHECKING:
    from randlora_peft._accelerated import AcceleratedRandLoraLinear


def _accelerated() -> Any:
    """The module defining the accelerated class: it subclasses PEFT's layer, so it imports PEFT."""
    from randlora_peft import _accelerated

    return _accelerated


def _accelerated_cls() -> type[AcceleratedRandLoraLinear]:
    from randlora_peft._accelerated import AcceleratedRandLoraLinear

    return AcceleratedRandLoraLinear


def _switch_class(module: nn.Module, cls: type[nn.Module]) -> None:
    """Make ``module`` an instance of ``cls`` in place (PEFT's layer class or its accelerated subclass: one layout)."""
    module.__class__ = cls


def is_accelerated(module: nn.Module) -> bool:
    """True for a PEFT RandLoRA layer switched to randlora-core's kernels."""
    return isinstance(module, _accelerated_cls())


def accelerate(peft_model: nn.Module, compute: str = "auto") -> nn.Module:
    """Switch every PEFT RandLoRA linear layer of ``peft_model`` to randlora-core's kernels, in place.

    Outputs and gradients equal PEFT's own (within float32 tolerance); see the module docstring for
    the mechanism and what stays unchanged.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module) holding PEFT RandLoRA layers.
        compute: ``"auto"`` (randlora-core's cost model picks per call), ``"factored"`` or
            ``"dense"`` (see :class:`~randlora_peft._accelerated.AcceleratedRandLoraLinear`);
            ``randlora_core.compute.compute_override`` still overrides it for a block of code.

    Returns:
        ``peft_model`` itself.

    Raises:
        TargetModuleError: the model holds no PEFT RandLoRA layer.
        ConfigError: ``compute`` is not one of the three values.

    """
    if compute not in COMPUTE_VALUES:
        raise ConfigError(f"compute: must be one of {list(COMPUTE_VALUES)}, got {compute!r}")
    peft = import_peft()
    linear_cls = peft_randlora_linear()
    layer_base = peft.tuners.randlora.layer.RandLoraLayer
    fast = _accelerated_cls()
    attr = _accelerated().COMPUTE_ATTR
    found, skipped = 0, []
    for name, module in peft_model.named_modules():
        if isinstance(module, fast):
            setattr(module, attr, compute)
            found += 1
        elif type(module) is linear_cls:
            _switch_class(module, fast)
            setattr(module, attr, compute)
            found += 1
        elif isinstance(module, layer_base):
            skipped.append(f"{name} ({type(module).__name__})")
    if skipped:
        warnings.warn(
            f"accelerate(): {len(skipped)} RandLoRA layer(s) of other kinds stay on PEFT's code path: {skipped[:5]}",
            stacklevel=2,
        )
    if not found:
        raise TargetModuleError(f"accelerate(): {type(peft_model).__name__} holds no PEFT RandLoRA linear layer")
    return peft_model


def unaccelerate(peft_model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`: every switched layer goes back to PEFT's own class; returns ``peft_model``."""
    linear_cls = peft_randlora_linear()
    fast = _accelerated_cls()
    for module in peft_model.modules():
        if type(module) is fast:
            _switch_class(module, linear_cls)
            module.__dict__.pop(_accelerated().COMPUTE_ATTR, None)
    return peft_model
