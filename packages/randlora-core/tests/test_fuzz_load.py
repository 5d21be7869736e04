"""Fuzzing of randlora-core's ``load_adapter`` with mutated checkpoint files.

Random byte-level mutations (bit flips, truncations, insertions, overwrites) and structured ones
(metadata values replaced by random JSON, tensors dropped or reshaped) of valid checkpoints are
loaded into a plain model and into a RandLoraModel that already holds an adapter. Only
``RandLoraError`` subclasses may escape; after a rejection the model is unchanged (every
parameter and buffer bit for bit, requires_grad, module tree, adapters); a file that loads gives
finite adapter parameters and a finite forward.

``RANDLORA_FUZZ_EXAMPLES`` sets the budget per test (CI: a short default; ``nox -s fuzz``: long).
Outcomes are recorded as hypothesis events: run with ``--hypothesis-show-statistics`` to see how
many cases ran and how they ended.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from conftest import Block, randomize_adapters
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from randlora_core import RandLoraConfig, RandLoraError, RandLoraModel, get_randlora_model, load_adapter
from randlora_spec.safetensors_io import decode, encode

EXAMPLES = int(os.environ.get("RANDLORA_FUZZ_EXAMPLES", "120"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
WORKDIR = Path(tempfile.mkdtemp(prefix="randlora-fuzz-"))


def small_block() -> Block:
    torch.manual_seed(0)
    return Block(d=6, hidden=10)


def make_model(**kw: object) -> RandLoraModel:
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    model = get_randlora_model(small_block(), RandLoraConfig(r=2, **kw))
    randomize_adapters(model)
    return model


def _valid(**kw: object) -> bytes:
    path = WORKDIR / "valid.safetensors"
    make_model(**kw).save_adapter(path)
    return path.read_bytes()


VALID = [_valid(), _valid(save_projection=False), _valid(bias="randlora_only", target_modules=["q_proj", "v_proj"])]


def state(model: nn.Module) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        flat = t.detach().contiguous().reshape(-1)
        out[name] = (str(t.dtype), tuple(t.shape), flat.view(torch.uint8).numpy().tobytes(), t.requires_grad)
    out["modules"] = [(n, type(m).__name__) for n, m in model.named_modules()]
    if isinstance(model, RandLoraModel):
        out["adapters"] = (list(model.peft_config), model.active_adapters, model.merged_adapters)
    return out


def try_load(blob: bytes) -> None:
    """Load ``blob`` into a plain model and into a wrapped one; check the contract either way."""
    path = WORKDIR / "fuzzed.safetensors"
    path.write_bytes(blob)
    for target in (small_block(), make_model()):
        before = state(target)
        try:
            loaded = load_adapter(target, path, "fuzzed")
        except RandLoraError as exc:
            event(f"rejected: {type(exc).__name__}")
            assert state(target) == before, "a rejected file changed the model"
            continue
        event("loaded")
        for name, param in loaded.named_parameters():
            assert torch.isfinite(param).all(), name
        loaded.set_adapter("fuzzed")
        with torch.no_grad():
            assert torch.isfinite(loaded(torch.randn(2, 6))).all()


def mutate(blob: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(blob)
    for op, position, value in mutations:
        if not data:
            break
        i = position % len(data)
        if op == "flip":
            data[i] ^= 1 << (value % 8)
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = bytes([value % 256])
        else:
            data[i] = value % 256
    return bytes(data)


mutation = st.tuples(st.sampled_from(["flip", "truncate", "insert", "set"]), st.integers(0, 10**7), st.integers(0, 255))


@FUZZ
@given(which=st.integers(0, len(VALID) - 1), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_byte_mutations(which: int, mutations: list[tuple[str, int, int]]) -> None:
    try_load(mutate(VALID[which], mutations))


@FUZZ
@given(which=st.integers(0, len(VALID) - 1), header_mutations=st.lists(mutation, min_size=1, max_size=3))
def test_header_mutations(which: int, header_mutations: list[tuple[str, int, int]]) -> None:
    """Mutations aimed at the header (most random positions of a small file land in tensor data)."""
    blob = VALID[which]
    n = int.from_bytes(blob[:8], "little")
    aimed = [(op, 8 + position % n, value) for op, position, value in header_mutations]
    try_load(mutate(blob, aimed))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
META_KEYS = [
    "format",
    "format_version",
    "spec_version",
    "config",
    "basis_rule",
    "adapter_name",
    "layers",
    "bases",
    "bases_shape",
    "extra",
]


@FUZZ
@given(
    which=st.integers(0, len(VALID) - 1),
    key=st.sampled_from(META_KEYS),
    value=json_values,
    raw=st.booleans(),
    drop=st.lists(st.integers(0, 20), max_size=2),
    reshape=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3)), max_size=2),
)
def test_structured_mutations(which, key, value, raw, drop, reshape) -> None:
    tensors, meta = decode(VALID[which])
    meta[key] = value if raw and isinstance(value, str) else json.dumps(value)
    names = sorted(tensors)
    for i in drop:
        tensors.pop(names[i % len(names)], None)
    for i, extra in reshape:
        name = names[i % len(names)]
        if name in tensors:
            t = tensors[name]
            tensors[name] = np.resize(t, (t.shape[0] + extra, *t.shape[1:]) if t.ndim else (extra,)).astype(t.dtype)
    try_load(encode(tensors, meta))
