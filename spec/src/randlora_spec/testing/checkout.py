"""Files of the source checkout that tests read (docs/errors.md, spec/golden), found once, here.

An editable install finds them next to this package; a regular install (what nox sessions test)
does not carry them, so the search continues from the working directory upwards, where the tests
of a checkout run. An environment variable names the file directly and wins over both.
"""

from __future__ import annotations

import os
from pathlib import Path

from randlora_spec.golden import MANIFEST_NAME, default_golden_dir

ERRORS_DOC_ENV = "RANDLORA_ERRORS_DOC"
"""Environment variable naming the error catalogue file (default: ``docs/errors.md`` of the checkout)."""


def checkout_file(relative: str, env_var: str | None = None) -> Path:
    """The file ``relative`` (a path from the repository root) of the source checkout.

    Args:
        relative: e.g. ``"docs/errors.md"``.
        env_var: an environment variable that, when set, names the file instead.

    Raises:
        FileNotFoundError: no checkout holding the file was found.
    """
    if env_var and os.environ.get(env_var):
        return Path(os.environ[env_var])
    here = Path(__file__).resolve().parents[4]  # spec/src/randlora_spec/testing/ -> the repository root
    cwd = Path.cwd().resolve()
    for root in (here, cwd, *cwd.parents):
        if (root / relative).is_file():
            return root / relative
    hint = f"; set {env_var}" if env_var else ""
    raise FileNotFoundError(f"{relative} not found next to {here} nor above {cwd} (run from a source checkout{hint})")


def errors_doc() -> Path:
    """The error catalogue, ``docs/errors.md`` (or ``$RANDLORA_ERRORS_DOC``)."""
    return checkout_file("docs/errors.md", ERRORS_DOC_ENV)


def golden_dir() -> Path:
    """The golden fixtures: :func:`randlora_spec.golden.default_golden_dir`, else ``spec/golden`` found as above."""
    try:
        return default_golden_dir()
    except FileNotFoundError:
        return checkout_file(f"spec/golden/{MANIFEST_NAME}").parent
