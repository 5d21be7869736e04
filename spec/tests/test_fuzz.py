"""Fuzzing of the two parsers that take untrusted input: config JSON and checkpoint bytes.

Only the library's own exception types may escape. ``RANDLORA_FUZZ_EXAMPLES`` raises the budget
(``nox -s fuzz`` runs a long one); the default keeps CI short.
"""

import json
import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from randlora_spec import checkpoint
from randlora_spec.bases import BasesShape, bases_shape_for_layers, generate_bases
from randlora_spec.config import BOOKKEEPING_FIELDS, RandLoraConfig
from randlora_spec.errors import RandLoraError

EXAMPLES = int(os.environ.get("RANDLORA_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
config_keys = st.sampled_from([*sorted(RandLoraConfig.model_fields), "peft_type", "bogus"])
config_like = st.dictionaries(config_keys, json_values, max_size=8)


@FUZZ
@given(data=config_like | json_values)
def test_config_parse_raises_only_library_errors(data):
    try:
        cfg = RandLoraConfig.parse(data) if isinstance(data, dict) else RandLoraConfig.parse(json.dumps(data))
    except RandLoraError:
        return
    # Anything accepted round-trips, except what canonical JSON leaves out by design (SPEC 2.1).
    dropped = {name: RandLoraConfig.model_fields[name].default for name in (*BOOKKEEPING_FIELDS, "compute")}
    assert RandLoraConfig.parse(cfg.to_json()) == cfg.model_copy(update=dropped)


@FUZZ
@given(text=st.text(max_size=200))
def test_config_parse_of_arbitrary_text(text):
    try:
        RandLoraConfig.parse(text)
    except RandLoraError:
        pass


def _valid_blob(save_projection: bool) -> bytes:
    layers = {"m.q": checkpoint.LayerRecord(6, 10), "m.o": checkpoint.LayerRecord(10, 6, True)}
    cfg = RandLoraConfig(r=2, target_modules=["q", "o"], save_projection=save_projection)
    shape = bases_shape_for_layers([(6, 10), (10, 6)], 2)
    rng = np.random.default_rng(0)
    tensors = {}
    for path in layers:
        tensors[path + ".randlora_lambda"] = rng.standard_normal((2, 3)).astype(np.float32)
        tensors[path + ".randlora_gamma"] = rng.standard_normal((3, 6)).astype(np.float32)
    bases = generate_bases(0, shape) if save_projection else None
    return checkpoint.to_bytes(checkpoint.AdapterCheckpoint(cfg, "default", layers, shape, tensors, bases))


VALID = {True: _valid_blob(True), False: _valid_blob(False)}
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
)


def _mutated(save_projection: bool, mutations: list) -> bytes:
    blob = bytearray(VALID[save_projection])
    for op, position, value in mutations:
        if not blob:
            break
        i = position % len(blob)
        if op == "flip":
            blob[i] ^= 1 << value
        elif op == "truncate":
            del blob[i:]
        elif op == "insert":
            blob[i:i] = bytes([value])
        else:
            blob[i] = value
    return bytes(blob)


@FUZZ
@given(save_projection=st.booleans(), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_checkpoint_mutations_raise_only_library_errors(save_projection, mutations):
    blob = _mutated(save_projection, mutations)
    try:
        loaded = checkpoint.from_bytes(blob)
    except RandLoraError:
        return
    for key, value in loaded.tensors.items():  # a file that still loads is internally consistent
        assert np.all(np.isfinite(value)), key


def _outcome(read):
    try:
        ckpt = read()
    except RandLoraError as exc:
        return type(exc).__name__, str(exc)
    return "accepted", checkpoint.to_bytes(ckpt, readable_basis_rules=[ckpt.config.basis_rule])


_SCRATCH = tempfile.TemporaryDirectory(prefix="randlora-fuzz-")  # removed when the interpreter exits
PATH = os.path.join(_SCRATCH.name, "mutated.safetensors")


@FUZZ
@given(save_projection=st.booleans(), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_files_and_bytes_get_the_same_verdict(save_projection, mutations):
    blob = _mutated(save_projection, mutations)
    with open(PATH, "wb") as handle:
        handle.write(blob)
    assert _outcome(lambda: checkpoint.load(PATH)) == _outcome(lambda: checkpoint.from_bytes(blob, source=PATH))


@FUZZ
@given(header=json_values, tail=st.binary(max_size=64))
def test_arbitrary_headers_raise_only_library_errors(header, tail):
    text = json.dumps(header).encode()
    try:
        checkpoint.from_bytes(len(text).to_bytes(8, "little") + text + tail)
    except RandLoraError:
        pass


arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7),
)
small_ints = st.integers(-2, 12) | st.booleans() | st.just(4300).map(lambda digits: 10**digits)
records = st.builds(checkpoint.LayerRecord, small_ints, small_ints, st.booleans() | st.integers(0, 1))
shapes = st.builds(BasesShape, small_ints, small_ints, small_ints, small_ints)
keys = st.sampled_from(["m.q.randlora_lambda", "m.q.randlora_gamma", "m.o.randlora_gamma", "randlora_A", "m.q.bias", "x"])
edits = st.one_of(
    st.tuples(st.just("tensor"), keys, arrays | json_values),
    st.tuples(st.just("drop"), keys, st.none()),
    st.tuples(st.just("layer"), st.sampled_from(["m.q", "m.o", "", "m.k"]), records | json_values),
    st.tuples(
        st.sampled_from(["adapter_name", "bases_shape", "biases", "modules_to_save", "bf16_keys", "bases", "config"]),
        st.none(),
        json_values
        | shapes
        | st.frozensets(keys)
        | st.lists(st.sampled_from(["m.q", "m.o", "head", ""]), max_size=3)
        | st.tuples(arrays, arrays),
    ),
)


def _edited(save_projection: bool, edit_list: list) -> checkpoint.AdapterCheckpoint:
    ckpt = checkpoint.from_bytes(VALID[save_projection])
    for what, key, value in edit_list:
        if what == "tensor":
            ckpt.tensors[key] = value
        elif what == "drop":
            ckpt.tensors.pop(key, None)
        elif what == "layer":
            ckpt.layers[key] = value
        else:
            setattr(ckpt, what, value)
    return ckpt


@FUZZ
@given(save_projection=st.booleans(), edit_list=st.lists(edits, min_size=1, max_size=3))
def test_writers_refuse_with_library_errors_and_never_write_what_readers_refuse(save_projection, edit_list):
    ckpt = _edited(save_projection, edit_list)
    try:
        blob = checkpoint.to_bytes(ckpt)
    except RandLoraError:
        return
    loaded = checkpoint.from_bytes(blob)  # anything a writer accepts, a reader accepts
    assert checkpoint.to_bytes(loaded) == blob
