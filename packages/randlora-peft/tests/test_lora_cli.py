"""``randlora-peft to-lora`` follows the CLI's conventions (issue #13, #18).

Every failure is one line ``randlora-peft: error: ...`` and exit status 1 (2 for usage), OS errors
included (a full disk via ``RLIMIT_FSIZE``, an unwritable parent); a failed export leaves no DST
and an old DST untouched; ``--json`` prints one object, ``--quiet`` nothing; written files follow
the umask; ``to-lora --help`` imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from forked import run_forked
from peft_helpers import portable_checkpoint
from test_cli_polish import HEAVY
from test_peft_hostile import unwritable  # noqa: F401 - a fixture

from randlora_peft.cli import main
from randlora_peft.lora_export import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE
from randlora_spec import checkpoint as spec_ckpt


@pytest.fixture
def src(tmp_path) -> Path:
    """A randlora checkpoint file (layers 16x16 and 16 -> 24, r = 4)."""
    path = tmp_path / "adapter.safetensors"
    spec_ckpt.save(path, portable_checkpoint())
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name.startswith(f".{d.name}."))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randlora-peft: error: "), err
    return lines[0]


def test_report_as_text_json_and_quiet(src, tmp_path, capsys):
    assert main(["to-lora", str(src), str(tmp_path / "text"), "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "blk.q: 16x16, rank 2" in text and text.splitlines()[-1].startswith("total: 2 layers")
    assert main(["to-lora", str(src), str(tmp_path / "json"), "--rank", "0.9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["command"] == "to-lora" and [x["path"] for x in report["layers"]] == ["blk.q", "blk.v"]
    assert 0.9 <= report["captured_energy"] <= 1 and report["relative_error"] >= 0
    assert main(["to-lora", str(src), str(tmp_path / "quiet"), "--rank", "2", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert _files(tmp_path / "text").keys() == {LORA_CONFIG_FILE, LORA_WEIGHTS_FILE}


def _garbage(tmp: Path) -> Path:
    bad = tmp / "bad.safetensors"
    bad.write_bytes(b"\x00" * 7)
    return bad


FAILURES = {
    "missing source": (lambda tmp, src: [str(tmp / "nope.safetensors")], "nope.safetensors: No such file or directory"),
    "not a checkpoint": (lambda tmp, src: [str(_garbage(tmp))], "bad.safetensors"),
    "rank 0": (lambda tmp, src: [str(src), "--rank", "0"], "rank: must be an integer >= 1"),
    "energy above 1": (lambda tmp, src: [str(src), "--rank", "1.5"], "must lie in (0, 1]"),
    "dst is a file": (lambda tmp, src: [str(src), "--dst-file"], "exists and is not a directory"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_print_one_line_exit_1_and_write_nothing(case, src, tmp_path, capsys):
    make, expected = FAILURES[case]
    argv = make(tmp_path, src)
    dst = tmp_path / "out"
    if "--dst-file" in argv:
        argv.remove("--dst-file")
        dst.write_text("a file")
    argv = ["to-lora", argv[0], str(dst), *(argv[1:] or ["--rank", "2"])]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert expected in _one_line(err) and out == ""
    assert dst.is_file() if case == "dst is a file" else not dst.exists()
    assert _siblings(dst) == []
    assert main([*argv, "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is False and expected in _one_line(err)


def test_an_existing_adapter_needs_overwrite_and_is_kept_until_replaced(src, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["to-lora", str(src), str(dst), "--rank", "2", "-q"]) == 0
    before = _files(dst)
    assert main(["to-lora", str(src), str(dst), "--rank", "3"]) == 1
    assert "pass overwrite=True (--overwrite)" in _one_line(capsys.readouterr().err)
    assert _files(dst) == before
    (dst / LORA_CONFIG_FILE).chmod(0o640)
    (dst / "README.md").write_text("model card")
    assert main(["to-lora", str(src), str(dst), "--rank", "3", "--overwrite", "-q"]) == 0
    assert _files(dst) != before and (dst / "README.md").read_text() == "model card"
    assert stat.S_IMODE((dst / LORA_CONFIG_FILE).stat().st_mode) == 0o640  # a replaced file keeps its mode


def _with_file_size_limit(argv: list[str], limit: int) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return main(argv)


def test_full_disk_leaves_no_dst_or_the_old_one(src, tmp_path):
    fresh = tmp_path / "a" / "fresh"
    result = run_forked(lambda: _with_file_size_limit(["to-lora", str(src), str(fresh), "--rank", "4"], 256))
    assert result.status == 1 and "File too large" in _one_line(result.stderr)
    assert not (tmp_path / "a").exists()
    old = tmp_path / "old"
    assert main(["to-lora", str(src), str(old), "--rank", "1", "-q"]) == 0
    before = _files(old)
    result = run_forked(lambda: _with_file_size_limit(["to-lora", str(src), str(old), "--rank", "4", "--overwrite"], 256))
    assert result.status == 1 and "File too large" in _one_line(result.stderr)
    assert _files(old) == before and _siblings(old) == []


def test_unwritable_parent_is_one_line(src, unwritable):  # noqa: F811 - the fixture
    result = run_forked(lambda: main(["to-lora", str(src), str(unwritable / "out"), "--rank", "2"]))
    line = _one_line(result.stderr)
    assert result.status == 1 and ("Permission denied" in line or "Operation not permitted" in line)
    assert list(unwritable.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(src, tmp_path, umask):
    previous = os.umask(umask)
    try:
        assert main(["to-lora", str(src), str(tmp_path / "out"), "--rank", "2", "-q"]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    for name in (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask


USAGE_ERRORS = {
    "rank not a number": (["--rank", "many"], "argument --rank: not a number: 'many'"),
    "no rank": ([], "the following arguments are required: --rank"),
    "json and quiet": (["--rank", "2", "--json", "--quiet"], "not allowed with argument"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_2(case, src, tmp_path, capsys):
    extra, expected = USAGE_ERRORS[case]
    with pytest.raises(SystemExit) as exc:
        main(["to-lora", str(src), str(tmp_path / "out"), *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith("randlora-peft to-lora: error: ") and lines[0].endswith("(see randlora-peft to-lora --help)")
    assert not (tmp_path / "out").exists()


def test_help_imports_no_heavy_module():
    code = "\n".join(
        [
            "import sys",
            "from randlora_peft.cli import main",
            "try:",
            "    main(['to-lora', '--help'])",
            "except SystemExit as exc:",
            "    code = exc.code",
            f"print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}), 'CODE', code)",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert "HEAVY [] CODE 0" in done.stdout, done.stdout + done.stderr
    assert "--json" in done.stdout and "--quiet" in done.stdout
