"""What ``randlora-peft convert`` does, in both directions, each a short pipeline.

Each input file is read once and parsed once; the output is encoded once and written once:

* PEFT -> randlora: the directory's files (:func:`~randlora_peft.directory.read_peft_directory`) ->
  the checkpoint (:func:`~randlora_peft.reader.checkpoint_from_directory`) -> its bytes, validated
  (:func:`~randlora_peft._spec_seam.encode_checkpoint`) -> DST.
* randlora -> PEFT: the file's bytes -> the validated checkpoint
  (:func:`~randlora_peft._spec_seam.read_checkpoint`) -> the PEFT directory's files
  (:func:`~randlora_peft.writer.peft_directory_files`) -> DST.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randlora_peft import _spec_seam as seam
from randlora_peft import directory
from randlora_peft.layout import PEFT_CONFIG_NAME
from randlora_peft.peft_bases import MachineDependentBasesWarning
from randlora_peft.reader import ReadOptions, checkpoint_from_directory
from randlora_peft.shapes import LayerShape, layer_shapes_from_json
from randlora_peft.writer import peft_directory_files, publish
from randlora_spec.errors import CheckpointError
from randlora_spec.safetensors_io import atomic_write_bytes


@dataclass
class Outcome:
    """What a conversion did: direction, paths, sizes in bytes and the warnings it raised."""

    direction: str
    src: Path
    dst: Path
    before: int
    after: int
    warnings: list[str] = field(default_factory=list)


def model_from_config(location: Path, adapter_config: dict[str, Any]) -> nn.Module:
    """The base model built from a local transformers config on the meta device (no weights, no network).

    The class is ``AutoModelForCausalLM`` when the config has one, else ``AutoModel``.
    """
    import transformers

    directory = location.parent if location.is_file() else location
    if not directory.is_dir():
        raise CheckpointError(f"--base-model {location}: not a local directory or config.json file")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--base-model {location}: cannot read a transformers config ({exc})") from None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            return transformers.AutoModel.from_config(config)


def direction_of(args: argparse.Namespace) -> str:
    """``"to-peft"`` or ``"to-randlora"``: as forced by the flags, else what SRC is."""
    src: Path = args.src
    if args.to_peft or args.to_randlora:
        return "to-peft" if args.to_peft else "to-randlora"
    if src.is_dir():
        if (src / PEFT_CONFIG_NAME).is_file():
            return "to-randlora"
        raise CheckpointError(f"{src}: a directory without {PEFT_CONFIG_NAME}; not a PEFT adapter directory")
    if src.is_file():
        return "to-peft"
    raise CheckpointError(f"{src}: no such file or directory")


def _layer_shapes(args: argparse.Namespace) -> dict[str, LayerShape] | None:
    if args.layer_shapes is None:
        return None
    return layer_shapes_from_json(directory.read_json_file(args.layer_shapes, "layer shapes"), str(args.layer_shapes))


def to_randlora(args: argparse.Namespace) -> Outcome:
    """PEFT directory SRC -> randlora checkpoint file DST."""
    src, dst = args.src, args.dst
    if not src.is_dir():
        raise CheckpointError(f"{src}: --to-randlora needs a PEFT adapter directory")
    snapshot = directory.read_peft_directory(src)
    model = model_from_config(args.base_model, snapshot.config) if args.base_model is not None else None
    options = ReadOptions(model, _layer_shapes(args), args.adapter_name, not args.no_regenerate, not args.no_compact_bases)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MachineDependentBasesWarning)
        ckpt = checkpoint_from_directory(snapshot, options)
    blob = seam.encode_checkpoint(ckpt)
    if dst.is_dir():
        raise CheckpointError(f"{dst} is a directory; --to-randlora writes a .safetensors file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst, blob)
    notes = [str(w.message) for w in caught if issubclass(w.category, MachineDependentBasesWarning)]
    return Outcome("to-randlora", src, dst, snapshot.size, len(blob), notes)


def to_peft(args: argparse.Namespace) -> Outcome:
    """Our checkpoint file SRC -> PEFT directory DST."""
    src, dst = args.src, args.dst
    if not src.is_file():
        raise CheckpointError(f"{src}: --to-peft needs a randlora checkpoint file")
    blob = directory.read_file(src)
    ckpt, _ = seam.read_checkpoint(blob, str(src))
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory; --to-peft writes a directory")
    info = {"task_type": args.task_type, "base_model_name_or_path": args.base_model_name_or_path}
    files = peft_directory_files(
        ckpt, per_layer_bases=args.per_layer_bases, peft_info={k: v for k, v in info.items() if v is not None}
    )
    publish(files, dst)
    return Outcome("to-peft", src, dst, len(blob), sum(len(b) for b in files.values()))


def run_convert(args: argparse.Namespace) -> Outcome:
    """Run ``convert`` for parsed arguments; raises a :class:`~randlora_spec.errors.RandLoraError` on bad input."""
    direction = direction_of(args)
    if args.dst.exists() and not args.overwrite:
        raise CheckpointError(f"{args.dst} exists; pass --overwrite to replace it")
    return to_randlora(args) if direction == "to-randlora" else to_peft(args)
