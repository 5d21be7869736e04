"""Every error the libraries raise on purpose is a RandLoraError (docs/errors.md, "Exception hierarchy").

An AST scan of randlora-spec, randlora-core and randlora-peft finds no ``raise`` of a bare builtin
exception (``ValueError``, ``TypeError``, ``RuntimeError``, ``KeyError`` ...), except inside pydantic
validators (pydantic requires ``ValueError``; the config turns it into ``ConfigError``), inside
``__getattr__`` (Python's attribute protocol requires ``AttributeError``, which ``hasattr`` relies on) and in the
listed conformance tooling of the spec, which reports broken golden fixtures to test runs, not users.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import re
from pathlib import Path

import randlora_spec.errors as errors

ROOT = Path(__file__).resolve().parents[3]
SCANNED = [ROOT / "spec" / "src", ROOT / "packages" / "randlora-core" / "src", ROOT / "packages" / "randlora-peft" / "src"]
BUILTINS = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "AttributeError", "Exception", "AssertionError"}
TOOLING = {("golden.py", "ValueError"), ("driver.py", "ValueError")}  # spec's golden-fixture loader and reference driver


def _pydantic_validator(node: ast.AST) -> bool:
    """A function decorated with pydantic's ``field_validator`` / ``model_validator``: its ValueError becomes a ConfigError."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    names = [ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list]
    return any(n.endswith("_validator") for n in names)


def _attribute_protocol(node: ast.AST) -> bool:
    """A ``__getattr__`` (of a module or a class): Python's protocol requires it to raise ``AttributeError``."""
    return isinstance(node, ast.FunctionDef) and node.name == "__getattr__"


def builtin_raises(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for v in ast.walk(tree) if _pydantic_validator(v) or _attribute_protocol(v) for n in ast.walk(v)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name) and target.id in BUILTINS:
                found.append((target.id, node.lineno))
    return found


def test_no_builtin_raises_in_library_code() -> None:
    problems = []
    for directory in SCANNED:
        for path in sorted(directory.rglob("*.py")):
            for name, line in builtin_raises(path):
                if "randlora_spec" in path.parts and (path.name, name) in TOOLING:
                    continue
                problems.append(f"{path.relative_to(ROOT)}:{line}: raise {name}")
    assert problems == []


def test_every_library_exception_derives_from_the_root() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 9
    for cls in classes:
        assert issubclass(cls, errors.RandLoraError), cls
    import randlora_core

    for name in errors.__dict__:
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), errors.RandLoraError):
            assert getattr(randlora_core, name) is getattr(errors, name), f"randlora_core does not re-export {name}"


def test_builtin_bases_are_the_documented_ones() -> None:
    """Each error derives from the builtin the "Exception hierarchy" table of docs/errors.md names."""
    table = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    documented = dict(re.findall(r"^\| `(\w+Error)` \| `(\w+)` \|", table, re.M))
    assert len(documented) >= 8
    for name, builtin in documented.items():
        assert issubclass(getattr(errors, name), getattr(builtins, builtin)), (name, builtin)
