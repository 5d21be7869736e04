"""Error catalogue rows for randlora-jax (docs/errors.md, ERR-160 - ERR-177).

Every row checks the exception type and message pieces the catalogue documents, and that the model
(every variable bit for bit, its type and metadata, the module tree) and the files are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from randlora_jax import RandLoraConfig, generate_bases, get_randlora_model, load_adapter
from randlora_jax.checkpoint import build_checkpoint
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape
from randlora_spec.testing import catalogue


class Net(nnx.Module):
    def __init__(self, out: int = 24) -> None:
        rngs = nnx.Rngs(0)
        self.fc1 = nnx.Linear(16, out, rngs=rngs)
        self.fc2 = nnx.Linear(out, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.fc2(self.fc1(x)))


def model_state(model: object) -> list[tuple[str, str, str, bytes]]:
    """Every variable (path, type, metadata, bytes) and every module's type: equal means unchanged."""
    out = []
    for path, node in nnx.iter_graph(model):
        name = ".".join(map(str, path))
        if isinstance(node, nnx.Variable):
            out.append(
                (name, type(node).__name__, repr(sorted(node.get_metadata().items())), np.asarray(node.get_value()).tobytes())
            )
        elif isinstance(node, nnx.Module):
            out.append((name, type(node).__name__, "", b""))
    return out


def adapted(**config: object) -> object:
    return get_randlora_model(Net(), RandLoraConfig(r=4, target_modules=["fc1", "fc2"], **config))


Setup = Callable[[Path], tuple[object | None, Callable[[], object]]]
ROWS: dict[str, Setup] = {}


def row(row_id: str) -> Callable[[Setup], Setup]:
    def register(fn: Setup) -> Setup:
        ROWS[row_id] = fn
        return fn

    return register


@row("ERR-160")
def _no_targets(tmp: Path):
    net = Net()
    return net, lambda: get_randlora_model(net, RandLoraConfig(r=4))


@row("ERR-161")
def _nothing_matches(tmp: Path):
    net = Net()
    return net, lambda: get_randlora_model(net, RandLoraConfig(r=4, target_modules=["nope"]))


@row("ERR-162")
def _layer_norm(tmp: Path):
    net = Net()
    return net, lambda: get_randlora_model(net, RandLoraConfig(r=4, target_modules=["fc1", "norm"]))


@row("ERR-163")
def _einsum_not_linear(tmp: Path):
    holder = nnx.Dict({"proj": nnx.Einsum("bi,ioh->boh", (16, 8, 2), rngs=nnx.Rngs(0))})
    return holder, lambda: get_randlora_model(holder, RandLoraConfig(r=4, target_modules=["proj"]))


@row("ERR-164")
def _dict_config(tmp: Path):
    net = Net()
    return net, lambda: get_randlora_model(net, {"r": 4, "target_modules": ["fc1"]})


@row("ERR-165")
def _other_seed(tmp: Path):
    model = adapted()
    return model, lambda: model.add_adapter("x", RandLoraConfig(r=4, target_modules=["fc1"], projection_prng_key=1))


@row("ERR-166")
def _very_sparse_growth(tmp: Path):
    layers = nnx.Dict({"small": nnx.Linear(8, 8, rngs=nnx.Rngs(0)), "big": nnx.Linear(16, 16, rngs=nnx.Rngs(0))})
    model = get_randlora_model(layers, RandLoraConfig(r=4, target_modules=["small"], very_sparse=True))
    return model, lambda: model.add_adapter("wide", RandLoraConfig(r=4, target_modules=["big"], very_sparse=True))


@row("ERR-167")
def _unknown_adapter(tmp: Path):
    model = adapted()
    return model, lambda: model.set_adapter("nope")


@row("ERR-168")
def _merge_twice(tmp: Path):
    model = adapted()
    model.merge_adapter()
    return model, model.merge_adapter


@row("ERR-169")
def _unmerge_nothing(tmp: Path):
    model = adapted()
    return model, model.unmerge_adapter


@row("ERR-170")
def _integer_input(tmp: Path):
    model = adapted()
    return model, lambda: model(jnp.ones((2, 16), jnp.int32))


@row("ERR-171")
def _wrong_width(tmp: Path):
    model = adapted()
    return model, lambda: model(jnp.ones((2, 13)))


@row("ERR-172")
def _missing_file(tmp: Path):
    net = Net()
    return net, lambda: load_adapter(net, tmp / "missing.safetensors")


@row("ERR-173")
def _sizes_differ(tmp: Path):
    spec_ckpt.save(tmp / "a.safetensors", build_checkpoint(adapted()))
    net = Net(out=25)
    return net, lambda: load_adapter(net, tmp / "a.safetensors")


@row("ERR-174")
def _unregenerable_rule(tmp: Path):
    ckpt = build_checkpoint(adapted(save_projection=False))
    ckpt.config = ckpt.config.model_copy(update={"basis_rule": "peft-torch-v1"})
    (tmp / "peft.safetensors").write_bytes(spec_ckpt.to_bytes(ckpt, readable_basis_rules=("peft-torch-v1",)))
    net = Net()
    return net, lambda: load_adapter(net, tmp / "peft.safetensors")


@row("ERR-175")
def _generate_peft_rule(tmp: Path):
    return None, lambda: generate_bases(0, BasesShape(4, 16, 24, 4), basis_rule="peft-torch-v1")


@row("ERR-176")
def _save_without_active(tmp: Path):
    model = adapted()
    model.set_adapter([])
    return model, lambda: model.save_adapter(tmp / "a.safetensors")


@row("ERR-177")
def _name_taken(tmp: Path):
    spec_ckpt.save(tmp / "a.safetensors", build_checkpoint(adapted()))
    model = adapted()
    return model, lambda: load_adapter(model, tmp / "a.safetensors", adapter_name="default")


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path) -> None:
    model, call = ROWS[row_id](tmp_path)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)
