"""Hints for the command line when SRC is a file where a directory is expected, or the reverse.

The commonest slip is passing PEFT's ``adapter_model.safetensors`` instead of its directory, which
the spec's reader rejects as "not a randlora checkpoint"; these messages say what to pass instead.
"""

from __future__ import annotations

from pathlib import Path

from randlora_peft.layout import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from randlora_spec.errors import CheckpointError


def _is_peft_member(path: Path) -> bool:
    """``path`` is one of PEFT's files inside a PEFT adapter directory."""
    return path.name in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME) and (path.parent / PEFT_CONFIG_NAME).is_file()


def _single_checkpoint(directory: Path) -> Path | None:
    """The one ``.safetensors`` file directly in ``directory``, if there is exactly one."""
    try:
        found = [p for p in directory.iterdir() if p.suffix == ".safetensors" and p.is_file()]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


_ON_THE_DIRECTORY = {
    "convert": "convert the PEFT adapter: randlora-peft convert {} DST",
    "to-lora": "export the PEFT adapter: randlora-peft to-lora {} DST --rank R",
}


def peft_file_given(src: Path, command: str = "convert") -> CheckpointError | None:
    """The error for a SRC that is a file of a PEFT directory (whose directory should have been given), else ``None``.

    ``command`` (``convert`` or ``to-lora``): the CLI command the hint suggests running on the directory.
    """
    if not _is_peft_member(src):
        return None
    return CheckpointError(
        f"{src} is a file of the PEFT adapter directory {src.parent}, not a randlora checkpoint; "
        f"pass the directory to {_ON_THE_DIRECTORY[command].format(src.parent)}"
    )


def checkpoint_expected(src: Path) -> CheckpointError:
    """The error for ``--to-peft`` with a SRC that is not a file, with what to pass instead."""
    message = f"{src}: --to-peft needs a randlora checkpoint file"
    if src.is_dir() and (src / PEFT_CONFIG_NAME).is_file():
        message += f"; {src} is a PEFT adapter directory: convert it with --to-randlora (or without --to-peft)"
    elif src.is_dir() and (single := _single_checkpoint(src)) is not None:
        message += f"; {src} is a directory: did you mean the file {single}?"
    return CheckpointError(message)


def directory_expected(src: Path, flag: bool) -> CheckpointError:
    """The error for a PEFT-side SRC that is not a PEFT adapter directory (``flag``: ``--to-randlora`` was given)."""
    if src.is_dir():
        message = f"{src}: a directory without {PEFT_CONFIG_NAME}; not a PEFT adapter directory"
        single = _single_checkpoint(src)
        if single is not None:
            message += f"; to convert a randlora checkpoint to PEFT, pass the file: randlora-peft convert {single} DST"
        return CheckpointError(message)
    message = f"{src}: --to-randlora needs a PEFT adapter directory" if flag else f"{src}: no such file or directory"
    if src.is_file():
        message += (
            f"; {src} is a file of the PEFT adapter directory {src.parent}: pass the directory"
            if _is_peft_member(src)
            else f"; {src} is a file: to convert a randlora checkpoint to PEFT, use --to-peft"
        )
    return CheckpointError(message)


def file_expected(dst: Path) -> CheckpointError:
    """The error for a DST that is a directory when a checkpoint file is written."""
    return CheckpointError(
        f"{dst} is a directory; converting to randlora writes a .safetensors file (e.g. {dst / 'adapter.safetensors'})"
    )
