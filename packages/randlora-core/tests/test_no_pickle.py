"""No pickle anywhere in the libraries: checkpoints are safetensors only.

Scans the source of every distribution (spec/src, packages/*/src) with ``ast``, so strings and
comments (for example randlora-peft's message refusing ``adapter_model.bin``) do not count, for:
imports of pickle-based serialisers, ``torch.load`` without ``weights_only=True``, and ``np.load``
with ``allow_pickle=True``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SOURCES = [ROOT / "spec" / "src", *sorted((ROOT / "packages").glob("*/src"))]
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every pickle use in ``source``, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load" and not _is_true(keywords.get("weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
            if name in {"np.load", "numpy.load"} and _is_true(keywords.get("allow_pickle")):
                found.append(f"{where}: {name}(allow_pickle=True)")
            if name.split(".")[0] in PICKLERS:
                found.append(f"{where}: {name}()")
    return found


def source_files() -> list[Path]:
    return [p for directory in SOURCES for p in sorted(directory.rglob("*.py"))]


def test_sources_are_found() -> None:
    names = {p.name for p in source_files()}
    assert {"checkpoint.py", "safetensors_io.py", "model.py"} <= names


def test_no_pickle_in_any_distribution() -> None:
    problems = [v for path in source_files() for v in violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.parametrize(
    "bad",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "import torch\ntorch.load('x.bin')",
        "import torch\ntorch.load('x.bin', weights_only=False)",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    ],
)
def test_scanner_catches(bad: str) -> None:
    assert violations(bad)


@pytest.mark.parametrize(
    "fine",
    [
        "import torch\ntorch.load('x.pt', weights_only=True)",
        "import numpy as np\nnp.load('x.npy')",
        "msg = 'only adapter_model.bin (a pickle) is present; pickles are not loaded'",
    ],
)
def test_scanner_allows(fine: str) -> None:
    assert violations(fine) == []
