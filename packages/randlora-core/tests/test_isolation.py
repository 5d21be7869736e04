"""randlora-core must not depend on peft, transformers or bitsandbytes, not even optionally.

That no source file imports them is an import-linter contract (.importlinter, run by nox -s lint);
these tests check the installed package at run time.
"""

from __future__ import annotations

import importlib
import os

import pytest

FORBIDDEN = ("peft", "transformers", "bitsandbytes")


@pytest.mark.skipif(
    os.environ.get("RANDLORA_CORE_ISOLATED") != "1", reason="only in the isolated nox venv (set RANDLORA_CORE_ISOLATED=1)"
)
@pytest.mark.parametrize("name", FORBIDDEN)
def test_venv_lacks_optional_frameworks(name: str) -> None:
    with pytest.raises(ImportError):
        importlib.import_module(name)


def test_importing_core_loads_none_of_them() -> None:
    import subprocess
    import sys

    code = "import sys, randlora_core; print(','.join(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == ""
