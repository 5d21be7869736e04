"""Every ```python block in the READMEs runs, so the documentation cannot rot.

Blocks of one README run in order in one namespace (later blocks may use earlier names), inside a
fresh temporary working directory so files they write never touch the checkout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", ROOT / "spec" / "README.md", *sorted((ROOT / "packages").glob("*/README.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_every_readme_has_a_runnable_example() -> None:
    missing = [str(p.relative_to(ROOT)) for p in READMES if not python_blocks(p)]
    assert not missing, f"READMEs without a python example: {missing}"


@pytest.mark.parametrize("readme", READMES, ids=[str(p.relative_to(ROOT)) for p in READMES])
def test_readme_examples_run(readme: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": f"readme_{readme.parent.name}"}
    for index, code in enumerate(python_blocks(readme)):
        try:
            exec(compile(code, f"{readme.relative_to(ROOT)}[block {index}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{readme.relative_to(ROOT)} block {index} failed: {exc!r}") from exc
    assert os.getcwd() == str(tmp_path)
