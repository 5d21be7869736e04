"""Public API hygiene: every public function and class is documented and fully annotated."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import randlora_peft

# Every module of the package, so that a new one is checked without being listed here.
MODULES = [
    randlora_peft,
    *(
        importlib.import_module(f"randlora_peft.{info.name}")
        for info in pkgutil.iter_modules(randlora_peft.__path__)
        if info.name != "__main__"
    ),
]


def _public(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__.startswith("randlora_peft"):
            yield f"{module.__name__}.{name}", obj


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_callables_have_docstrings_and_type_hints(module):
    for qualname, obj in _public(module):
        assert inspect.getdoc(obj), f"{qualname} has no docstring"
        functions = (
            [obj]
            if inspect.isfunction(obj)
            else [f for n, f in vars(obj).items() if inspect.isfunction(f) and not n.startswith("_")]
        )
        for fn in functions:
            assert inspect.getdoc(fn), f"{qualname}.{fn.__name__} has no docstring"
            sig = inspect.signature(fn)
            missing = [p for p in sig.parameters.values() if p.name not in ("self", "cls") and p.annotation is p.empty]
            assert not missing, f"{qualname}.{fn.__name__}: parameters without type hints {missing}"
            assert sig.return_annotation is not sig.empty, f"{qualname}.{fn.__name__} has no return type"


def test_version_and_exports():
    assert randlora_peft.__version__ == "1.0.0"
    for name in randlora_peft.__all__:
        assert getattr(randlora_peft, name)
