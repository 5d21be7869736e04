"""Fork server for test_atomic_save.py: imports torch once, then forks one saving child per trial.

Protocol on stdin/stdout, one line each:
    ``go <path>``   fork a child that saves the adapter to <path> in an endless loop (version 1, 2, ...
                    written as lambda = version everywhere); the server answers ``pid <pid>``.
    ``reap <pid>``  wait for that (killed) child; answers ``reaped <status>``.
    ``quit``        exit.
On start it saves twice to a scratch file and prints ``ready <seconds one save takes>``.
The parent SIGKILLs each child at a random moment. Forking keeps a trial cheap (no torch import);
the server runs single-threaded (OMP_NUM_THREADS=1) so forking it is safe.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model, save_adapter

WIDTH, LAYERS, RANK = 768, 4, 4


def build() -> nn.Module:
    """The adapter both sides agree on: LAYERS x Linear(WIDTH, WIDTH), r=RANK, bases stored (~8 MB file)."""
    torch.manual_seed(0)
    base = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
    return get_randlora_model(base, RandLoraConfig(r=RANK, target_modules=[str(i) for i in range(LAYERS)]))


def set_version(model: nn.Module, version: int) -> None:
    """Every lambda of the model becomes ``version``."""
    with torch.no_grad():
        for _, layer in model.named_randlora_layers():
            layer.randlora_lambda["default"].fill_(float(version))


def save_forever(model: nn.Module, path: str) -> None:
    for version in itertools.count(1):
        set_version(model, version)
        save_adapter(model, path)


def main() -> None:
    torch.set_num_threads(1)
    model = build()
    # Children must start saving at once: pay every lazy import and first-call cost here, before
    # forking, and tell the parent how long one save takes so it spreads its kills over many saves.
    scratch = Path(tempfile.mkdtemp()) / "warmup.safetensors"
    save_adapter(model, scratch)
    start = time.perf_counter()
    save_adapter(model, scratch)
    print(f"ready {time.perf_counter() - start:.6f}", flush=True)
    shutil.rmtree(scratch.parent)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "go":
            pid = os.fork()
            if pid == 0:  # child: save until killed
                try:
                    save_forever(model, arg)
                finally:
                    os._exit(1)
            print(f"pid {pid}", flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(arg), 0)
            print(f"reaped {status}", flush=True)
        elif command == "quit":
            return


if __name__ == "__main__":
    main()
