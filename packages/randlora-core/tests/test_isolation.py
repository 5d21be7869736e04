"""randlora-core must not depend on peft, transformers or bitsandbytes, not even optionally."""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

FORBIDDEN = ("peft", "transformers", "bitsandbytes")
SOURCE = Path(__file__).resolve().parents[1] / "src" / "randlora_core"


@pytest.mark.skipif(
    os.environ.get("RANDLORA_CORE_ISOLATED") != "1", reason="only in the isolated nox venv (set RANDLORA_CORE_ISOLATED=1)"
)
@pytest.mark.parametrize("name", FORBIDDEN)
def test_venv_lacks_optional_frameworks(name: str) -> None:
    with pytest.raises(ImportError):
        importlib.import_module(name)


def test_source_never_imports_them() -> None:
    for path in SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not set(roots) & set(FORBIDDEN), f"{path.name} imports {roots}"


def test_importing_core_loads_none_of_them() -> None:
    import subprocess
    import sys

    code = "import sys, randlora_core; print(','.join(m for m in ('peft', 'transformers', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == ""
