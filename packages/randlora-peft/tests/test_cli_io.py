"""The command line reads each input file once, parses it once and encodes its output once.

Counted through real wrappers around the package's own I/O seams (every file randlora-peft reads
goes through ``randlora_peft.directory.read_file``; every spec parse or encode through
``randlora_peft._spec_seam``), and checked statically: no other module reads files or calls the
spec's parsers and encoders.
"""

from __future__ import annotations

import ast
import collections
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch

from randlora_peft import _spec_seam, directory
from randlora_peft.cli import main

SRC = Path(directory.__file__).resolve().parent
SPEC_IO = {"decode", "encode", "read_dtypes", "read_header", "from_bytes", "to_bytes", "load", "save", "open_checkpoint"}
SPEC_IO |= {"SafetensorsBuffer", "SafetensorsFile", "open_safetensors", "CheckpointReader"}


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Counts calls of the I/O seams; each wrapper calls the real function."""
    counter: collections.Counter[str] = collections.Counter()

    def count(module: object, name: str, key: Callable[..., str] | None = None) -> None:
        real = getattr(module, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            result = real(*args, **kwargs)  # an attempt on a file that is absent raises and is not counted
            counter[key(*args) if key else name] += 1
            return result

        monkeypatch.setattr(module, name, wrapper)

    count(directory, "read_file", lambda path: f"read {Path(path).name}")
    for name in ("decode_weights", "encode_checkpoint", "read_checkpoint", "validate"):
        count(_spec_seam, name)
    count(safetensors.torch, "save", lambda *a: "encode PEFT weights")
    return counter


def test_each_file_read_parsed_and_encoded_once(llama, make_peft_dir, tmp_path, capsys, counts):
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj", "v_proj"])
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({"model.layers.0.self_attn.q_proj": [32, 32], "model.layers.0.self_attn.v_proj": [32, 16]}))
    ours = tmp_path / "ours.safetensors"
    assert main(["convert", str(peft_dir), str(ours), "--layer-shapes", str(shapes)]) == 0
    assert counts == {
        "read adapter_config.json": 1,
        "read adapter_model.safetensors": 1,
        "read shapes.json": 1,
        "decode_weights": 1,
        "encode_checkpoint": 1,
    }
    counts.clear()
    assert main(["convert", str(ours), str(tmp_path / "back")]) == 0
    assert counts == {"read ours.safetensors": 1, "read_checkpoint": 1, "encode PEFT weights": 1}
    counts.clear()
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "again.safetensors")]) == 0  # sidecar too
    assert counts == {
        "read adapter_config.json": 1,
        "read adapter_model.safetensors": 1,
        "read randlora_layers.json": 1,
        "decode_weights": 1,
        "encode_checkpoint": 1,
    }
    capsys.readouterr()


def _imports_and_calls(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("randlora_spec")
        for alias in node.names
    }
    called = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
        if node.func.value.id in ("spec_ckpt", "safetensors_io")
    }
    return imported, called


def test_only_the_seams_read_files_and_call_the_spec_parsers():
    # The conformance driver reads golden checkpoint files for its own purpose, outside the conversion.
    for path in sorted(SRC.glob("*.py")):
        if path.name in ("_spec_seam.py", "driver.py"):
            continue
        imported, called = _imports_and_calls(path)
        assert not (imported | called) & SPEC_IO, f"{path.name} parses or encodes files itself: {(imported | called) & SPEC_IO}"
        text = path.read_text(encoding="utf-8")
        reads = ("read_bytes(", "read_text(", "os.read(", "readall(", "readinto(")
        if path.name != "directory.py":
            assert not any(r in text for r in reads), f"{path.name} reads files itself"
        if path.name not in ("directory.py", "publish.py"):  # publish.py opens the files it writes
            assert "open(" not in text, f"{path.name} opens files itself"
