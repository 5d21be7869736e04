"""MkDocs hooks: the site is the repository's own Markdown plus a generated API reference.

* Every file the nav names is published at its repository path, and so is every repository file
  those pages link to, transitively: a relative link resolves on the site exactly as on GitHub, and
  a link to a file that does not exist fails the strict build.
* ``README.md`` at the root is the home page (MkDocs serves a directory's README as its index).
* The "Packages" and "API reference" nav sections list every distribution found under ``spec/`` and
  ``packages/``: its README, and a page ``api/<import name>.md`` holding ``::: <import name>``,
  which mkdocstrings renders from the docstrings.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def distributions() -> list[tuple[str, Path, str]]:
    """``(distribution name, directory, import name)`` of every distribution in the repository."""
    found = []
    for directory in [ROOT / "spec", *sorted((ROOT / "packages").glob("*"))]:
        inits = sorted((directory / "src").glob("*/__init__.py"))
        if (directory / "pyproject.toml").is_file() and inits:
            name = "randlora-spec" if directory.name == "spec" else directory.name
            found.append((name, directory, inits[0].parent.name))
    return found


def on_config(config: MkDocsConfig, **kwargs: Any) -> MkDocsConfig:
    """Append the per-distribution "Packages" and "API reference" sections to the nav."""
    dists = distributions()
    packages = [{name: f"{d.relative_to(ROOT).as_posix()}/README.md"} for name, d, _ in dists if (d / "README.md").is_file()]
    api = [{"Overview": "api/index.md"}, *({module: f"api/{module}.md"} for _, _, module in dists)]
    config.nav = [*(config.nav or []), {"Packages": packages}, {"API reference": api}]
    return config


def _nav_paths(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_paths(value)
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_paths(item)


def _linked(src_uri: str, markdown: str) -> Iterator[str]:
    """Repository paths of the relative links in a page (code blocks excluded)."""
    base = PurePosixPath(src_uri).parent
    for target in LINK.findall(FENCE.sub("", markdown)):
        if "://" in target or target.startswith(("#", "mailto:", "/")):
            continue
        path = target.split("#", 1)[0]
        if path and not path.endswith("/"):
            parts: list[str] = []
            for part in (base / path).parts:
                if part == "..":
                    if parts:
                        parts.pop()
                elif part != ".":
                    parts.append(part)
            yield "/".join(parts)


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    """Generate the API pages, then publish the nav's repository files and what they link to."""
    for _, _, module in distributions():
        uri = f"api/{module}.md"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, content=f"# `{module}`\n\n::: {module}\n"))
    queue = ["README.md", *_nav_paths(config.nav)]
    while queue:
        uri = queue.pop()
        source = ROOT / uri
        if files.get_file_from_path(uri) is not None or not source.is_file():
            continue  # already there, or missing: MkDocs reports a missing nav entry or link target
        # INCLUDED: published even where MkDocs would skip it by name (.ci/constraints.txt, a dot folder).
        files.append(File.generated(config, uri, abs_src_path=str(source), inclusion=InclusionLevel.INCLUDED))
        if source.suffix == ".md":
            queue.extend(_linked(uri, source.read_text(encoding="utf-8")))
    return files
