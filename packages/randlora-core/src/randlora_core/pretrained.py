"""Adapter directories: PEFT's ``save_pretrained`` / ``from_pretrained`` / ``load_adapter`` for randlora-core.

Layout (PEFT's convention of one directory per model, a subdirectory per non-default adapter)::

    DIR/randlora_adapter.safetensors          the adapter named "default"
    DIR/<name>/randlora_adapter.safetensors   every other adapter

Each file is one checkpoint in format v1 (SPEC 6): it already holds the adapter's config and PEFT's
bookkeeping fields (``task_type``, ``base_model_name_or_path``, ``revision``, ``auto_mapping``) in
its header, so no separate config file is written (one source of truth; ``open_checkpoint(path).header``
reads it without touching tensor data). The file name differs from PEFT's ``adapter_model.safetensors``
on purpose: the tensors are not in PEFT's layout, and PEFT tools must not mistake the directory for a
PEFT adapter; ``randlora_peft.save_peft_adapter`` writes PEFT's layout.

Loading takes a directory (its ``randlora_adapter.safetensors``) or a checkpoint file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from randlora_core.hotswap import hotswap_adapter
from randlora_core.registry import load_plugins
from randlora_core.state import FEATURES, apply_checkpoint_to, build_checkpoint, check_fits
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.errors import AdapterNotFoundError, CheckpointError, ConfigError

if TYPE_CHECKING:
    from randlora_core.model import RandLoraModel

ADAPTER_FILE = "randlora_adapter.safetensors"
"""File name of one adapter's checkpoint inside an adapter directory."""

DEFAULT_ADAPTER = "default"
PEFT_CONFIG_FILE = "adapter_config.json"


def adapter_dir(save_directory: str | Path, adapter_name: str) -> Path:
    """Where ``save_pretrained`` puts ``adapter_name``: the directory itself for "default", else a subdirectory."""
    root = Path(save_directory)
    return root if adapter_name == DEFAULT_ADAPTER else root / adapter_name


def adapter_file(model_id: str | Path) -> Path:
    """The checkpoint file of ``model_id``: the file itself, or a directory's ``randlora_adapter.safetensors``.

    Raises:
        CheckpointError: a directory without that file (a PEFT adapter directory is named as such).

    """
    path = Path(model_id)
    if not path.is_dir():
        return path  # a file, or a missing path: opening it reports that
    if (path / ADAPTER_FILE).is_file():
        return path / ADAPTER_FILE
    if (path / PEFT_CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{path}: holds a PEFT adapter ({PEFT_CONFIG_FILE}), not a randlora adapter directory; load it with "
            "randlora_peft.load_peft_adapter, or convert it with randlora-peft convert"
        )
    raise CheckpointError(f"{path}: no {ADAPTER_FILE} in this directory (not written by save_pretrained)")


def _with_bookkeeping(model: RandLoraModel, ckpt: spec_ckpt.AdapterCheckpoint) -> spec_ckpt.AdapterCheckpoint:
    """PEFT's ``save_pretrained`` bookkeeping: the base model's ``name_or_path``, and ``auto_mapping`` without a ``task_type``."""
    config = ckpt.config.model_copy(deep=True)
    name_or_path = getattr(model.model, "name_or_path", None)
    if config.base_model_name_or_path is None and isinstance(name_or_path, str) and name_or_path:
        config.base_model_name_or_path = name_or_path
    if config.task_type is None and config.auto_mapping is None:
        base_cls = type(model.model)
        config.auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    ckpt.config = config
    return ckpt


def save_pretrained(
    model: RandLoraModel,
    save_directory: str | Path,
    selected_adapters: list[str] | None = None,
    is_main_process: bool = True,
) -> None:
    """Write the adapters (default: all) of ``model`` to ``save_directory`` in the layout of the module docstring.

    Every checkpoint is built and validated before anything is written. With sharded (FSDP2)
    parameters building gathers them, so every rank calls this and only the main process writes
    (``is_main_process``, PEFT's argument).

    Raises:
        CheckpointError: ``save_directory`` is an existing file, or an adapter cannot be saved.
        AdapterNotFoundError: an unknown name in ``selected_adapters``.
        ConfigError: an adapter name that cannot be a directory name.

    """
    root = Path(save_directory)
    if root.is_file():
        raise CheckpointError(f"save_pretrained: {root} is a file; save_directory must be a directory")
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise AdapterNotFoundError(f"adapter(s) {missing} not found; the model has {list(model.peft_config)}")
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ConfigError(f"adapter name {name!r} cannot be used as a directory name by save_pretrained")
    checkpoints = {name: _with_bookkeeping(model, build_checkpoint(model, name)) for name in names}
    if not is_main_process:
        return
    for name, ckpt in checkpoints.items():
        directory = adapter_dir(root, name)
        directory.mkdir(parents=True, exist_ok=True)
        spec_ckpt.save(directory / ADAPTER_FILE, ckpt, readable_features=FEATURES)


def load_pretrained(
    model: RandLoraModel,
    model_id: str | Path,
    adapter_name: str = DEFAULT_ADAPTER,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> None:
    """Load the adapter at ``model_id`` (directory or file) into ``model`` (see ``RandLoraModel.load_adapter``)."""
    load_plugins()
    path = adapter_file(model_id)
    if adapter_name in model.peft_config:  # PEFT loads the values into the existing adapter: a hot swap
        hotswap_adapter(model, path, adapter_name)
    else:
        source = str(path)
        with spec_ckpt.open_checkpoint(path, source=source, supported_features=FEATURES) as reader:
            check_fits(model.model, reader.header, source)
            ckpt = reader.load()
        options = {"autocast_adapter_dtype": autocast_adapter_dtype, "low_cpu_mem_usage": low_cpu_mem_usage}
        apply_checkpoint_to(model, ckpt, adapter_name, source, **options)
    set_trainable(model, adapter_name, is_trainable)


def set_trainable(model: RandLoraModel, adapter_name: str, is_trainable: bool) -> None:
    """After a load: the adapter trains, or it does not and the model goes to eval mode (dropout off, as PEFT)."""
    if is_trainable:
        model._trainable.add(adapter_name)
    else:
        model._trainable.discard(adapter_name)
        model.eval()
    model._apply_trainable()
