"""The shape of randlora-peft's source (issue #12 item 4): small modules, simple functions, no copied blocks.

* every module under ``src`` is at most 450 lines;
* no function exceeds McCabe complexity 10, as ``ruff check --select C901`` measures it;
* no block of 6 or more lines appears both in randlora-peft and in another ``src`` folder of the
  monorepo, or in two of randlora-peft's modules, identically or with only names changed.

Blocks are compared line by line after dropping what is not code (blank lines, comments,
docstrings, imports, ``__all__``, bare annotated declarations such as dataclass fields, and lines
of fewer than three tokens, e.g. ``)`` or ``return x``) and replacing every identifier by one
placeholder, so a renamed copy matches its original.
"""

from __future__ import annotations

import ast
import io
import keyword
import shutil
import subprocess
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SRC = REPO / "packages" / "randlora-peft" / "src"
MAX_LINES = 450
WINDOW = 6
_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def test_every_module_is_at_most_450_lines():
    long = {str(p.relative_to(SRC)): n for p in _modules(SRC) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.is_file() else shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install ruff==0.17.6)")
    return [found]


def test_no_function_is_over_mccabe_complexity_10():
    cmd = [*_ruff(), "check", "--no-cache", "--select", "C901", "--config", "lint.mccabe.max-complexity=10", str(SRC)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _ignored_lines(tree: ast.AST) -> set[int]:
    """Lines that are not logic: imports, docstrings and other bare strings, ``__all__``, bare annotated names."""
    ignored: set[int] = set()
    for node in ast.walk(tree):
        bare_string = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        declaration = isinstance(node, ast.AnnAssign) and node.value is None
        all_list = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        if isinstance(node, (ast.Import, ast.ImportFrom)) or bare_string or declaration or all_list:
            ignored.update(range(node.lineno, node.end_lineno + 1))
    return ignored


def normalized_lines(source: str) -> list[tuple[int, str]]:
    """``(line number, tokens with every identifier replaced by N)`` for each line of logic in ``source``."""
    ignored = _ignored_lines(ast.parse(source))
    lines: dict[int, list[str]] = defaultdict(list)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in _NOT_CODE or tok.start[0] in ignored:
            continue
        lines[tok.start[0]].append("N" if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string) else tok.string)
    return [(n, " ".join(tokens)) for n, tokens in sorted(lines.items()) if len(tokens) >= 3]


def _blocks(roots: list[Path]) -> dict[str, list[tuple[str, str, int]]]:
    """Every run of ``WINDOW`` normalized lines -> where it occurs: ``(src folder, module, first line)``."""
    found: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for root in roots:
        for module in _modules(root):
            lines = normalized_lines(module.read_text())
            for i in range(len(lines) - WINDOW + 1):
                block = "\n".join(text for _, text in lines[i : i + WINDOW])
                found[block].append((str(root.relative_to(REPO)), str(module.relative_to(root)), lines[i][0]))
    return found


def test_the_detector_finds_a_renamed_copy():
    original = "def f(a, b):\n" + "".join(f"    a = b.call_{i}(a, {i})\n" for i in range(6)) + "    return a\n"
    renamed = original.replace("a", "x").replace("b.", "y.").replace("b)", "y)").replace("f(", "g(")
    assert normalized_lines(original) == normalized_lines(renamed)
    assert len(normalized_lines(original)) == 7


def test_no_block_of_six_lines_is_shared_with_another_src_folder_or_module():
    roots = sorted({REPO / "spec" / "src", *(REPO / "packages").glob("*/src")})
    mine = str(SRC.relative_to(REPO))
    shared = {
        block: places
        for block, places in _blocks(roots).items()
        if any(folder == mine for folder, _, _ in places) and len({(folder, module) for folder, module, _ in places}) > 1
    }
    report = "\n\n".join(f"{places}\n{block}" for block, places in shared.items())
    assert shared == {}, f"blocks of {WINDOW}+ lines duplicated:\n{report}"
