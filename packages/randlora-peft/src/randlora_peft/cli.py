"""The ``randlora-peft`` command line.

``randlora-peft convert SRC DST`` converts between a PEFT RandLoRA adapter directory and a
randlora checkpoint file (format v1), in the direction SRC implies (a directory holding
``adapter_config.json`` -> a ``.safetensors`` file of ours; a ``.safetensors`` file of ours -> a
PEFT directory), or as ``--to-randlora`` / ``--to-peft`` say. It prints both sizes in bytes and
their ratio. Exit status: 0 on success, 1 when the input is rejected, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from randlora_peft import lora_command
from randlora_peft.convert import (
    PEFT_CONFIG_NAME,
    LayerShape,
    MachineDependentBasesWarning,
    directory_bytes,
    read_peft_adapter,
    read_peft_config,
    size_ratio,
    write_peft_adapter,
)
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PORTABLE_RULE
from randlora_spec.errors import CheckpointError, RandLoraError
from randlora_spec.safetensors_io import atomic_write_bytes

PROG = "randlora-peft"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Bridge between PEFT's RandLoRA and randlora checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert",
        help="convert a PEFT adapter directory <-> a randlora checkpoint file",
        description="Convert between a PEFT RandLoRA adapter directory and a randlora checkpoint (.safetensors). "
        "The direction follows from SRC unless --to-peft/--to-randlora is given. Prints both sizes.",
    )
    conv.add_argument("src", type=Path, help="PEFT adapter directory, or randlora .safetensors file")
    conv.add_argument("dst", type=Path, help="output: .safetensors file (to randlora) or directory (to PEFT)")
    direction = conv.add_mutually_exclusive_group()
    direction.add_argument("--to-randlora", action="store_true", help="SRC is a PEFT directory; write our checkpoint")
    direction.add_argument("--to-peft", action="store_true", help="SRC is our checkpoint; write a PEFT directory")
    conv.add_argument(
        "--base-model",
        type=Path,
        help="local directory (or config.json) of the base model's transformers config; gives the layer shapes "
        "PEFT's files lack (the model is built on the meta device, no weights are read)",
    )
    conv.add_argument(
        "--layer-shapes",
        type=Path,
        help="JSON file mapping module path -> [in_features, out_features(, fan_in_fan_out)]",
    )
    conv.add_argument(
        "--adapter-name",
        default="default",
        help="to randlora: adapter name recorded in the checkpoint, and the one selected if the "
        "PEFT keys name several (default: default)",
    )
    conv.add_argument(
        "--per-layer-bases", action="store_true", help="to PEFT: also write PEFT's redundant per-layer copies of the bases"
    )
    conv.add_argument("--task-type", help="to PEFT: task_type for adapter_config.json (e.g. CAUSAL_LM)")
    conv.add_argument("--base-model-name-or-path", help="to PEFT: base_model_name_or_path for adapter_config.json")
    conv.add_argument(
        "--no-regenerate",
        action="store_true",
        help="to randlora: refuse save_projection=False PEFT adapters instead of regenerating their bases with PEFT",
    )
    conv.add_argument(
        "--no-compact-bases",
        action="store_true",
        help="to randlora: store PEFT's bases in their file dtype (float32) even when bfloat16 holds them exactly",
    )
    conv.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    lora_command.add_parser(sub)
    return parser


def _load_layer_shapes(path: Path) -> dict[str, LayerShape]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read layer shapes ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: layer shapes must be a JSON object of module path -> shape")
    shapes: dict[str, LayerShape] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = [value.get("in_features"), value.get("out_features"), bool(value.get("fan_in_fan_out", False))]
        if not isinstance(value, list) or len(value) not in (2, 3) or not all(isinstance(v, (int, bool)) for v in value):
            raise CheckpointError(f"{path}: shape of {key!r} must be [in_features, out_features(, fan_in_fan_out)]")
        shapes[key] = (int(value[0]), int(value[1]), bool(value[2])) if len(value) == 3 else (int(value[0]), int(value[1]))
    return shapes


def model_from_config(location: Path, adapter_config: dict[str, Any]) -> nn.Module:
    """The base model built from a local transformers config on the meta device (no weights, no network).

    The class is the adapter config's ``auto_mapping.base_model_class`` when it names a transformers
    class, else ``AutoModelForCausalLM``, else ``AutoModel``.
    """
    import transformers

    directory = location.parent if location.is_file() else location
    if not directory.is_dir():
        raise CheckpointError(f"--base-model {location}: not a local directory or config.json file")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--base-model {location}: cannot read a transformers config ({exc})") from None
    auto = adapter_config.get("auto_mapping") or {}
    cls = None
    library, name = auto.get("parent_library"), auto.get("base_model_class")
    if isinstance(library, str) and isinstance(name, str) and library.startswith("transformers."):
        try:
            cls = getattr(importlib.import_module(library), name, None)
        except ImportError:
            cls = None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is not None:
            return cls(config)
        try:
            return transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            return transformers.AutoModel.from_config(config)


def _format_sizes(before: int, after: int, src_desc: str, dst_desc: str) -> list[str]:
    ratio = size_ratio(before, after)
    factor = f"{1 / ratio:.2f}x smaller" if 0 < ratio <= 1 else f"{ratio:.2f}x larger"
    return [
        f"before: {before:>14,d} bytes  {src_desc}",
        f"after:  {after:>14,d} bytes  {dst_desc}",
        f"ratio:  {ratio:.4f} (after / before; {factor})",
    ]


def _direction(args: argparse.Namespace) -> str:
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


def convert(args: argparse.Namespace, out: Any = None) -> int:
    """Run ``convert`` for parsed arguments, reporting to ``out`` (default: stdout); returns the exit status."""
    out = sys.stdout if out is None else out
    direction = _direction(args)
    src: Path = args.src
    dst: Path = args.dst
    if dst.exists() and not args.overwrite:
        raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
    if direction == "to-randlora":
        if not src.is_dir():
            raise CheckpointError(f"{src}: --to-randlora needs a PEFT adapter directory")
        model = None
        shapes = None
        if args.base_model is not None:
            model = model_from_config(args.base_model, read_peft_config(src))
        if args.layer_shapes is not None:
            shapes = _load_layer_shapes(args.layer_shapes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MachineDependentBasesWarning)
            ckpt = read_peft_adapter(
                src,
                model=model,
                layer_shapes=shapes,
                adapter_name=args.adapter_name,
                regenerate_missing_bases=not args.no_regenerate,
                compact_bases=not args.no_compact_bases,
            )
        for w in caught:
            if issubclass(w.category, MachineDependentBasesWarning):
                print(f"warning: {w.message}", file=sys.stderr)
        blob = spec_ckpt.to_bytes(ckpt)
        if dst.is_dir():
            raise CheckpointError(f"{dst} is a directory; --to-randlora writes a .safetensors file")
        dst.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dst, blob)
        before, after = directory_bytes(src), dst.stat().st_size
        print(f"converted PEFT adapter {src} -> randlora checkpoint {dst}", file=out)
        lines = _format_sizes(before, after, "(PEFT adapter directory)", "(randlora checkpoint)")
    else:
        if not src.is_file():
            raise CheckpointError(f"{src}: --to-peft needs a randlora checkpoint file")
        ckpt = spec_ckpt.load(src, supported_basis_rules=(PORTABLE_RULE,))
        if dst.exists() and not dst.is_dir():
            raise CheckpointError(f"{dst} exists and is not a directory; --to-peft writes a directory")
        info = {"task_type": args.task_type, "base_model_name_or_path": args.base_model_name_or_path}
        info = {k: v for k, v in info.items() if v is not None}
        write_peft_adapter(ckpt, dst, per_layer_bases=args.per_layer_bases, peft_info=info)
        before, after = src.stat().st_size, directory_bytes(dst)
        print(f"converted randlora checkpoint {src} -> PEFT adapter {dst}", file=out)
        lines = _format_sizes(before, after, "(randlora checkpoint)", "(PEFT adapter directory)")
    for line in lines:
        print(line, file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``randlora-peft`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            return convert(args)
        if args.command == lora_command.COMMAND:
            return lora_command.run(args)
    except RandLoraError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
