"""Error catalogue: every error the public API raises on purpose, its type and a message substring."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import Block
from torch import nn

from randlora_core import (
    AdapterNotFoundError,
    BasisRuleError,
    CheckpointError,
    ConfigError,
    MergeError,
    RandLoraConfig,
    RandLoraError,
    RandLoraModel,
    ShapeError,
    TargetModuleError,
    get_randlora_model,
    load_adapter,
)


def fresh(**kw) -> RandLoraModel:
    torch.manual_seed(0)
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    return get_randlora_model(Block(), RandLoraConfig(r=4, **kw))


def merged() -> RandLoraModel:
    model = fresh()
    model.merge_adapter()
    return model


def no_active() -> RandLoraModel:
    model = fresh()
    model.delete_adapter("default")
    return model


CATALOGUE: list[tuple[str, Callable[[], object], type[RandLoraError], str]] = [
    ("invalid config field", lambda: RandLoraConfig(r=0), ConfigError, "r:"),
    ("unknown config field", lambda: RandLoraConfig(rank=4), ConfigError, "rank: unknown field"),
    ("no target_modules", lambda: get_randlora_model(Block(), RandLoraConfig()), ConfigError, "target_modules"),
    ("config of another type", lambda: get_randlora_model(Block(), {"r": 4}), ConfigError, "RandLoraConfig"),  # type: ignore[arg-type]
    (
        "adapter name taken",
        lambda: fresh().add_adapter("default", RandLoraConfig(target_modules=["q_proj"])),
        ConfigError,
        "already exists",
    ),
    (
        "different seed",
        lambda: fresh().add_adapter("b", RandLoraConfig(target_modules=["q_proj"], projection_prng_key=9)),
        ConfigError,
        "projection_prng_key",
    ),
    ("unknown modules_to_save", lambda: fresh(modules_to_save=["head"]), ConfigError, "modules_to_save"),
    ("target matches nothing", lambda: fresh(target_modules=["nope"]), TargetModuleError, "matched no module"),
    ("target not linear", lambda: fresh(target_modules=["norm"]), TargetModuleError, "norm (LayerNorm)"),
    ("rule not generatable", lambda: fresh(basis_rule="peft-torch-v1"), BasisRuleError, "peft-torch-v1"),
    ("input size", lambda: fresh()(torch.randn(2, 5)), ShapeError, "in_features=16, got 5"),
    (
        "bases too small",
        lambda: fresh().set_shared_bases(torch.zeros(4, 1, 8), torch.zeros(24, 4, 4)),
        ShapeError,
        "too small",
    ),
    ("set unknown adapter", lambda: fresh().set_adapter("x"), AdapterNotFoundError, "'x'"),
    ("delete unknown adapter", lambda: fresh().delete_adapter("x"), AdapterNotFoundError, "'x' not found"),
    ("merge unknown adapter", lambda: fresh().merge_adapter("x"), AdapterNotFoundError, "'x'"),
    ("save unknown adapter", lambda: fresh().save_adapter("/tmp/never.safetensors", "x"), AdapterNotFoundError, "'x'"),
    ("merge twice", lambda: merged().merge_adapter(), MergeError, "already merged"),
    ("unmerge nothing", lambda: fresh().unmerge_adapter(), MergeError, "nothing to unmerge"),
    ("delete merged", lambda: merged().delete_adapter("default"), MergeError, "unmerge_adapter"),
    ("disable while merged", lambda: merged().disable_adapter().__enter__(), MergeError, "unmerge_adapter"),
    ("merge with none active", lambda: no_active().merge_adapter(), MergeError, "no adapter to merge"),
    ("missing checkpoint", lambda: load_adapter(Block(), "/nonexistent.safetensors"), CheckpointError, "no such checkpoint"),
]


@pytest.mark.parametrize(("what", "call", "error", "text"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_error_catalogue(what: str, call: Callable[[], object], error: type[RandLoraError], text: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)
    assert isinstance(info.value, RandLoraError)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="too short"):
        load_adapter(nn.Linear(2, 2), path)


def test_builtin_bases_of_errors() -> None:
    # callers with existing ``except ValueError`` / ``except KeyError`` keep working
    assert issubclass(ConfigError, ValueError) and issubclass(AdapterNotFoundError, KeyError)
    assert issubclass(MergeError, RuntimeError)
