"""torch.distributed with RandLoRA on CPU (gloo, loopback 127.0.0.1 only): DDP and FSDP2.

* DDP: 2 processes train a small model for several steps on halves of a global batch; the trained
  adapter equals single-process training on the whole batch (float32 tolerance). Every rank
  generates the shared bases from the seed, with a different torch RNG state on each rank, and a
  hash gathered across ranks before any wrapping shows they are identical without a broadcast.
* FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 processes train a small transformer-style model
  with sharded lambda/gamma; ``build_checkpoint`` gathers the DTensor shards on every rank, rank 0
  writes the file, and an unsharded model loaded from it gives the sharded model's outputs (and
  single-process training's).

Workers are spawned processes with a join timeout, a rendezvous store held by the test process on
127.0.0.1 and ``GLOO_SOCKET_IFNAME=lo``; each meets the others at a barrier, destroys its process
group and exits without interpreter finalization. Results travel as safetensors / JSON files, a
worker's Python traceback as ``error<rank>.txt`` and a crash's thread stacks as ``fault<rank>.txt``.
"""

from __future__ import annotations

import faulthandler
import hashlib
import inspect
import json
import os
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from randlora_core import RandLoraConfig, RandLoraModel, get_randlora_model, load_adapter
from randlora_core.checkpoint import build_checkpoint
from randlora_spec import checkpoint as spec_ckpt

WORLD = 2
JOIN_TIMEOUT_S = 180
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
STEPS = 5
LR = 1e-3

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")


def _entry(fn: Callable[[int, Path], None], rank: int, store_port: int, out: Path) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # A crash in C++ (SIGABRT, SIGSEGV) leaves no Python traceback: dump every thread's stack instead.
    fault_log = (out / f"fault{rank}.txt").open("w")
    faulthandler.enable(fault_log, all_threads=True)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    code = 1
    try:
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
        try:
            fn(rank, out)
            # No rank closes its connections while a peer may still be inside a collective.
            dist.barrier()
        finally:
            dist.destroy_process_group()
        code = 0
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
    finally:
        # Leave the way fork-started workers do: a spawned child otherwise runs full interpreter
        # finalization, where torch's C++ communication threads can be torn down in any order and
        # abort ("terminate called without an active exception") after all the work succeeded.
        fault_log.flush()
        os._exit(code)


def run_world(fn: Callable[[int, Path], None], out: Path) -> None:
    """Run ``fn(rank, out)`` on WORLD spawned processes; fail with the workers' tracebacks.

    The rendezvous store lives in this process, bound to a port the OS picks, so no rank depends on
    another rank's process staying alive for it and no other test can take the port in between.
    """
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, rank, store.port, out), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    errors = "\n".join(f.read_text() for f in sorted(out.glob("error*.txt")) + sorted(out.glob("fault*.txt")))
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errors}"


def bases_hash(model: RandLoraModel) -> bytes:
    bases = model.randlora_bases
    assert bases is not None
    digest = hashlib.sha256()
    for t in (bases.randlora_A, bases.randlora_B):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().contiguous().numpy().tobytes())
    return digest.digest()


def gathered_hashes(digest: bytes) -> list[bytes]:
    mine = torch.tensor(list(digest), dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [bytes(t.tolist()) for t in everyone]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.named_parameters() if "randlora_" in k}


# -- DDP ------------------------------------------------------------------------------------------


def mlp_model(adapter_seed: int) -> RandLoraModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    torch.manual_seed(adapter_seed)  # lambda init (init_weights=False) and any torch RNG use differ per rank
    return get_randlora_model(base, RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["0", "2"], init_weights=False))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(42)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()


def ddp_worker(rank: int, out: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = mlp_model(adapter_seed=1000 + rank)
    before = bases_hash(model)
    hashes = gathered_hashes(before)  # before DDP exists: nothing has been broadcast
    # The bases are identical already: no per-step buffer sync (torch < 2.13 spells it broadcast_buffers=False).
    no_sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    ddp = DistributedDataParallel(model, **{no_sync: False})
    x, y = global_batch()
    per = x.shape[0] // WORLD
    train(ddp, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
    assert bases_hash(model) == before
    if rank == 0:
        (out / "hashes.json").write_text(json.dumps([h.hex() for h in hashes]))
        save_file(adapter_state(model), out / "ddp_params.safetensors")
        model.save_adapter(out / "ddp_adapter.safetensors")


def test_ddp_matches_single_process_training(tmp_path: Path) -> None:
    run_world(ddp_worker, tmp_path)
    hashes = json.loads((tmp_path / "hashes.json").read_text())
    reference = mlp_model(adapter_seed=1000)  # rank 0's initial state, which DDP broadcast at construction
    assert hashes == [bases_hash(reference).hex()] * WORLD  # every rank regenerated identical bases
    x, y = global_batch()
    train(reference, x, y)
    got = load_file(tmp_path / "ddp_params.safetensors")
    want = adapter_state(reference)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=2e-5, atol=1e-6)
    initial = adapter_state(mlp_model(adapter_seed=1000))
    moved = max(float((want[k] - initial[k]).abs().max()) for k in want)
    assert moved > 1e-3  # training really changed the adapter
    torch.manual_seed(0)  # the same frozen base weights
    loaded = load_adapter(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)), tmp_path / "ddp_adapter.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=2e-5, atol=1e-6)


# -- FSDP2 ----------------------------------------------------------------------------------------


class Block(nn.Module):
    """A pre-norm transformer block: single-head attention and an MLP, all projections nn.Linear."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.o_proj(attn @ v)
        return x + self.down(torch.relu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 16, n_layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


TRANSFORMER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up", "down", "head"]  # head: the root returns our output


def transformer_base() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer()


def transformer_model() -> RandLoraModel:
    config = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=TRANSFORMER_TARGETS, init_weights=False)
    model = get_randlora_model(transformer_base(), config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "randlora_lambda" in name:
                p.copy_(torch.randn(p.shape) * 0.5)
    return model


def sequence_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(4, 6, 16, generator=gen), torch.randn(4, 6, 4, generator=gen)


def fsdp_supported() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch.distributed.fsdp.fully_shard is not available: {exc}"
    return None


def fsdp_worker(rank: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = transformer_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lam = model.model.layers[0].q_proj.randlora_lambda["default"]
    assert isinstance(lam, DTensor), type(lam)
    x, y = sequence_batch()
    per = x.shape[0] // WORLD
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per])
    ckpt = build_checkpoint(model)  # a collective: gathers every sharded lambda/gamma (DTensor.full_tensor)
    with torch.no_grad():
        y_sharded = model(x)  # the full batch through the sharded model, on every rank
    if rank == 0:
        spec_ckpt.save(out / "fsdp_adapter.safetensors", ckpt)
        save_file({"y": y_sharded.contiguous()}, out / "fsdp_outputs.safetensors")
        (out / "fsdp_warnings.json").write_text(json.dumps([str(w.message) for w in caught]))


@pytest.mark.skipif(fsdp_supported() is not None, reason=str(fsdp_supported()))
def test_fsdp2_sharded_training_saves_a_full_adapter(tmp_path: Path) -> None:
    run_world(fsdp_worker, tmp_path)
    x, y = sequence_batch()
    loaded = load_adapter(transformer_base(), tmp_path / "fsdp_adapter.safetensors")
    y_sharded = load_file(tmp_path / "fsdp_outputs.safetensors")["y"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y_sharded, rtol=2e-5, atol=1e-5)
    reference = transformer_model()
    train(reference, x, y)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=2e-5, atol=1e-5)
        assert not torch.allclose(reference(x), transformer_model()(x))  # training changed the outputs
    # the same parameters as single-process training on the global batch, as the DDP test checks
    sharded = spec_ckpt.load(tmp_path / "fsdp_adapter.safetensors")
    want = {k.removeprefix("model."): v for k, v in adapter_state(reference).items()}
    for path in sharded.layers:
        for suffix, key in ((".randlora_lambda", "randlora_lambda.default"), (".randlora_gamma", "randlora_gamma.default")):
            got = torch.from_numpy(sharded.tensors[path + suffix])
            torch.testing.assert_close(got, want[f"{path}.{key}"], rtol=2e-5, atol=1e-6)
    # no warning from our modules during sharded training (FSDP2 warned about a view-returning forward)
    assert [w for w in json.loads((tmp_path / "fsdp_warnings.json").read_text()) if "view" in w] == []
