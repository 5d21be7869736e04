"""The PEFT model API of :class:`~randlora_core.model.RandLoraModel`, with PEFT's names and meanings.

:class:`PeftApiMixin` adds what a PEFT user reaches for on a ``PeftModel`` beyond adding, switching,
merging and deleting adapters (which live in :mod:`randlora_core.model`): ``base_model``,
``active_peft_config``, ``targeted_module_names``, ``disable_adapter()``, ``enable_adapter_layers``
/ ``disable_adapter_layers``, ``set_requires_grad``, parameter counts,
``get_layer_status`` / ``get_model_status``,
``get_base_model_state_dict`` / ``set_base_model_state_dict``, and adapter directories
(``save_pretrained``, ``from_pretrained``, ``load_adapter``). Each method is a thin front to the
module that owns the concept (:mod:`~randlora_core.status`, :mod:`~randlora_core.base_state`,
:mod:`~randlora_core.pretrained`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from randlora_core import base_state, pretrained, status
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import AdapterNotFoundError, MergeError

if TYPE_CHECKING:
    from randlora_core.model import RandLoraModel


def _logical_numel(param: torch.Tensor) -> int:
    """Number of values ``param`` represents, which for packed quantized storage is not its ``numel()``.

    bitsandbytes' 4-bit weights keep two values per byte; their ``quant_state.shape`` is the real shape.
    """
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


class PeftApiMixin:
    """PEFT's ``PeftModel`` / ``BaseTuner`` methods for :class:`~randlora_core.model.RandLoraModel`."""

    @property
    def _host(self) -> RandLoraModel:
        """The same object typed as the class it is mixed into (RandLoraModel, its only host), whose state the methods use."""
        return cast("RandLoraModel", self)

    @property
    def base_model(self) -> RandLoraModel:
        """The object that manages the adapters, whose ``.model`` is the wrapped model: this model itself.

        PEFT's ``PeftModel.base_model`` is its tuner; randlora-core has one object in both roles, so
        PEFT code such as ``model.base_model.model`` or ``model.base_model.set_adapter([...])`` works.
        """
        return self._host

    @property
    def active_peft_config(self) -> RandLoraConfig:
        """The config of the active adapter (the first, when several are active: the one ``save_adapter`` writes)."""
        if not self._host._active:
            raise AdapterNotFoundError(f"no adapter is active; the model has {list(self._host.peft_config)}")
        return self._host.peft_config[self._host._active[0]]

    @property
    def targeted_module_names(self) -> list[str]:
        """Paths (in the base model) of every module some adapter targets, in the order they were adapted."""
        names: list[str] = []
        for paths in self._host._targets.values():
            names += [p for p in paths if p not in names]
        return names

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model runs as the base model (adapters and modules_to_save copies off).

        As in PEFT, no adapter parameter is trainable inside the block; on exit the previous state returns.

        Raises:
            MergeError: an adapter is merged (unmerge it first).

        """
        was_enabled = self._host._enabled
        self._set_enabled(False)
        try:
            yield
        finally:
            self._set_enabled(was_enabled)

    def _set_enabled(self, enabled: bool) -> None:
        """Switch every adapter layer and ``modules_to_save`` wrapper on or off (MergeError when turning off while merged)."""
        if not enabled and self._host.merged_adapters:
            raise MergeError(
                f"adapters {self._host.merged_adapters} are merged into the base weights; call unmerge_adapter() first"
            )
        biased = [n for n in self._host._active if self._host.peft_config[n].bias != "none"]
        if not enabled and biased:
            warnings.warn(
                f"adapter(s) {biased} trained biases, which stay in the base layers: with adapters disabled the output "
                "still differs from the base model's",
                stacklevel=3,
            )
        self._host._enabled = enabled
        self._host._apply_active()

    def enable_adapter_layers(self) -> None:
        """Turn the adapters (and ``modules_to_save`` copies) back on after :meth:`disable_adapter_layers`."""
        self._set_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Run the model as the base model until :meth:`enable_adapter_layers`; no adapter parameter trains meanwhile.

        Raises:
            MergeError: an adapter is merged (unmerge it first).

        """
        self._set_enabled(False)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make the parameters of ``adapter_names`` trainable or frozen (lambda/gamma, biases, ``modules_to_save`` copies).

        Until the next :meth:`set_adapter`, which makes exactly the active adapters trainable again (as PEFT).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self._host.peft_config]
        if missing:
            raise AdapterNotFoundError(f"adapter(s) {missing} not found; the model has {list(self._host.peft_config)}")
        if requires_grad:
            self._host._trainable.update(names)
        else:
            self._host._trainable.difference_update(names)
        self._host._apply_trainable()

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts of the whole model, adapters included."""
        params = list(self._host.parameters())
        return sum(_logical_numel(p) for p in params if p.requires_grad), sum(_logical_numel(p) for p in params)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's name for :meth:`trainable_parameters`."""
        return self.trainable_parameters()

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's format."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def get_layer_status(self) -> list[status.TunerLayerStatus]:
        """PEFT's per-layer status (see :mod:`randlora_core.status`)."""
        return status.get_layer_status(self._host)

    def get_model_status(self) -> status.TunerModelStatus:
        """PEFT's model status summary (see :mod:`randlora_core.status`)."""
        return status.get_model_status(self._host)

    def get_base_model_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's tensors under the unadapted model's keys (see :mod:`randlora_core.base_state`)."""
        return base_state.get_base_model_state_dict(self._host)

    def set_base_model_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True
    ) -> base_state.IncompatibleKeys:
        """Load base-model tensors given under the unadapted model's keys (see :mod:`randlora_core.base_state`)."""
        return base_state.set_base_model_state_dict(self._host, state_dict, strict)

    def save_pretrained(
        self, save_directory: str | Path, selected_adapters: list[str] | None = None, is_main_process: bool = True
    ) -> None:
        """Write the adapters (default: all) to a directory: see :func:`randlora_core.pretrained.save_pretrained`."""
        pretrained.save_pretrained(self._host, save_directory, selected_adapters, is_main_process)

    def load_adapter(
        self,
        model_id: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        """Load the adapter saved at ``model_id`` (a directory from :meth:`save_pretrained`, or a checkpoint file).

        A new name adds the adapter without activating it (PEFT's ``load_adapter``); the name of an
        existing adapter (for instance one added with ``low_cpu_mem_usage=True``) loads the values
        into it, as :func:`~randlora_core.hotswap.hotswap_adapter` does (same geometry required).
        ``is_trainable=False`` (PEFT's default) leaves the adapter frozen and puts the model in eval mode.

        Raises:
            CheckpointError: the file is malformed or does not fit the model (or the existing adapter).

        """
        pretrained.load_pretrained(self._host, model_id, adapter_name, is_trainable, autocast_adapter_dtype, low_cpu_mem_usage)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> RandLoraModel:
        """Wrap ``model`` and load the adapter at ``model_id`` as ``adapter_name``, active (PEFT's ``from_pretrained``).

        ``is_trainable=False`` (PEFT's default) gives a frozen adapter and a model in eval mode.
        ``low_cpu_mem_usage`` creates lambda/gamma straight from the file's values. On any error
        ``model`` is left unchanged.
        """
        wrapped = cast("type[RandLoraModel]", cls)(model)  # no adapter yet: changes nothing
        wrapped.load_adapter(model_id, adapter_name, is_trainable, autocast_adapter_dtype, low_cpu_mem_usage)
        return wrapped
