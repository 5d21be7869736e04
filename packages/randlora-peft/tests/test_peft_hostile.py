"""Hostile inputs and crash consistency for randlora-peft (issue #13, classes 2, 5, 8 and 9).

* Memory bombs run in a child process under ``RLIMIT_AS`` (its address space after the imports plus
  384 MiB): each is refused by the size check, the child's peak RSS grows by less than 200 MB, and
  allocating what the file asked for fails under that limit, so the bound is real.
* Time bombs run in a child with a timeout far below what the unbounded code needed.
* OS errors (a full disk via ``RLIMIT_FSIZE``, an unwritable parent) end the CLI with one line and
  exit status 1; a failed convert leaves no DST and an old DST intact.
* Crash consistency: ``randlora-peft convert --overwrite`` is SIGKILLed at every call the code that
  puts DST in place makes (each write, fsync, rename: 60 trials for a PEFT directory, 19 for a
  checkpoint file; chosen by counting calls, so the trials do not depend on timing); DST is always
  byte for byte the old adapter or the new one. Two writers and a reader running
  together never produce a mixed snapshot.
* ``auto_mapping`` in an adapter's config never selects code.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from forked import kill_at_event, run_forked, start_forked, wait_forked
from peft_helpers import portable_checkpoint
from test_peft_hostile_catalogue import BOMBS, ROWS, TIME_BOMB

import randlora_peft.publish
from randlora_peft import directory, read_peft_adapter, write_peft_adapter
from randlora_peft.cli import main
from randlora_spec import checkpoint as spec_ckpt

NAMES = ("adapter_config.json", "adapter_model.safetensors", "randlora_layers.json")
HEADROOM = 384 * 1024 * 1024


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return int(status.read().split("VmSize:")[1].split()[0]) * 1024


def _bomb(row: str, tmp: Path, asked: int) -> int:
    """In a forked child: build the hostile input, cap the address space, try it, report as JSON on stdout."""
    _, call = ROWS[row](tmp)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + HEADROOM, resource.RLIM_INFINITY))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        outcome = "accepted"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    try:
        torch.empty(asked // 4, dtype=torch.float32)
        bound = False
    except (MemoryError, RuntimeError):
        bound = True
    print(json.dumps({"outcome": outcome, "rss_growth_kb": grown, "asked_fails_under_limit": bound}))
    return 0


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_memory_bombs_are_refused_within_a_bounded_address_space(bomb, tmp_path):
    row, asked = BOMBS[bomb]
    result = run_forked(lambda: _bomb(row, tmp_path, asked), timeout=120)
    assert result.status == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outcome"].startswith("CheckpointError:") and "refusing to allocate" in report["outcome"], report
    assert report["rss_growth_kb"] < 200 * 1024, report
    assert report["asked_fails_under_limit"], "the limit would not have caught the allocation: the test proves nothing"


def _refused(row: str, tmp: Path) -> int:
    try:
        ROWS[row](tmp)[1]()
    except Exception as exc:
        print(type(exc).__name__, exc)
    return 0


def test_many_modules_to_save_names_cost_linear_time(tmp_path):
    """The input took names x keys x depth string comparisons (billions); now it is refused within the timeout."""
    result = run_forked(lambda: _refused(TIME_BOMB, tmp_path), timeout=120)
    assert result.signal is None, "still running after 120 s"
    assert "CheckpointError" in result.stdout and "unexpected tensor" in result.stdout, result.stderr[-2000:]


def test_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path):
    d = write_peft_adapter(portable_checkpoint(), tmp_path / "peft")
    (d / "adapter_model.safetensors").unlink()
    os.mkfifo(d / "adapter_model.safetensors")  # opening it for reading would block until a writer comes

    def read() -> int:
        try:
            read_peft_adapter(d)
        except Exception as exc:
            print(exc)
        return 0

    result = run_forked(read, timeout=60)
    assert result.signal is None and "not a regular file" in result.stdout


def test_auto_mapping_never_selects_code(tmp_path):
    """The adapter's auto_mapping names a transformers module; --base-model must not import (or call) it."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "base"
    )
    ckpt = portable_checkpoint()
    ckpt.layers = {k.replace("blk.", "model.layers.0.self_attn."): v for k, v in ckpt.layers.items()}
    ckpt.tensors = {k.replace("blk.", "model.layers.0.self_attn."): v for k, v in ckpt.tensors.items()}
    d = tmp_path / "peft"
    write_peft_adapter(ckpt, d)
    trap = {"base_model_class": "BertModel", "parent_library": "transformers.models.bert.modeling_bert"}
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "auto_mapping": trap}))
    trap_module = trap["parent_library"]
    argv = ["convert", str(d), str(tmp_path / "o.safetensors"), "--base-model", str(tmp_path / "base"), "-q"]

    def convert_and_look() -> int:
        main(argv)  # refused or not (the layer sizes differ from the base model's): it must not import the trap
        print("IMPORTED" if trap_module in sys.modules else "CLEAN")
        return 0

    if trap_module in sys.modules:  # this process imported it already: look from a fresh interpreter
        code = f"import sys\nfrom randlora_peft.cli import main\nmain({argv!r})\nprint({trap_module!r} in sys.modules)"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
        assert done.stdout.strip().endswith("False"), done.stdout + done.stderr[-2000:]
        return
    result = run_forked(convert_and_look)
    assert result.stdout.strip().endswith("CLEAN"), result.stdout + result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# -- OS errors and failed conversions --------------------------------------------------------------


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name != d.name and p.name.startswith(f".{d.name}."))


@pytest.fixture
def old_and_new(tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """DST holding adapter A (written by our writer), our checkpoint file of adapter B, and A's files."""
    dst = write_peft_adapter(portable_checkpoint(seed=1), tmp_path / "dst")
    src = tmp_path / "b.safetensors"
    spec_ckpt.save(src, portable_checkpoint(seed=2, scale=3.0, alpha=16.0))  # every file differs from A's
    return dst, src, _files(dst)


def _cli_with_file_size_limit(argv: list[str], limit: int) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return main(argv)


def _one_line(result) -> str:
    assert result.signal is None and result.status == 1, (result.status, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randlora-peft: error: "), result.stderr
    return lines[0]


def test_full_disk_keeps_the_old_directory_and_prints_one_line(old_and_new):
    dst, src, before = old_and_new
    result = run_forked(lambda: _cli_with_file_size_limit(["convert", str(src), str(dst), "--overwrite"], 1024))
    assert "File too large" in _one_line(result)
    assert _files(dst) == before and _siblings(dst) == []


def test_full_disk_leaves_no_new_file(old_and_new, tmp_path):
    dst, _, _ = old_and_new
    out = tmp_path / "new" / "deeper" / "x.safetensors"
    result = run_forked(lambda: _cli_with_file_size_limit(["convert", str(dst), str(out)], 512))
    assert "File too large" in _one_line(result)
    assert not (tmp_path / "new").exists()  # the parents it created are gone too


def test_full_disk_leaves_no_new_directory(old_and_new, tmp_path):
    _, src, _ = old_and_new
    out = tmp_path / "fresh"
    result = run_forked(lambda: _cli_with_file_size_limit(["convert", str(src), str(out)], 1024))
    assert "File too large" in _one_line(result)
    assert not out.exists() and _siblings(out) == []


@pytest.fixture
def unwritable(tmp_path):
    """A directory nobody (root included) can create entries in, or a skip when this machine cannot make one."""
    d = tmp_path / "locked"
    d.mkdir()
    undo: list[str] = []
    if os.geteuid() != 0:
        d.chmod(0o555)
        undo = ["chmod"]
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(d)], capture_output=True, check=False).returncode == 0:
        undo = ["chattr"]
    try:
        (d / "probe").touch()
    except OSError:
        yield d
    else:
        pytest.skip("cannot make an unwritable directory here")
    finally:
        if "chattr" in undo:
            subprocess.run(["chattr", "-i", str(d)], check=False)
        d.chmod(0o755)


def test_unwritable_parent_one_line_and_nothing_written(old_and_new, unwritable):
    dst, src, _ = old_and_new
    for argv in (["convert", str(src), str(unwritable / "out")], ["convert", str(dst), str(unwritable / "x.safetensors")]):
        result = run_forked(lambda argv=argv: main(argv))
        line = _one_line(result)
        assert "Permission denied" in line or "Operation not permitted" in line
        assert list(unwritable.iterdir()) == []


def test_failed_convert_leaves_no_dst_and_the_retry_works(old_and_new, tmp_path, capsys):
    dst, _, _ = old_and_new
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    good_sidecar = (bad / "randlora_layers.json").read_bytes()
    (bad / "randlora_layers.json").write_text('{"format": "randlora-peft.layers/1", "layers": {"blk.q": 16.9}}')
    out = tmp_path / "a" / "b" / "out.safetensors"
    assert main(["convert", str(bad), str(out)]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "a").exists()
    (bad / "randlora_layers.json").write_bytes(good_sidecar)
    assert main(["convert", str(bad), str(out), "-q"]) == 0  # no "exists" from a half-made DST
    assert out.is_file()


def test_failed_overwrite_keeps_the_old_directory(old_and_new, tmp_path, capsys):
    dst, _, before = old_and_new
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 7)
    assert main(["convert", str(bad), str(dst), "--overwrite", "--to-peft"]) == 1
    capsys.readouterr()
    assert _files(dst) == before and _siblings(dst) == []


# -- what the writer leaves: modes, other entries ---------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask_and_replaced_ones_keep_their_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        d = write_peft_adapter(portable_checkpoint(), tmp_path / "peft")
        out = tmp_path / "ours.safetensors"
        assert main(["convert", str(d), str(out), "-q"]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask
    for path in [*(d / n for n in NAMES), out]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    (d / "adapter_config.json").chmod(0o640)
    d.chmod(0o750)
    write_peft_adapter(portable_checkpoint(seed=5), d)
    assert stat.S_IMODE((d / "adapter_config.json").stat().st_mode) == 0o640
    assert stat.S_IMODE(d.stat().st_mode) == 0o750


def test_other_entries_of_the_directory_are_kept(tmp_path):
    d = write_peft_adapter(portable_checkpoint(), tmp_path / "peft")
    (d / "README.md").write_text("model card")
    (d / "other").mkdir()
    (d / "other" / "adapter_config.json").write_text("{}")
    (d / "link").symlink_to("README.md")
    write_peft_adapter(portable_checkpoint(seed=4), d)
    assert (d / "README.md").read_text() == "model card" and (d / "other" / "adapter_config.json").read_text() == "{}"
    assert os.readlink(d / "link") == "README.md"
    assert np.array_equal(read_peft_adapter(d).lam("blk.q"), portable_checkpoint(seed=4).lam("blk.q"))


# -- crash consistency and concurrency -------------------------------------------------------------

PUBLISH = randlora_peft.publish.__file__


def _state(path: Path) -> dict[str, bytes] | bytes | None:
    """What a reader finds at ``path``: a directory's files, a file's bytes, or nothing."""
    if path.is_dir():
        return _files(path)
    return path.read_bytes() if path.exists() else None


def _convert_killed_at(k: int, argv: list[str]) -> int:
    install = kill_at_event(PUBLISH, k)
    install()
    code = main(argv)
    sys.setprofile(None)
    print("EVENTS", install.count())
    return code


@pytest.mark.parametrize("direction", ["to-peft", "to-randlora"])
def test_kill_during_convert_overwrite_leaves_the_old_or_the_new_adapter(direction, tmp_path):
    """SIGKILL at every call publish.py makes while putting DST in place (each fsync, write, rename...)."""
    a, b = portable_checkpoint(seed=1), portable_checkpoint(seed=2, scale=3.0, alpha=16.0)  # every file differs
    if direction == "to-peft":
        src, dst = tmp_path / "b.safetensors", tmp_path / "dst"
        spec_ckpt.save(src, b)

        def reset() -> None:
            write_peft_adapter(a, dst)
    else:
        src, dst = write_peft_adapter(b, tmp_path / "b"), tmp_path / "dst.safetensors"

        def reset() -> None:
            spec_ckpt.save(dst, a)

    argv = ["convert", str(src), str(dst), "--overwrite", "-q"]
    reset()
    old = _state(dst)
    full = run_forked(lambda: _convert_killed_at(0, argv))
    new = _state(dst)
    assert full.status == 0 and new not in (None, old), full.stderr
    events = int(full.stdout.split("EVENTS")[1])
    outcomes = {"old": 0, "new": 0}
    for k in range(1, events + 1):
        reset()
        result = run_forked(lambda k=k: _convert_killed_at(k, argv))
        assert result.signal == signal.SIGKILL, (k, result.status, result.stderr)
        now = _state(dst)  # never None: the swap is one renameat2 (or one rename for a file)
        assert now in (old, new), f"killed at call {k} of {events}: DST holds neither the old nor the new adapter"
        outcomes["old" if now == old else "new"] += 1
        leftovers = _siblings(dst)
        assert all(n.endswith(".tmp") for n in leftovers), leftovers
        for name in leftovers:
            shutil.rmtree(dst.parent / name) if (dst.parent / name).is_dir() else (dst.parent / name).unlink()
    assert events >= (40 if direction == "to-peft" else 12), events  # trials: 60 and 19 at the time of writing
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes


def _version(seed: int) -> object:
    return portable_checkpoint(seed=seed, scale=float(seed), alpha=8.0 * seed)  # every file differs between versions


def _writer(ckpt_seed: int, dst: Path, rounds: int) -> int:
    ckpt = _version(ckpt_seed)
    for _ in range(rounds):
        write_peft_adapter(ckpt, dst)
    return 0


def _exited(pid: int) -> bool:
    """The child has exited (without reaping it: :func:`wait_forked` collects its status)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def test_two_writers_and_a_reader_never_see_a_mixed_directory(tmp_path):
    versions = [_files(write_peft_adapter(_version(seed), tmp_path / f"v{seed}")) for seed in (1, 2)]
    dst = write_peft_adapter(_version(1), tmp_path / "dst")
    pids = [start_forked(lambda s=s: _writer(s, dst, 40)) for s in (1, 2)]
    reads, mixed, seen, running = 0, 0, set(), set(pids)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        snap = directory.read_peft_directory(dst)
        files = {"adapter_model.safetensors": snap.weights, "randlora_layers.json": snap.sidecar}
        match = {i for i, v in enumerate(versions) if all(v[n] == files[n] for n in files)}
        match &= {i for i, v in enumerate(versions) if json.loads(v["adapter_config.json"]) == snap.config}
        mixed += not match
        seen |= match
        reads += 1
        running = {pid for pid in running if not _exited(pid)}
        if not running and reads >= 20:
            break
    statuses = [wait_forked(pid, timeout=60) for pid in pids]
    assert statuses == [0, 0] and mixed == 0 and reads >= 20, (statuses, mixed, reads)
    assert versions[0]["adapter_config.json"] != versions[1]["adapter_config.json"]  # a mix would be visible


def test_a_swap_while_reading_gives_the_new_version_whole(tmp_path, monkeypatch):
    """Deterministic interleaving: the directory is replaced after the reader opened it and read the config."""
    d = write_peft_adapter(portable_checkpoint(seed=1), tmp_path / "peft")
    new = portable_checkpoint(seed=2, scale=2.0)
    real = directory._config
    swapped = []

    def config_then_swap(dir_fd, path):
        result = real(dir_fd, path)
        if not swapped:
            swapped.append(True)
            write_peft_adapter(new, d)  # the old version is deleted while the reader holds it open
        return result

    monkeypatch.setattr(directory, "_config", config_then_swap)
    ckpt = read_peft_adapter(d)
    assert swapped and np.array_equal(ckpt.lam("blk.q"), new.lam("blk.q"))
