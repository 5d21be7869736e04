"""Saves are atomic and durable: SIGKILL a process in the middle of saving, the previous checkpoint survives.

A fork server (kill_save_server.py) imports torch once and forks, per trial, a child that saves
an ~8 MB adapter to the same path in an endless loop (version 1, 2, ...: every lambda equals the
version). The test SIGKILLs the child after a random delay and checks that the path holds a
complete, loadable checkpoint that is byte for byte one of the versions (the initial one or one the
child finished), and that the only other files are ``.<name>.<random>.tmp`` leftovers of the
killed write, which nothing mistakes for a checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from randlora_core import load_adapter
from randlora_core.checkpoint import build_checkpoint
from randlora_spec import checkpoint as spec_ckpt

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import kill_save_server as server  # noqa: E402

TRIALS = int(os.environ.get("RANDLORA_KILL_TRIALS", "24"))
NAME = "adapter.safetensors"


class ForkServer:
    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "kill_save_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        word, _, seconds = self.ask(None).partition(" ")
        assert word == "ready"
        self.save_seconds = float(seconds)

    def ask(self, line: str | None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if line is not None:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, "the fork server died"
        return answer

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.ask_quit()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)

    def ask_quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fork_server():
    srv = ForkServer()
    try:
        yield srv
    finally:
        srv.close()


_VERSIONS: dict[int, bytes] = {}
_MODEL: list[torch.nn.Module] = []


def version_bytes(version: int) -> bytes:
    """The exact bytes a save of ``version`` writes (the writer is deterministic)."""
    if version not in _VERSIONS:
        if not _MODEL:
            _MODEL.append(server.build())
        server.set_version(_MODEL[0], version)
        _VERSIONS[version] = spec_ckpt.to_bytes(build_checkpoint(_MODEL[0]))
    return _VERSIONS[version]


def test_sigkill_during_save_never_tears_the_checkpoint(fork_server: ForkServer, tmp_path: Path) -> None:
    rng = random.Random(7)
    torch.manual_seed(0)
    template = server.build()
    seen_versions, leftovers_total, mid_write = [], 0, 0
    for trial in range(TRIALS):
        directory = tmp_path / f"trial{trial}"
        directory.mkdir()
        path = directory / NAME
        path.write_bytes(version_bytes(0))  # the previous checkpoint
        pid = int(fork_server.ask(f"go {path}").split()[1])
        # Spread kills from "before the first save finished" to "after dozens", however fast saves are here.
        time.sleep(rng.uniform(0.0, max(0.6, 40 * fork_server.save_seconds)))
        os.kill(pid, signal.SIGKILL)
        status = int(fork_server.ask(f"reap {pid}").split()[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

        # The target is always a complete checkpoint: one of the versions, bit for bit, and loadable.
        blob = path.read_bytes()
        torch.manual_seed(0)
        loaded = load_adapter(
            torch.nn.Sequential(*(torch.nn.Linear(server.WIDTH, server.WIDTH) for _ in range(server.LAYERS))), path
        )
        lam = {
            float(v)
            for _, layer in loaded.named_randlora_layers()
            for v in layer.randlora_lambda["default"].detach().flatten().tolist()
        }
        assert len(lam) == 1, f"trial {trial}: a mix of versions {sorted(lam)}"
        version = int(lam.pop())
        assert blob == version_bytes(version), f"trial {trial}: file is not exactly version {version}"
        for (_, a), (_, b) in zip(loaded.named_randlora_layers(), template.named_randlora_layers(), strict=True):
            assert torch.equal(a.randlora_gamma["default"], b.randlora_gamma["default"])
        seen_versions.append(version)

        # Nothing else but leftovers of the killed write, named so that no loader takes them for a checkpoint.
        others = sorted(p.name for p in directory.iterdir() if p.name != NAME)
        for name in others:
            assert name.startswith(f".{NAME}.") and name.endswith(".tmp"), name
            assert not name.endswith(".safetensors")
            mid_write += 1
        leftovers_total += len(others)
    print(f"\n{TRIALS} kills: versions found {seen_versions}; {leftovers_total} .tmp leftovers ({mid_write} kills mid-write)")
    # The kills landed at different points: some before the first save completed, some after several.
    assert len(set(seen_versions)) > 1
