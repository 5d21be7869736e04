"""What ``randlora-peft convert`` does, in both directions, each a short pipeline.

Each input file is read once and parsed once; the output is encoded once and written once:

* PEFT -> randlora: the directory's files (:func:`~randlora_peft.directory.read_peft_directory`) ->
  the checkpoint (:func:`~randlora_peft.reader.checkpoint_from_directory`) -> validated as an object
  and encoded once (:func:`~randlora_peft._spec_seam.encode_checkpoint`) -> DST.
* randlora -> PEFT: the file's bytes -> the validated checkpoint
  (:func:`~randlora_peft._spec_seam.read_checkpoint`) -> the PEFT directory's files
  (:func:`~randlora_peft.writer.peft_directory_files`) -> DST.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randlora_peft import _spec_seam as seam
from randlora_peft import directory, hints
from randlora_peft.layout import PEFT_CONFIG_NAME
from randlora_peft.peft_bases import MachineDependentBasesWarning
from randlora_peft.publish import publish_directory, publish_file
from randlora_peft.reader import ReadOptions, checkpoint_from_directory
from randlora_peft.shapes import LayerShape, layer_shapes_from_json
from randlora_peft.writer import peft_directory_files
from randlora_spec.checkpoint import AdapterCheckpoint
from randlora_spec.errors import CheckpointError

Progress = Callable[[str], None]
"""Called with a short description as each stage of a conversion begins."""


def _silent(message: str) -> None:
    """A :data:`Progress` that reports nothing."""


@dataclass
class Outcome:
    """What a conversion did: direction, paths, sizes in bytes, PEFT's bookkeeping carried and the warnings raised."""

    direction: str
    src: Path
    dst: Path
    before: int
    after: int
    warnings: list[str] = field(default_factory=list)
    bookkeeping: dict[str, Any] = field(default_factory=dict)


def model_from_config(location: Path, adapter_config: dict[str, Any]) -> nn.Module:
    """The base model built from a local transformers config on the meta device (no weights, no network).

    The class is ``AutoModelForCausalLM`` when the config has one, else ``AutoModel``; nothing the
    adapter's files name (``auto_mapping``) is imported or called. ``adapter_config`` is accepted
    for compatibility and not used.
    """
    import transformers

    directory = location.parent if location.is_file() else location
    if not directory.is_dir():
        raise CheckpointError(f"--base-model {location}: not a local directory or config.json file")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--base-model {location}: cannot read a transformers config ({exc})") from None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model: nn.Module = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        except ValueError:
            model = transformers.AutoModel.from_config(config, trust_remote_code=False)
        return model


def direction_of(args: argparse.Namespace) -> str:
    """``"to-peft"`` or ``"to-randlora"``: as forced by the flags, else what SRC is."""
    src: Path = args.src
    if args.to_peft or args.to_randlora:
        return "to-peft" if args.to_peft else "to-randlora"
    if src.is_dir() and (src / PEFT_CONFIG_NAME).is_file():
        return "to-randlora"
    if src.is_file():
        return "to-peft"
    raise hints.directory_expected(src, flag=False)


def _layer_shapes(args: argparse.Namespace) -> dict[str, LayerShape] | None:
    if args.layer_shapes is None:
        return None
    return layer_shapes_from_json(directory.read_json_file(args.layer_shapes, "layer shapes"), str(args.layer_shapes))


def to_randlora(args: argparse.Namespace, progress: Progress = _silent) -> Outcome:
    """PEFT directory SRC -> randlora checkpoint file DST (PEFT's bookkeeping travels in the config, SPEC 2.1)."""
    src, dst = args.src, args.dst
    if not src.is_dir():
        raise hints.directory_expected(src, flag=True)
    progress(f"reading PEFT adapter {src}")
    snapshot = directory.read_peft_directory(src)
    if args.base_model is not None:
        progress(f"building the base model from {args.base_model} on the meta device")
    model = model_from_config(args.base_model, snapshot.config) if args.base_model is not None else None
    options = ReadOptions(model, _layer_shapes(args), args.adapter_name, not args.no_regenerate, not args.no_compact_bases)
    progress("converting")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MachineDependentBasesWarning)
        ckpt = checkpoint_from_directory(snapshot, options)
    progress("validating and encoding")
    blob = seam.encode_checkpoint(ckpt)
    if dst.is_dir():
        raise hints.file_expected(dst)
    progress(f"writing {dst}")
    publish_file(blob, dst, overwrite=args.overwrite)
    notes = [str(w.message) for w in caught if issubclass(w.category, MachineDependentBasesWarning)]
    return Outcome("to-randlora", src, dst, snapshot.size, len(blob), notes, ckpt.config.bookkeeping())


def read_checkpoint_file(src: Path, command: str = "convert") -> tuple[AdapterCheckpoint, int]:
    """``(checkpoint, size in bytes)`` of our checkpoint file ``src``, read once.

    A file of a PEFT directory given instead gets a hint to pass the directory to ``command``.
    """
    blob = directory.read_file(src)
    try:
        ckpt = seam.read_checkpoint(blob, str(src))
    except CheckpointError:
        hint = hints.peft_file_given(src, command)
        if hint is None:
            raise
        raise hint from None
    return ckpt, len(blob)


def to_peft(args: argparse.Namespace, progress: Progress = _silent) -> Outcome:
    """Our checkpoint file SRC -> PEFT directory DST, with the bookkeeping SRC's config carries (the flags override it)."""
    src, dst = args.src, args.dst
    if not src.is_file():
        raise hints.checkpoint_expected(src)
    progress(f"reading randlora checkpoint {src}")
    ckpt, size = read_checkpoint_file(src)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory; --to-peft writes a directory")
    flags = {"task_type": args.task_type, "base_model_name_or_path": args.base_model_name_or_path}
    info = {k: v for k, v in flags.items() if v is not None}
    progress("encoding PEFT's files")
    files = peft_directory_files(ckpt, per_layer_bases=args.per_layer_bases, peft_info=info, source=str(src))
    progress(f"writing {dst}")
    publish_directory(files, dst, overwrite=args.overwrite)
    bookkeeping = {**ckpt.config.bookkeeping(), **info}
    return Outcome("to-peft", src, dst, size, sum(len(b) for b in files.values()), bookkeeping=bookkeeping)


def run_convert(args: argparse.Namespace, progress: Progress = _silent) -> Outcome:
    """Run ``convert`` for parsed arguments; raises a :class:`~randlora_spec.errors.RandLoraError` on bad input."""
    direction = direction_of(args)
    if args.dst.exists() and not args.overwrite:
        raise CheckpointError(f"{args.dst} exists; pass --overwrite to replace it")
    return to_randlora(args, progress) if direction == "to-randlora" else to_peft(args, progress)
