"""Reading a PEFT adapter directory: its files, read once each into one :class:`PeftDirectory`.

Every later step works on that snapshot, so no file is read or parsed twice, whichever steps run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from randlora_peft.layout import PEFT_CONFIG_NAME, PEFT_PICKLE_NAME, PEFT_WEIGHTS_NAME
from randlora_peft.sidecar import SIDECAR_NAME
from randlora_spec.errors import CheckpointError


def parse_json(raw: bytes, source: str) -> Any:
    """The JSON value in ``raw`` (UTF-8), or :class:`CheckpointError` naming ``source``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{source}: not valid JSON ({exc})") from None


def read_file(path: Path) -> bytes:
    """The bytes of the file at ``path``: every file randlora-peft reads is read by this function, once."""
    return path.read_bytes()


def read_json_file(path: Path, what: str) -> Any:
    """The JSON value in the file at ``path`` (``what`` it is, for messages)."""
    try:
        raw = read_file(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc})") from None
    return parse_json(raw, str(path))


@dataclass
class PeftDirectory:
    """The files of one PEFT adapter directory, read once: config (parsed), weights and sidecar (raw)."""

    path: Path
    config: dict[str, Any]
    weights: bytes | None
    """``adapter_model.safetensors``, or ``None`` when absent."""
    has_pickle: bool
    """``adapter_model.bin`` is present (it is never read)."""
    sidecar: bytes | None
    """``randlora_layers.json``, or ``None`` when absent."""
    config_bytes: int = 0
    """Size of ``adapter_config.json``."""

    @property
    def weights_source(self) -> str:
        """The weights file's path, for messages."""
        return str(self.path / PEFT_WEIGHTS_NAME)

    @property
    def sidecar_source(self) -> str:
        """The sidecar's path, for messages."""
        return str(self.path / SIDECAR_NAME)

    @property
    def size(self) -> int:
        """Bytes of the adapter files read (config, weights and sidecar)."""
        return self.config_bytes + len(self.weights or b"") + len(self.sidecar or b"")


def _config(directory: Path) -> tuple[dict[str, Any], int]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a PEFT adapter directory with {PEFT_CONFIG_NAME})")
    path = directory / PEFT_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {PEFT_CONFIG_NAME}; not a PEFT adapter directory")
    raw = read_file(path)
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data, len(raw)


def _optional(path: Path) -> bytes | None:
    return read_file(path) if path.is_file() else None


def read_peft_directory(peft_dir: str | Path) -> PeftDirectory:
    """Read the adapter files of ``peft_dir`` (config parsed as a JSON object, weights and sidecar as bytes)."""
    directory = Path(peft_dir)
    config, config_bytes = _config(directory)
    return PeftDirectory(
        path=directory,
        config=config,
        weights=_optional(directory / PEFT_WEIGHTS_NAME),
        has_pickle=(directory / PEFT_PICKLE_NAME).is_file(),
        sidecar=_optional(directory / SIDECAR_NAME),
        config_bytes=config_bytes,
    )


def read_peft_config(peft_dir: str | Path) -> dict[str, Any]:
    """The raw content of ``adapter_config.json`` in ``peft_dir`` (a JSON object)."""
    return _config(Path(peft_dir))[0]


def directory_bytes(peft_dir: str | Path) -> int:
    """Bytes of a PEFT adapter directory's adapter files (config, weights and our sidecar, when present)."""
    directory = Path(peft_dir)
    names = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, SIDECAR_NAME)
    return sum((directory / n).stat().st_size for n in names if (directory / n).is_file())
