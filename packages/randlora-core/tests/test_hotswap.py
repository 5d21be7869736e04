"""Hot-swapping an adapter's values in place: same outputs as loading the other adapter, no recompile, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import Block, randomize_adapters
from torch._dynamo.testing import CompileCounter

from randlora_core import RandLoraConfig, get_randlora_model, load_adapter
from randlora_core.testing import model_state
from randlora_spec.testing import catalogue


def saved(tmp: Path, name: str, seed: int, **kw: object) -> Path:
    torch.manual_seed(0)
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    kw.setdefault("randlora_alpha", 8.0)
    model = get_randlora_model(Block(), RandLoraConfig(**kw))  # type: ignore[arg-type]
    randomize_adapters(model, seed=seed)
    path = tmp / f"{name}.safetensors"
    model.save_adapter(path)
    return path


def base() -> Block:
    torch.manual_seed(0)
    return Block()


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("alpha_b", [8.0, 2.0])
def test_swapped_model_computes_the_other_adapter(tmp_path: Path, alpha_b: float) -> None:
    model = load_adapter(base(), saved(tmp_path, "a", 1))
    params = {n: p for n, p in model.named_parameters()}
    path_b = saved(tmp_path, "b", 2, randlora_alpha=alpha_b)
    model.hotswap_adapter(path_b)
    expected = load_adapter(base(), path_b)
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected(X), rtol=2e-5, atol=1e-6)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same parameter objects


def test_compiled_model_is_not_recompiled(tmp_path: Path) -> None:
    model = load_adapter(base(), saved(tmp_path, "a", 1))
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        before = compiled(X)
        assert counter.frame_count == 1
        path_b = saved(tmp_path, "b", 2)
        model.hotswap_adapter(path_b)
        after = compiled(X)
    assert counter.frame_count == 1  # no recompilation
    assert not torch.allclose(before, after)
    with torch.no_grad():
        torch.testing.assert_close(after, load_adapter(base(), path_b)(X), rtol=2e-5, atol=1e-6)


def _refused(tmp: Path, **kw: object):
    model = load_adapter(base(), saved(tmp, "a", 1))
    return model, saved(tmp, "b", 2, **kw)


@pytest.mark.parametrize(
    ("row_id", "setup"),
    [
        ("ERR-312", lambda tmp: _refused(tmp, r=2)),
        ("ERR-312", lambda tmp: _refused(tmp, projection_prng_key=5)),
        ("ERR-313", lambda tmp: _refused(tmp, target_modules=["q_proj", "v_proj"])),
        ("ERR-314", lambda tmp: _refused(tmp, modules_to_save=["norm"])),
    ],
)
def test_refusals_leave_the_model_unchanged(row_id: str, setup, tmp_path: Path) -> None:
    model, path = setup(tmp_path)
    catalogue.check_row(row_id, lambda: model.hotswap_adapter(path), model, tmp_path, state=model_state)


def test_refused_for_merged_or_unknown_adapters(tmp_path: Path) -> None:
    model, path = _refused(tmp_path)
    catalogue.check_row("ERR-315", lambda: model.hotswap_adapter(path, "zz"), model, tmp_path, state=model_state)
    model.merge_adapter()
    catalogue.check_row("ERR-316", lambda: model.hotswap_adapter(path), model, tmp_path, state=model_state)
