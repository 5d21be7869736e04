"""The ``randlora-peft`` command line.

``randlora-peft convert SRC DST`` converts between a PEFT RandLoRA adapter directory and a
randlora checkpoint file (format v1), in the direction SRC implies (a directory holding
``adapter_config.json`` -> a ``.safetensors`` file of ours; a ``.safetensors`` file of ours -> a
PEFT directory), or as ``--to-randlora`` / ``--to-peft`` say. It prints both sizes in bytes and
their ratio. Exit status: 0 on success, 1 when the input is rejected, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from randlora_peft import commands
from randlora_peft.commands import Outcome
from randlora_peft.convert import size_ratio
from randlora_spec.errors import RandLoraError

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
    return parser


def _format_sizes(before: int, after: int, src_desc: str, dst_desc: str) -> list[str]:
    ratio = size_ratio(before, after)
    factor = f"{1 / ratio:.2f}x smaller" if 0 < ratio <= 1 else f"{ratio:.2f}x larger"
    return [
        f"before: {before:>14,d} bytes  {src_desc}",
        f"after:  {after:>14,d} bytes  {dst_desc}",
        f"ratio:  {ratio:.4f} (after / before; {factor})",
    ]


def _report(outcome: Outcome, out: Any) -> None:
    for note in outcome.warnings:
        print(f"warning: {note}", file=sys.stderr)
    peft_desc, ours_desc = "(PEFT adapter directory)", "(randlora checkpoint)"
    if outcome.direction == "to-randlora":
        print(f"converted PEFT adapter {outcome.src} -> randlora checkpoint {outcome.dst}", file=out)
        lines = _format_sizes(outcome.before, outcome.after, peft_desc, ours_desc)
    else:
        print(f"converted randlora checkpoint {outcome.src} -> PEFT adapter {outcome.dst}", file=out)
        lines = _format_sizes(outcome.before, outcome.after, ours_desc, peft_desc)
    for line in lines:
        print(line, file=out)


def convert(args: argparse.Namespace, out: Any = None) -> int:
    """Run ``convert`` for parsed arguments, reporting to ``out`` (default: stdout); returns the exit status."""
    _report(commands.run_convert(args), sys.stdout if out is None else out)
    return 0


def model_from_config(location: Path, adapter_config: dict[str, Any]) -> Any:
    """The base model built from a local transformers config on the meta device (see :mod:`randlora_peft.commands`)."""
    return commands.model_from_config(location, adapter_config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``randlora-peft`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "convert":
            return convert(args)
    except RandLoraError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - argparse enforces a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
