"""Saving and loading one adapter as a checkpoint file (format v1, SPEC.md section 6).

File I/O only: the file's bytes come from and go to :mod:`randlora_spec.checkpoint`, and the
adapter moves between the model and the checkpoint object through :mod:`randlora_core.state`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from torch import nn

from randlora_core.model import RandLoraModel
from randlora_core.pretrained import set_trainable
from randlora_core.registry import load_plugins
from randlora_core.state import FEATURES, apply_checkpoint_to, build_checkpoint, check_fits
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Unpack


class LoadOptions(TypedDict, total=False):
    """The keyword options of :func:`apply_checkpoint` and :func:`load_adapter` (PEFT's names).

    Attributes:
        is_trainable: the adapter's lambda/gamma require gradients (default ``True``); ``False``
            freezes them.
        autocast_adapter_dtype: float32 lambda/gamma on float16/bfloat16 layers (default ``True``).
        low_cpu_mem_usage: lambda/gamma created from the values directly (default ``False``).

    """

    is_trainable: bool
    autocast_adapter_dtype: bool
    low_cpu_mem_usage: bool


def save_adapter(model: RandLoraModel, path: str | Path, adapter_name: str | None = None) -> None:
    """Write one adapter of ``model`` (default: the first active one) to ``path`` atomically.

    The file is written to a temporary ``.<name>.<random>.tmp`` in the same directory, fsynced and
    renamed over ``path``, so ``path`` always holds the old or the new checkpoint, never a torn one.
    With sharded (FSDP2) parameters this gathers them: see :func:`~randlora_core.state.build_checkpoint`.
    """
    spec_ckpt.save(path, build_checkpoint(model, adapter_name), readable_features=FEATURES)


def apply_checkpoint(
    model: nn.Module,
    ckpt: spec_ckpt.AdapterCheckpoint,
    adapter_name: str = "default",
    source: str = "<checkpoint>",
    **options: Unpack[LoadOptions],
) -> RandLoraModel:
    """Add the adapter held by ``ckpt`` (an in-memory checkpoint) to ``model``; returns the :class:`RandLoraModel`.

    ``model`` is a plain module (a new RandLoraModel is built around it, the adapter active) or a
    RandLoraModel (the adapter is added, not activated, as PEFT's ``load_adapter``). Everything is
    validated first; on any error the model is unchanged.

    Unlike PEFT's loaders (and ``RandLoraModel.from_pretrained`` / ``load_adapter``), whose default
    is inference, this function's adapter is trainable unless ``is_trainable=False`` (it predates
    them and resumes training as it always has). The keyword options are :class:`LoadOptions`.
    """
    unknown = sorted(set(options) - set(LoadOptions.__annotations__))
    if unknown:
        raise ConfigError(f"unknown load options {unknown}; the options are {sorted(LoadOptions.__annotations__)}")
    wrapped = model if isinstance(model, RandLoraModel) else RandLoraModel(model)  # no adapter yet: unchanged
    autocast, low_mem = options.get("autocast_adapter_dtype", True), options.get("low_cpu_mem_usage", False)
    apply_checkpoint_to(wrapped, ckpt, adapter_name, source, autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_mem)
    if not options.get("is_trainable", True):
        set_trainable(wrapped, adapter_name, False)
    return wrapped


def load_adapter(
    model: nn.Module, path: str | Path, adapter_name: str = "default", **options: Unpack[LoadOptions]
) -> RandLoraModel:
    """Load the adapter stored at ``path`` into ``model`` and return the :class:`RandLoraModel`.

    As :func:`apply_checkpoint` (same keyword options, :class:`LoadOptions`), for a checkpoint file. The file's header is
    validated and checked against the model before any tensor data is read (a file that does not
    fit costs no more than its header), then each tensor is read once; on any error the model is
    unchanged.

    Raises:
        CheckpointError: malformed file, or it does not fit the model.
        BasisRuleError: bases absent and their rule cannot be regenerated.

    """
    load_plugins()
    source = str(path)
    with spec_ckpt.open_checkpoint(path, source=source, supported_features=FEATURES) as reader:
        check_fits(model.model if isinstance(model, RandLoraModel) else model, reader.header, source)
        ckpt = reader.load()
    return apply_checkpoint(model, ckpt, adapter_name, source, **options)
