"""The documentation site that ``nox -s docs`` builds holds the README, the spec, the error catalogue
and an API reference entry, with its docstring, for every public name of every distribution.

The docs session builds the site with ``mkdocs build --strict`` and runs this file with
RANDLORA_SITE_DIR pointing at it; elsewhere (the readme session) there is no site, so it skips.
"""

from __future__ import annotations

import ast
import html
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = os.environ.get("RANDLORA_SITE_DIR")
pytestmark = pytest.mark.skipif(not SITE, reason="needs a built site: run `nox -s docs`")

INITS = [*(ROOT / "spec").glob("src/*/__init__.py"), *(ROOT / "packages").glob("*/src/*/__init__.py")]
SOURCES = {init.parent.name: init.parent.parent for init in INITS}  # import name -> its src directory


def page_text(relative: str) -> str:
    path = Path(SITE or "") / relative
    assert path.is_file(), f"{relative} missing from the site"
    return path.read_text(encoding="utf-8")


def public_names(module: str) -> list[str]:
    tree = ast.parse((SOURCES[module] / module / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{module} has no __all__")


def docstring_summary(module: str, name: str) -> str:
    """First line of the docstring of ``module.name``'s definition, wherever in the package it lives."""
    for path in sorted((SOURCES[module] / module).rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
                return (ast.get_docstring(node) or "").splitlines()[0]
    raise AssertionError(f"no definition of {name} in {module}")


def section(page: str, anchor: str) -> str:
    """The visible text from the heading with id ``anchor`` to the next heading of the same page."""
    start = page.index(f'id="{anchor}"')
    following = re.search(r"<h[1-6]", page[start + 1 :])
    chunk = page[start : start + 1 + following.start()] if following else page[start:]
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", chunk)))


def plain(text: str) -> str:
    """Docstring Markdown/RST as the site shows it: no backticks or roles, single spaces."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return re.sub(r"\s+", " ", text.replace("`", "")).strip()


ENTRY_POINTS = [("randlora_core", "get_randlora_model"), ("randlora_core", "load_adapter"), ("randlora_peft", "accelerate")]


@pytest.mark.parametrize(("module", "name"), ENTRY_POINTS)
def test_api_reference_documents_the_entry_points(module: str, name: str) -> None:
    text = section(page_text(f"api/{module}/index.html"), f"{module}.{name}")
    assert f"{name}(" in text.replace(" ", ""), f"no signature for {module}.{name}"
    summary = plain(docstring_summary(module, name))
    assert summary and " ".join(summary.split()[:6]) in re.sub(r"\s+([.,;:)])", r"\1", text), (summary, text[:300])


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_every_public_name_has_an_api_entry(module: str) -> None:
    page = page_text(f"api/{module}/index.html")
    missing = [name for name in public_names(module) if f'id="{module}.{name}"' not in page]
    assert not missing, f"{module}: no API reference entry for {missing}"


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("index.html", "Quick start"),
        ("spec/SPEC/index.html", "Tolerances per dtype"),
        ("docs/errors/index.html", "ERR-001"),
    ],
)
def test_repository_pages_are_published(page: str, expected: str) -> None:
    assert expected in page_text(page)
