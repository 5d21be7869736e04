"""The ``randlora-peft to-lora SRC DST --rank R`` command: any RandLoRA adapter as a PEFT LoRA directory.

Only the standard library is imported here, so registering the command costs the CLI nothing; the
export (:mod:`randlora_peft.lora_export`, torch) is imported when the command runs. The command
prints one line per layer and a total: the LoRA rank, the captured energy and the relative
Frobenius error of delta-W (``--json``: the same as one JSON object; ``--quiet``: nothing). DST
is put in place as a whole (:func:`randlora_peft.publish.publish_directory`): a failed export
leaves no DST, or the old one untouched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO, TypeVar

COMMAND = "to-lora"
ParserT = TypeVar("ParserT", bound=argparse.ArgumentParser)
"""The CLI's parser class (its subparsers make parsers of the same class)."""


def _rank(text: str) -> int | float:
    """``--rank``: an integer (the LoRA rank) or a float in (0, 1] (the energy each layer keeps)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_parser(sub: argparse._SubParsersAction[ParserT]) -> ParserT:
    """Register ``to-lora`` on the CLI's subparsers; returns its parser (the CLI adds ``--quiet``/``--json``)."""
    parser = sub.add_parser(
        COMMAND,
        help="export a RandLoRA adapter as a PEFT LoRA adapter (truncated SVD of each delta-W)",
        description="Write SRC (a randlora checkpoint file, a RandLoraModel.save_pretrained directory or a PEFT "
        "RandLoRA directory) as a PEFT LoRA adapter directory DST: each layer's delta-W cut to rank R by a "
        "truncated SVD. Prints the captured energy and relative Frobenius error per layer and in total. A PEFT "
        "directory whose layer sizes its files do not record: convert it first (randlora-peft convert --base-model).",
    )
    parser.add_argument("src", type=Path, help="randlora checkpoint file, save_pretrained directory, or PEFT RandLoRA directory")
    parser.add_argument("dst", type=Path, help="output: a PEFT LoRA adapter directory")
    parser.add_argument(
        "--rank", type=_rank, required=True, help="LoRA rank (integer), or the share of energy to keep per layer (0 < R <= 1)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the adapter files DST already holds")
    return parser


def _json_report(args: argparse.Namespace, export: Any) -> dict[str, Any]:
    layers = [
        {
            "path": layer.path,
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": layer.rank,
            "captured_energy": layer.captured_energy,
            "relative_error": layer.relative_error,
        }
        for layer in export.layers
    ]
    return {
        "ok": True,
        "command": COMMAND,
        "src": str(args.src),
        "dst": str(args.dst),
        "layers": layers,
        "captured_energy": export.captured_energy,
        "relative_error": export.relative_error,
    }


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``to-lora`` for parsed arguments, reporting to ``out`` (default: stdout); returns the exit status."""
    from randlora_peft.lora_export import save_as_lora

    out = sys.stdout if out is None else out
    export = save_as_lora(args.src, args.dst, args.rank, overwrite=args.overwrite)
    if getattr(args, "json", False):
        print(json.dumps(_json_report(args, export)), file=out)
        return 0
    if getattr(args, "quiet", False):
        return 0
    print(f"exported {args.src} -> PEFT LoRA adapter {args.dst}", file=out)
    for layer in export.layers:
        print(
            f"  {layer.path}: {layer.in_features}x{layer.out_features}, rank {layer.rank}, "
            f"energy {layer.captured_energy:.4f}, relative error {layer.relative_error:.4f}",
            file=out,
        )
    print(
        f"total: {len(export.layers)} layers, energy {export.captured_energy:.4f}, "
        f"relative Frobenius error of delta-W {export.relative_error:.4f}",
        file=out,
    )
    return 0
