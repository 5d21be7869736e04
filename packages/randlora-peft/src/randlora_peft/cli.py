"""The ``randlora-peft`` command line.

``randlora-peft convert SRC DST`` converts between a PEFT RandLoRA adapter directory and a
randlora checkpoint file (format v1), in the direction SRC implies (a directory holding
``adapter_config.json`` -> a ``.safetensors`` file of ours; a ``.safetensors`` file of ours -> a
PEFT directory), or as ``--to-randlora`` / ``--to-peft`` say. It prints both sizes in bytes and
their ratio. ``randlora-peft to-lora SRC DST --rank R`` exports a RandLoRA adapter as a PEFT LoRA
directory (:mod:`randlora_peft.lora_command`). Both commands take ``--json`` (one JSON object on
stdout, the result or the error) and ``--quiet`` (nothing on success). Exit status: 0 on success, 1 when
the command fails (rejected input, or an operating-system error such as a full disk), 2 for
usage errors. Every failure prints one line, ``randlora-peft: error: ...``, never a traceback
(set ``RANDLORA_PEFT_TRACEBACK=1`` to get one when debugging); a usage error's line names the
command (``randlora-peft convert: error: ...``) and points to its ``--help``.

This module imports only the standard library at import time, so ``--help`` and ``--version`` are
fast; the conversion's modules (torch, PEFT) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from randlora_peft import __version__, lora_command

if TYPE_CHECKING:
    from randlora_peft.commands import Outcome

PROG = "randlora-peft"
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line too (the usage itself is under ``--help``)."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG [command]: error: message (see ... --help)`` and exit with :data:`EXIT_USAGE`."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Bridge between PEFT's RandLoRA and randlora checkpoints.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
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
    conv.add_argument(
        "--task-type", help="to PEFT: task_type for adapter_config.json (e.g. CAUSAL_LM; default: the one SRC carries)"
    )
    conv.add_argument(
        "--base-model-name-or-path", help="to PEFT: base_model_name_or_path for adapter_config.json (default: SRC's)"
    )
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
    add_output_flags(conv)
    conv.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress lines on stderr (auto: when stderr is a terminal and neither --quiet nor --json is given)",
    )
    add_output_flags(lora_command.add_parser(sub))
    return parser


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--json``, which every command takes (they exclude each other)."""
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--quiet", "-q", action="store_true", help="print nothing on success (errors still go to stderr)")
    output.add_argument("--json", action="store_true", help="print one JSON object (the result, or the error) on stdout")


class Progress:
    """Stage lines (``[  1.2s] reading ...``) on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        """``enabled``: print at all; ``stream``: where (default stderr)."""
        self.enabled = enabled
        self.stream = stream
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        """Report that the stage ``message`` begins."""
        if self.enabled:
            print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=self.stream or sys.stderr, flush=True)


def _progress_for(args: argparse.Namespace) -> Progress:
    if args.progress == "always":
        return Progress(True)
    if args.progress == "never" or args.quiet or args.json:
        return Progress(False)
    return Progress(sys.stderr.isatty())


def _format_sizes(before: int, after: int, src_desc: str, dst_desc: str) -> list[str]:
    ratio = after / before if before else float("inf")
    factor = f"{1 / ratio:.2f}x smaller" if 0 < ratio <= 1 else f"{ratio:.2f}x larger"
    return [
        f"before: {before:>14,d} bytes  {src_desc}",
        f"after:  {after:>14,d} bytes  {dst_desc}",
        f"ratio:  {ratio:.4f} (after / before; {factor})",
    ]


def _text_report(outcome: Outcome) -> list[str]:
    peft_desc, ours_desc = "(PEFT adapter directory)", "(randlora checkpoint)"
    if outcome.direction == "to-randlora":
        head = f"converted PEFT adapter {outcome.src} -> randlora checkpoint {outcome.dst}"
        return [head, *_format_sizes(outcome.before, outcome.after, peft_desc, ours_desc)]
    head = f"converted randlora checkpoint {outcome.src} -> PEFT adapter {outcome.dst}"
    return [head, *_format_sizes(outcome.before, outcome.after, ours_desc, peft_desc)]


def _json_report(outcome: Outcome) -> dict[str, Any]:
    return {
        "ok": True,
        "direction": outcome.direction,
        "src": str(outcome.src),
        "dst": str(outcome.dst),
        "before_bytes": outcome.before,
        "after_bytes": outcome.after,
        "ratio": outcome.after / outcome.before if outcome.before else None,
        "bookkeeping": outcome.bookkeeping,
        "warnings": outcome.warnings,
    }


def convert(args: argparse.Namespace, out: Any = None) -> int:
    """Run ``convert`` for parsed arguments, reporting to ``out`` (default: stdout); returns the exit status.

    Raises the conversion's errors (:class:`~randlora_spec.errors.RandLoraError`, ``OSError``);
    :func:`main` turns them into one line and a non-zero status.
    """
    from randlora_peft.commands import run_convert

    out = sys.stdout if out is None else out
    outcome = run_convert(args, _progress_for(args))
    if args.json:
        print(json.dumps(_json_report(outcome)), file=out)
        return 0
    for note in outcome.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if not args.quiet:
        print("\n".join(_text_report(outcome)), file=out)
    return 0


def model_from_config(location: Path, adapter_config: dict[str, Any]) -> Any:
    """The base model built from a local transformers config on the meta device (see :mod:`randlora_peft.commands`)."""
    from randlora_peft.commands import model_from_config as build

    return build(location, adapter_config)


def describe_error(exc: BaseException) -> str:
    """One line naming what failed: the error's message, with the path and reason for an OS error."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    from randlora_spec.errors import RandLoraError

    return text if isinstance(exc, RandLoraError) else f"{type(exc).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``randlora-peft`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return lora_command.run(args) if args.command == lora_command.COMMAND else convert(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("RANDLORA_PEFT_TRACEBACK") == "1":
            raise
        message = describe_error(exc)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "error": message, "exit_status": EXIT_FAILED}))
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
