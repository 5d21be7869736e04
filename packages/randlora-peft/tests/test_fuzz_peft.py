"""Fuzzing of the PEFT directory reader: the sidecar, the config, the weights' key layout, layer-shape files.

A valid directory written by our writer (with its sidecar ``randlora_layers.json``) is mutated,
structurally (a value anywhere in the JSON replaced by random JSON, keys dropped or added; tensors
renamed, dropped, added, reshaped) and byte by byte (flips, truncations, insertions), and read
with :func:`randlora_peft.read_peft_adapter`. Only ``RandLoraError`` subclasses may escape; an
accepted directory gives a checkpoint the spec validates. Layer-shape files (``--layer-shapes``)
are fuzzed through :func:`randlora_peft.shapes.layer_shapes_from_json` the same way.

``RANDLORA_FUZZ_EXAMPLES`` sets the budget per test (CI: a short default; ``nox -s fuzz``: long);
run with ``--hypothesis-show-statistics`` to see how many cases ran and how they ended.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft_helpers import portable_checkpoint

from randlora_peft import _spec_seam, read_peft_adapter, write_peft_adapter
from randlora_peft.shapes import layer_shapes_from_json
from randlora_spec.errors import RandLoraError
from randlora_spec.safetensors_io import decode, encode

EXAMPLES = int(os.environ.get("RANDLORA_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
WORKDIR = Path(tempfile.mkdtemp(prefix="randlora-peft-fuzz-"))
BASE = write_peft_adapter(portable_checkpoint(), WORKDIR / "base")
FILES = {p.name: p.read_bytes() for p in BASE.iterdir()}
SIDECAR, CONFIG, WEIGHTS = "randlora_layers.json", "adapter_config.json", "adapter_model.safetensors"

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 16, 24, 2**24, 2**24 + 1, 2**31, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6
)


def _containers(doc: Any, path: tuple = ()) -> list[tuple]:
    """Paths of every dict and list inside ``doc`` (``()`` is the document itself)."""
    found = [path] if isinstance(doc, (dict, list)) else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in items:
        found += _containers(value, (*path, key))
    return found


@st.composite
def mutated_json(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` (a JSON document) with one structural change: a value replaced, a key dropped or added."""
    doc = json.loads(raw)
    where = draw(st.sampled_from(_containers(doc)))
    node = doc
    for key in where:
        node = node[key]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    action = draw(st.sampled_from(["replace", "drop", "add"] if keys else ["add"]))
    if action == "add" or not keys:
        if isinstance(node, dict):
            node[draw(st.text(max_size=12))] = draw(json_values)
        else:
            node.append(draw(json_values))
    else:
        key = draw(st.sampled_from(keys))
        if action == "drop":
            del node[key]
        else:
            node[key] = draw(json_values)
    return json.dumps(doc).encode()


@st.composite
def mutated_bytes(draw: st.DrawFn, raw: bytes) -> bytes:
    """``raw`` with a bit flip, a truncation, an insertion or an overwrite."""
    data = bytearray(raw)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    else:
        chunk = draw(st.binary(min_size=1, max_size=16))
        data[at : at + len(chunk)] = chunk
    return bytes(data)


@st.composite
def mutated_weights(draw: st.DrawFn) -> bytes:
    """PEFT's weights file with tensors renamed (adapter-name suffixes, prefixes), dropped, added or reshaped."""
    tensors, meta = decode(FILES[WEIGHTS])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(tensors)))
        kind = draw(st.sampled_from(["rename", "drop", "add", "reshape", "suffix"]))
        if kind == "rename":
            tensors[draw(st.sampled_from([key + ".x", key.replace("base_model.", ""), "base_model.model." + key]))] = tensors.pop(
                key
            )
        elif kind == "drop" and len(tensors) > 1:
            del tensors[key]
        elif kind == "add":
            name = draw(st.sampled_from(["base_model.model.blk.q.bias", "base_model.randlora_A.other", key + ".default"]))
            tensors[name] = np.zeros(draw(st.lists(st.integers(0, 5), max_size=3)), np.float32)
        elif kind == "reshape":
            tensors[key] = np.zeros(draw(st.lists(st.integers(0, 40), max_size=3)), np.float32)
        else:
            tensors = {k + ".default": v for k, v in tensors.items()}
    return encode(tensors, meta)


def _read(files: dict[str, bytes]) -> None:
    """Write ``files`` as a directory and read it: a RandLoraError, or a checkpoint the spec accepts."""
    directory = Path(tempfile.mkdtemp(dir=WORKDIR))
    try:
        for name, data in files.items():
            (directory / name).write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ckpt = read_peft_adapter(directory)
            except RandLoraError as exc:
                event(f"refused: {type(exc).__name__}")
                return
        _spec_seam.validate(ckpt)
        event(f"accepted: {ckpt.config.basis_rule}")
    finally:
        shutil.rmtree(directory)


@FUZZ
@given(st.data())
def test_fuzz_sidecar_structure(data: st.DataObject) -> None:
    _read({**FILES, SIDECAR: data.draw(mutated_json(FILES[SIDECAR]))})


@FUZZ
@given(st.data())
def test_fuzz_sidecar_bytes(data: st.DataObject) -> None:
    _read({**FILES, SIDECAR: data.draw(mutated_bytes(FILES[SIDECAR]))})


@FUZZ
@given(st.data())
def test_fuzz_config_structure(data: st.DataObject) -> None:
    _read({**FILES, CONFIG: data.draw(mutated_json(FILES[CONFIG]))})


@FUZZ
@given(st.data())
def test_fuzz_config_bytes(data: st.DataObject) -> None:
    _read({**FILES, CONFIG: data.draw(mutated_bytes(FILES[CONFIG]))})


@FUZZ
@given(mutated_weights())
def test_fuzz_weights_layout(weights: bytes) -> None:
    _read({**FILES, WEIGHTS: weights})


@FUZZ
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=4) | json_values)
def test_fuzz_layer_shapes_json(data: Any) -> None:
    try:
        shapes = layer_shapes_from_json(data, "shapes.json")
    except RandLoraError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    assert all(1 <= s[0] <= 2**24 and 1 <= s[1] <= 2**24 for s in shapes.values())
