"""The README's QLoRA example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    monkeypatch.chdir(tmp_path)  # it writes adapter.safetensors
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "adapter.safetensors").is_file()
