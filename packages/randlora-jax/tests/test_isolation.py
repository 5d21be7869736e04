"""randlora-jax never depends on torch: not imported by the source, not loaded, not installed in its venv."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "randlora_jax"
FORBIDDEN = ("torch", "randlora_core", "peft", "transformers", "bitsandbytes")


@pytest.mark.skipif(
    os.environ.get("RANDLORA_JAX_ISOLATED") != "1", reason="only in the isolated nox venv (set RANDLORA_JAX_ISOLATED=1)"
)
@pytest.mark.parametrize("name", FORBIDDEN)
def test_venv_lacks_torch_and_the_torch_packages(name: str) -> None:
    assert importlib.util.find_spec(name) is None


def test_source_never_imports_them() -> None:
    for path in SOURCE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & set(FORBIDDEN), f"{path.name} imports {roots}"


def test_importing_randlora_jax_loads_none_of_them_and_leaves_x64_off() -> None:
    code = (
        "import sys, jax, randlora_jax.driver; "
        "print(','.join(m for m in " + repr(FORBIDDEN) + " if m in sys.modules), jax.config.jax_enable_x64)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["False"]
