"""Command line of the benchmark: ``python tools/bench [--smoke] ...`` (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

if not __package__:
    # Run as `python tools/bench`: Python put this folder on sys.path; its parent makes the package
    # importable instead, without letting the module names here shadow anything else.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import bench
from bench.bases_suite import bases_rng_suite, write_bases_report
from bench.calibration import calibrate
from bench.features import run_features
from bench.machine import environment, machine_name
from bench.memory import memory_server
from bench.report import report_from
from bench.run import Settings, output_dir, run


def parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(prog=f"python {bench.COMMAND}", description=(bench.__doc__ or "").splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds): proves the benchmark runs")
    p.add_argument("--out", type=Path, default=None, help="output directory (default bench/results, smoke: a temp dir)")
    p.add_argument("--machine", default=None, help="name of the results files (default cpu-<n>core)")
    p.add_argument(
        "--repeats",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="timed rounds per case (default 3 15, smoke 1 2)",
    )
    p.add_argument("--case-budget", type=float, default=None, help="seconds of timed rounds per case (default 12, smoke 0.5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method before timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory suite")
    p.add_argument("--quiet-wait", type=float, default=None, help="max seconds to wait for other CPU users before a case (120)")
    p.add_argument("--max-others", type=float, default=0.15, help="re-time a case if others used more of the CPU (0.15)")
    p.add_argument("--retries", type=int, default=None, help="re-timings per case at most (2; smoke 0)")
    p.add_argument("--only", default=None, help="run only cases whose label contains this text")
    p.add_argument("--calibrate", action="store_true", help="fit/check the cost model of randlora_core.compute")
    p.add_argument("--bases-only", action="store_true", help="only the basis-generation suite (writes <machine>-bases.md)")
    p.add_argument(
        "--features",
        action="store_true",
        help="only the round-2 and beyond-PEFT suites (sparse bases, decode, mixed batches, compile, loading);"
        " a --smoke run includes them at tiny sizes",
    )
    p.add_argument("--memory-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--report-from", type=Path, default=None, help="rewrite the report of an earlier run from its JSON (no measuring)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or calibrate, re-render a report, serve memory measurements) as the flags say."""
    args = parser().parse_args(argv)
    if args.memory_server:
        return memory_server()
    if args.report_from is not None:
        print(f"[bench] wrote {report_from(args.report_from)}")
        return 0
    warnings.filterwarnings("ignore")
    out = output_dir(args.out, args.smoke)
    machine = args.machine or machine_name()
    if args.calibrate:
        print(f"[bench] wrote {calibrate(out, machine, args.smoke)}")
        return 0
    if args.bases_only:
        data = bases_rng_suite(args.smoke)
        data["environment"] = environment()
        print(f"[bench] wrote {write_bases_report(out, machine, data)}")
        return 0
    if args.features:
        print(f"[bench] wrote {run_features(out, machine, args.smoke)}")
        return 0
    settings = Settings(
        smoke=args.smoke,
        repeats=tuple(args.repeats) if args.repeats else ((1, 2) if args.smoke else (3, 15)),
        budget_s=args.case_budget if args.case_budget is not None else (0.5 if args.smoke else 12.0),
        warmup=args.warmup,
        quiet_wait_s=args.quiet_wait if args.quiet_wait is not None else (0.0 if args.smoke else 120.0),
        max_others=args.max_others,
        retries=args.retries if args.retries is not None else (0 if args.smoke else 2),
    )
    run(settings, out, machine, args.only, not args.no_memory)
    if args.smoke:
        print(f"[bench] wrote {run_features(out, machine, smoke=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
