"""Hostile inputs to the spec's readers and writers (issue #13), with catalogue rows ERR-200 - ERR-233.

Every refusal is a RandLoraError that names the problem. Memory and time bombs run in a child
process under ``RLIMIT_AS`` (its address space after imports plus a budget) and a timeout, and the
test asserts the bound: refusing a file costs memory in proportion to its header, accepting one in
proportion to its tensors. Big files are sparse, so they cost no disk.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_spec_error_catalogue import catalogue

from randlora_spec import checkpoint
from randlora_spec.bases import bases_shape_for_layers, generate_bases
from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import CheckpointError, ConfigError, RandLoraError
from randlora_spec.safetensors_io import MAX_HEADER_BYTES, encode

MiB = 2**20
LINUX = sys.platform.startswith("linux")


def ckpt(save_projection: bool = True) -> checkpoint.AdapterCheckpoint:
    layers = {"m.q": checkpoint.LayerRecord(6, 10)}
    config = RandLoraConfig(r=2, target_modules=["q"], save_projection=save_projection)
    shape = bases_shape_for_layers([(6, 10)], 2)
    tensors = {"m.q.randlora_lambda": np.ones((2, 3), np.float32), "m.q.randlora_gamma": np.ones((3, 6), np.float32)}
    return checkpoint.AdapterCheckpoint(
        config, "default", layers, shape, tensors, generate_bases(0, shape) if save_projection else None
    )


def container(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def with_metadata(**values: str) -> bytes:
    """A valid checkpoint whose metadata values are replaced (tensors unchanged)."""
    c = ckpt(False)
    return encode(dict(c.tensors), {**checkpoint.metadata_for(c), **values})


def refused(blob: bytes, tmp_path: Path) -> list[BaseException]:
    """The errors from_bytes, load and open_checkpoint raise for ``blob`` (all must refuse it)."""
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(blob)
    errors = []
    for read in (
        lambda: checkpoint.from_bytes(blob, source=str(path)),
        lambda: checkpoint.load(path),
        lambda: checkpoint.open_checkpoint(path).close(),
    ):
        with pytest.raises(RandLoraError) as info:
            read()
        errors.append(info.value)
    assert len({str(e) for e in errors}) == 1, "bytes and files must give the same message"
    return errors


# -- readers: exceptions that used to escape the hierarchy ----------------------------------------


def test_dtype_that_is_a_list(tmp_path: Path) -> None:
    for exc in refused(container({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), tmp_path):
        catalogue.check("ERR-200", exc)
    for dtype in ({"F32": 1}, 32, None):
        blob = container({"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
        with pytest.raises(CheckpointError, match="unsupported dtype"):
            checkpoint.from_bytes(blob)


def test_integer_of_more_than_4300_digits_in_the_header(tmp_path: Path) -> None:
    text = b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
    for exc in refused(container(text, bytes(4)), tmp_path):
        catalogue.check("ERR-201", exc)


def test_header_nested_too_deeply(tmp_path: Path) -> None:
    for exc in refused(container(b"[" * 100_000 + b"]" * 100_000), tmp_path):
        catalogue.check("ERR-202", exc)


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    # Same span twice: nothing is left unowned, so only the duplicate itself can be refused.
    text = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}'
    for exc in refused(container(text, bytes(4)), tmp_path):
        catalogue.check("ERR-203", exc)


def test_nan_literal_in_the_header(tmp_path: Path) -> None:
    for exc in refused(container(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', bytes(4)), tmp_path):
        catalogue.check("ERR-204", exc)
    with pytest.raises(CheckpointError, match=r"Infinity is not a JSON value"):
        checkpoint.from_bytes(container(b'{"__metadata__":{"x":-Infinity}}'))


def test_too_many_dimensions(tmp_path: Path) -> None:
    for exc in refused(container({"a": {"dtype": "F32", "shape": [1] * 33, "data_offsets": [0, 4]}}, bytes(4)), tmp_path):
        catalogue.check("ERR-205", exc)
    ok = container({"a": {"dtype": "F32", "shape": [1] * 32, "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(CheckpointError, match="not a randlora checkpoint"):  # the container itself is fine
        checkpoint.from_bytes(ok)


def test_empty_tensor_that_no_array_library_can_hold(tmp_path: Path) -> None:
    for exc in refused(container({"a": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}), tmp_path):
        catalogue.check("ERR-206", exc)
    for shape in ([2**32, 2**32, 2**32], [2**64 + 1], [10**4000] * 32):  # products that overflow int64
        blob = container({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, bytes(4))
        with pytest.raises(CheckpointError, match="byte length does not match"):
            checkpoint.from_bytes(blob)


def test_metadata_integer_of_more_than_4300_digits(tmp_path: Path) -> None:
    layers = '{"m.q":{"in_features":' + "6" * 5000 + ',"out_features":10,"fan_in_fan_out":false}}'
    for exc in refused(with_metadata(layers=layers), tmp_path):
        catalogue.check("ERR-207", exc)
    config = ckpt().config.to_json().replace('"r":2', '"r":' + "2" * 4400)
    with pytest.raises(CheckpointError, match=r"metadata 'config' is not valid JSON \(an integer has more than 4300 digits\)"):
        checkpoint.from_bytes(with_metadata(config=config))


def test_metadata_nested_too_deeply(tmp_path: Path) -> None:
    for exc in refused(with_metadata(extra="[" * 50_000 + "]" * 50_000), tmp_path):
        catalogue.check("ERR-208", exc)


def test_deep_but_parsable_values_get_short_messages() -> None:
    deep = "[" * 400 + "1" + "]" * 400
    layers = '{"m.q":{"in_features":' + deep + ',"out_features":10,"fan_in_fan_out":false}}'
    with pytest.raises(CheckpointError, match=r"in_features must be a positive integer, got \[\[\[\[\.\.\.\]\]\]\]"):
        checkpoint.from_bytes(with_metadata(layers=layers))
    name = "x" * MiB
    with pytest.raises(CheckpointError) as info:
        checkpoint.from_bytes(container({name: {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)))
    assert len(str(info.value)) < 300 and "unsupported dtype 'F8'" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        checkpoint.from_bytes(with_metadata(adapter_name="a." * MiB))
    assert len(str(info.value)) < 300


@pytest.mark.skipif(not LINUX, reason="FIFOs and /dev/zero")
def test_special_files_are_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A child with a timeout: opening a FIFO for reading would block until a writer comes.
    out = run_bounded("load", fifo, budget=16 * MiB)
    assert out == f"refused: CheckpointError: {fifo}: is a FIFO, not a regular file"
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(fifo)
    catalogue.check("ERR-209", info.value)
    with pytest.raises(CheckpointError, match="/dev/zero: is a character device, not a regular file"):
        checkpoint.load("/dev/zero")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.open_checkpoint(tmp_path)  # a directory


def test_file_changed_after_it_was_opened(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, ckpt())
    with checkpoint.open_checkpoint(path) as reader:
        os.truncate(path, os.path.getsize(path) - 8)  # in place: the open file shrinks
        with pytest.raises(CheckpointError) as info:
            reader.load()
    catalogue.check("ERR-210", info.value)


def test_symlink_loop_is_no_checkpoint_file(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(tmp_path / "loop")
    catalogue.check("ERR-211", info.value)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint.load(tmp_path / "dangling")


# -- the in-memory seam: objects that no file can express ----------------------------------------


def _seam_rows() -> dict[str, Any]:
    def changed(**fields: Any) -> checkpoint.AdapterCheckpoint:
        c = ckpt()
        for name, value in fields.items():
            setattr(c, name, value)
        return c

    c = ckpt()
    return {
        "ERR-215": dict(c.__dict__),
        "ERR-216": changed(config=c.config.model_dump()),
        "ERR-217": changed(tensors=list(c.tensors.values())),
        "ERR-218": changed(tensors={1: np.zeros(1, np.float32)}),
        "ERR-219": changed(tensors={**c.tensors, "m.q.randlora_lambda": [[1.0] * 3] * 2}),
        "ERR-220": changed(bases=c.bases[0]),
        "ERR-221": changed(tensors={**c.tensors, "randlora_A": c.bases[0]}),
        "ERR-223": changed(layers={"m.q": {"in_features": 6, "out_features": 10, "fan_in_fan_out": False}}),
        "ERR-228": changed(layers={"m.q": checkpoint.LayerRecord(10**4300, 10)}),
        "ERR-229": changed(bf16_keys=None),
    }


@pytest.mark.parametrize("row_id", sorted(_seam_rows()))
def test_validate_refuses_malformed_objects(row_id: str, tmp_path: Path) -> None:
    bad = _seam_rows()[row_id]
    with pytest.raises(RandLoraError) as info:
        checkpoint.validate(bad)
    catalogue.check(row_id, info.value)
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, ckpt())
    before = catalogue.tree_state(tmp_path)
    with pytest.raises(RandLoraError):
        checkpoint.save(path, bad)
    assert catalogue.tree_state(tmp_path) == before


def test_validate_refuses_what_no_reader_would_accept() -> None:
    c = ckpt()
    c.modules_to_save = {"head": ["weight"]}
    c.tensors["head.weight"] = np.zeros((1,) * 33, np.float32)  # numpy 2 holds it, readers refuse it
    with pytest.raises(CheckpointError, match=r"tensor 'head\.weight' has 33 dimensions; at most 32 are supported"):
        checkpoint.to_bytes(c)


def test_writer_refuses_values_that_overflow_bf16(tmp_path: Path) -> None:
    c = ckpt()
    c.tensors["m.q.randlora_gamma"][1, 1] = 3.4e38  # finite in float32, infinite in BF16
    c.bf16_keys = frozenset({"m.q.randlora_gamma"})
    path = tmp_path / "a.safetensors"
    checkpoint.save(path, ckpt())
    before = catalogue.tree_state(tmp_path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(path, c)
    catalogue.check("ERR-222", info.value)
    assert catalogue.tree_state(tmp_path) == before
    c.bf16_keys = frozenset()
    checkpoint.save(path, c)  # as F32 the value is fine


# -- writers: what may stand at the target (SPEC 6.4) --------------------------------------------


def _refused_write(row_id: str, target: Path, tmp_path: Path) -> None:
    before = catalogue.tree_state(tmp_path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.save(target, ckpt())
    catalogue.check(row_id, info.value)
    assert catalogue.tree_state(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(not LINUX, reason="FIFOs and Unix sockets")
def test_writer_refuses_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    _refused_write("ERR-224", tmp_path / "fifo", tmp_path)
    (tmp_path / "to-fifo").symlink_to("fifo")
    with pytest.raises(CheckpointError, match=r"to-fifo \(-> .*/fifo\): is a FIFO"):
        checkpoint.save(tmp_path / "to-fifo", ckpt())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        _refused_write("ERR-225", tmp_path / "sock", tmp_path)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


def test_writer_refuses_dangling_and_looping_symlinks(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("missing.safetensors")
    _refused_write("ERR-226", tmp_path / "link", tmp_path)
    (tmp_path / "loop").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop")
    _refused_write("ERR-227", tmp_path / "loop", tmp_path)


def test_writer_writes_through_symlinks_in_the_target_directory(tmp_path: Path) -> None:
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    checkpoint.save(real_dir / "a.safetensors", ckpt(True))
    (link_dir / "a.safetensors").symlink_to("../real/a.safetensors")
    checkpoint.save(link_dir / "a.safetensors", ckpt(False))
    assert (link_dir / "a.safetensors").is_symlink()
    assert checkpoint.load(real_dir / "a.safetensors").bases is None
    assert sorted(p.name for p in real_dir.iterdir()) == ["a.safetensors"]
    assert sorted(p.name for p in link_dir.iterdir()) == ["a.safetensors"]


def test_writer_keeps_the_mode_of_a_replaced_file_and_follows_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    for umask in (0o022, 0o077, 0o002):
        previous = os.umask(umask)
        try:
            path.unlink(missing_ok=True)
            checkpoint.save(path, ckpt())
        finally:
            os.umask(previous)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    os.chmod(path, 0o640)
    checkpoint.save(path, ckpt(False))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_writer_onto_a_directory_raises_the_os_error(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").mkdir()
    with pytest.raises(IsADirectoryError):
        checkpoint.save(tmp_path / "a.safetensors", ckpt())
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


# -- config -----------------------------------------------------------------------------------------


def test_config_with_non_string_keys() -> None:
    for parse in (RandLoraConfig.parse, RandLoraConfig.from_peft_dict):
        with pytest.raises(ConfigError) as info:
            parse({"peft_type": "RANDLORA", 1: 2})
        catalogue.check("ERR-230", info.value)


def test_config_integers_python_cannot_write() -> None:
    with pytest.raises(ConfigError) as info:
        RandLoraConfig.parse({"r": 10**5000})
    catalogue.check("ERR-231", info.value)
    config = RandLoraConfig()
    with pytest.raises(ConfigError) as info:
        config.r = 10**4300
    catalogue.check("ERR-231", info.value)
    assert config.r == 32
    with pytest.raises(ConfigError, match="layers_to_transform: integers have at most 4300 digits"):
        RandLoraConfig(layers_to_transform=[0, 10**4300])
    assert RandLoraConfig(r=10**4300 - 1).to_json()  # the largest accepted one can be written


def test_config_text_with_huge_integers_or_deep_nesting() -> None:
    with pytest.raises(ConfigError) as info:
        RandLoraConfig.parse('{"r": ' + "1" * 5000 + "}")
    catalogue.check("ERR-232", info.value)
    with pytest.raises(ConfigError) as info:
        RandLoraConfig.parse('{"target_modules": ' + "[" * 100_000 + "]" * 100_000 + "}")
    catalogue.check("ERR-233", info.value)


# -- memory and time bombs, in a child under RLIMIT_AS ---------------------------------------------

CHILD = """
import resource, sys

def vm_size():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

from randlora_spec import checkpoint
from randlora_spec.errors import RandLoraError

budget, op, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
blob = open(path, "rb").read() if op == "from_bytes" else None  # outside the budget
limit = vm_size() + budget
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    if op == "from_bytes":
        checkpoint.from_bytes(blob, source=path)
    elif op == "open":
        checkpoint.open_checkpoint(path).close()
    else:
        checkpoint.load(path)
    print("accepted")
except RandLoraError as exc:
    print(f"refused: {type(exc).__name__}: {exc}"[:400])
except MemoryError as exc:
    print(f"MemoryError: {exc}")
"""


def run_bounded(op: str, path: Path, budget: int, timeout: float = 120) -> str:
    """Run ``op`` on ``path`` in a child allowed ``budget`` bytes of address space beyond its imports."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(budget), op, str(path)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def sparse_file(path: Path, head: bytes, size: int) -> Path:
    with path.open("wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


bounded = pytest.mark.skipif(not LINUX, reason="RLIMIT_AS and /proc/self/status")


@bounded
def test_a_1gib_file_is_refused_from_its_header(tmp_path: Path) -> None:
    """The old reader read the whole file before looking at the header length."""
    bogus = sparse_file(tmp_path / "bogus.bin", (2**40).to_bytes(8, "little"), 2**30)
    for op in ("load", "open"):
        assert "exceeds the limit of 16777216 bytes" in run_bounded(op, bogus, budget=16 * MiB)
    junk = sparse_file(tmp_path / "junk.bin", (1000).to_bytes(8, "little") + b"{" * 1000, 2**30)
    assert "not valid UTF-8 JSON" in run_bounded("load", junk, budget=16 * MiB)
    # A valid container whose header describes a 1 GiB integer tensor: refused before any data is read.
    n = 2**28 - 8
    text = json.dumps({"a": {"dtype": "I32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    huge = sparse_file(tmp_path / "huge.bin", container(text), 8 + len(text) + 4 * n)
    assert "not a randlora checkpoint" in run_bounded("load", huge, budget=16 * MiB)


@bounded
def test_aliased_spans_are_refused_before_any_copy(tmp_path: Path) -> None:
    """50 entries over the same 8 MiB: the old reader copied each (400 MiB) before checking the spans."""
    data = 8 * MiB
    header = {f"t{i:02}": {"dtype": "F32", "shape": [data // 4], "data_offsets": [0, data]} for i in range(50)}
    path = tmp_path / "aliased.bin"
    path.write_bytes(container(header, bytes(data)))
    for op in ("load", "from_bytes"):
        assert (
            run_bounded(op, path, budget=16 * MiB)
            == f"refused: CheckpointError: {path}: tensor 't01' leaves a gap or overlaps in the data buffer"
        )


@bounded
def test_accepting_costs_the_tensors_once(tmp_path: Path) -> None:
    """A 16 MiB checkpoint loads within 16 MiB + 8 MiB; the old reader held the file and the copies (32 MiB)."""
    layers = {"m.q": checkpoint.LayerRecord(2048, 4096)}
    config = RandLoraConfig(r=1, target_modules=["q"], save_projection=False)
    tensors = {"m.q.randlora_lambda": np.ones((1, 2048), np.float32), "m.q.randlora_gamma": np.ones((2048, 2048), np.float32)}
    path = tmp_path / "big.safetensors"
    shape = bases_shape_for_layers([(2048, 4096)], 1)
    checkpoint.save(path, checkpoint.AdapterCheckpoint(config, "default", layers, shape, tensors))
    size = path.stat().st_size
    assert size > 16 * MiB
    for op in ("load", "from_bytes"):
        assert run_bounded(op, path, budget=size + 8 * MiB) == "accepted"


@bounded
def test_header_json_bombs_cost_memory_linear_in_the_header(tmp_path: Path) -> None:
    """Nested arrays, many entries, a layers object of ~60k records: bounded by 32x the header, and by time."""
    n = 4 * MiB
    nested = tmp_path / "nested.bin"
    nested.write_bytes(container(b'{"a":{"dtype":"F32","shape":[' + b"[]," * (n // 3) + b'[]],"data_offsets":[0,0]}}'))
    meta_nested = tmp_path / "meta-nested.bin"
    meta_nested.write_bytes(with_metadata(config="[" + "[]," * (n // 3 - 2) + "[]]"))
    records = {f"l{i}": {"in_features": 1, "out_features": 1, "fan_in_fan_out": False} for i in range(60_000)}
    many_layers = tmp_path / "many-layers.bin"
    many_layers.write_bytes(with_metadata(layers=json.dumps(records, separators=(",", ":"))))
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(70_000)}
    many_entries = tmp_path / "many-entries.bin"
    many_entries.write_bytes(container(entries))
    for path, message in (
        (nested, "malformed shape"),
        (meta_nested, "embedded config is invalid"),
        (many_layers, "missing tensors"),
        (many_entries, "not a randlora checkpoint"),
    ):
        header = int.from_bytes(path.read_bytes()[:8], "little")
        assert header <= MAX_HEADER_BYTES
        out = run_bounded("load", path, budget=32 * header, timeout=120)
        assert out.startswith("refused: CheckpointError") and message in out, out
