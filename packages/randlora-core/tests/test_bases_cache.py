"""The opt-in on-disk bases cache: hits, misses on every kind of damage, the size bound, the settings."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from randlora_core import ConfigError, bases_cache, basis_kernel, generate_bases
from randlora_core import bases as core_bases
from randlora_core.bases import generate_basis
from randlora_core.bases_cache import BasesCache, BasisKey, active_cache, set_bases_cache
from randlora_spec import bases as spec_bases
from randlora_spec.bases import PORTABLE_RULE, TAG_A, TAG_B, BasesShape

SHAPE = (40, 3, 8)  # 3840 bytes: several pieces once PIECE_BYTES is lowered
KEY = BasisKey(PORTABLE_RULE, 7, TAG_B, "dense", SHAPE, None)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache named by the env var, caching every size, hashing 1000-byte pieces."""
    monkeypatch.setenv(bases_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(bases_cache.MAX_BYTES_ENV, raising=False)
    monkeypatch.setattr(bases_cache, "MIN_BYTES", 0)
    monkeypatch.setattr(bases_cache, "PIECE_BYTES", 1000)
    set_bases_cache(None)
    yield tmp_path / "cache"
    set_bases_cache(None)


@pytest.fixture
def count_generation(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call of either generator (and still generate)."""
    calls: list[str] = []
    real_c, real_torch = basis_kernel.fill, core_bases._fill_torch

    def c_fill(*args: object, **kwargs: object) -> None:
        calls.append("c")
        real_c(*args, **kwargs)  # type: ignore[arg-type]

    def torch_fill(*args: object, **kwargs: object) -> None:
        calls.append("torch")
        real_torch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(basis_kernel, "fill", c_fill)
    monkeypatch.setattr(core_bases, "_fill_torch", torch_fill)
    return calls


def bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = t.numpy() if isinstance(t, torch.Tensor) else t
    return arr.view(np.uint32)


def expected() -> np.ndarray:
    return bits(spec_bases.generate_basis(7, TAG_B, SHAPE))


def entry(directory: Path) -> tuple[Path, Path]:
    stem = directory / KEY.digest()
    return stem.with_suffix(".f32"), stem.with_suffix(".json")


def test_second_generation_is_read_from_the_cache(cache_dir: Path, count_generation: list[str]) -> None:
    first = generate_basis(7, TAG_B, SHAPE)
    values, meta = entry(cache_dir)
    assert values.stat().st_size == 4 * first.numel()
    assert len(json.loads(meta.read_text())["sha256"]) == 4  # 3840 bytes in 1000-byte pieces
    assert count_generation == [count_generation[0]]
    second = generate_basis(7, TAG_B, SHAPE)
    assert len(count_generation) == 1  # no generator ran
    np.testing.assert_array_equal(bits(second), expected())
    assert second.data_ptr() != first.data_ptr()
    assert not list(cache_dir.glob(".*.tmp"))  # the atomic writer left no temporary file


def test_generate_bases_uses_the_cache_per_tensor(cache_dir: Path, count_generation: list[str]) -> None:
    shape = BasesShape(r=4, m_max=10, M_max=12, nb_max=3)
    generate_bases(1, shape, "sparse")
    a, b = generate_bases(1, shape, "sparse")
    assert len(count_generation) == 2 and len(list(cache_dir.glob("*.f32"))) == 2
    ra, rb = spec_bases.generate_bases(1, shape, "sparse")
    np.testing.assert_array_equal(bits(a), bits(ra))
    np.testing.assert_array_equal(bits(b), bits(rb))


def damage_flip(values: Path, meta: Path) -> None:
    raw = bytearray(values.read_bytes())
    raw[1234] ^= 0x01
    values.write_bytes(bytes(raw))


def damage_truncate(values: Path, meta: Path) -> None:
    values.write_bytes(values.read_bytes()[:-4])


def damage_extend(values: Path, meta: Path) -> None:
    values.write_bytes(values.read_bytes() + b"\0\0\0\0")


def damage_values_gone(values: Path, meta: Path) -> None:
    values.unlink()


def damage_meta_gone(values: Path, meta: Path) -> None:
    meta.unlink()


def damage_meta_garbage(values: Path, meta: Path) -> None:
    meta.write_bytes(b"\xff{not json")


def damage_meta_other_key(values: Path, meta: Path) -> None:
    info = json.loads(meta.read_text())
    info["key"]["seed"] = 8
    meta.write_text(json.dumps(info))


def damage_meta_hash(values: Path, meta: Path) -> None:
    info = json.loads(meta.read_text())
    info["sha256"][2] = "0" * 64
    meta.write_text(json.dumps(info))


def damage_meta_few_hashes(values: Path, meta: Path) -> None:
    info = json.loads(meta.read_text())
    info["sha256"] = info["sha256"][:1]
    meta.write_text(json.dumps(info))


def damage_meta_format(values: Path, meta: Path) -> None:
    info = json.loads(meta.read_text())
    info["format"] = "randlora.bases-cache/2"
    meta.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage",
    [
        damage_flip,
        damage_truncate,
        damage_extend,
        damage_values_gone,
        damage_meta_gone,
        damage_meta_garbage,
        damage_meta_other_key,
        damage_meta_hash,
        damage_meta_few_hashes,
        damage_meta_format,
    ],
)
def test_a_damaged_entry_is_never_trusted(
    damage: Callable[[Path, Path], None], cache_dir: Path, count_generation: list[str]
) -> None:
    generate_basis(7, TAG_B, SHAPE)
    values, meta = entry(cache_dir)
    damage(values, meta)
    assert BasesCache(cache_dir).load(KEY) is None
    again = generate_basis(7, TAG_B, SHAPE)
    assert len(count_generation) == 2  # regenerated
    np.testing.assert_array_equal(bits(again), expected())
    # ... and the entry was rewritten whole
    hit = BasesCache(cache_dir).load(KEY)
    assert hit is not None
    np.testing.assert_array_equal(bits(hit), expected())


def test_consistent_but_wrong_entry_is_caught_by_the_rule(cache_dir: Path, count_generation: list[str]) -> None:
    """Hashes only prove the file is what was written; a few values are recomputed with the rule too."""
    wrong = generate_basis(8, TAG_B, SHAPE)  # another seed's values, stored under seed 7's key
    BasesCache(cache_dir).store(KEY, wrong)
    assert BasesCache(cache_dir).load(KEY) is not None  # the hashes match
    got = generate_basis(7, TAG_B, SHAPE)
    np.testing.assert_array_equal(bits(got), expected())
    assert len(count_generation) == 2
    hit = BasesCache(cache_dir).load(KEY)
    assert hit is not None and np.array_equal(bits(hit), expected())  # replaced by the right values


def test_keys_separate_everything_the_values_depend_on() -> None:
    keys = {
        KEY,
        BasisKey(PORTABLE_RULE, 8, TAG_B, "dense", SHAPE, None),
        BasisKey(PORTABLE_RULE, 7, TAG_A, "dense", SHAPE, None),
        BasisKey(PORTABLE_RULE, 7, TAG_B, "sparse", SHAPE, None),
        BasisKey(PORTABLE_RULE, 7, TAG_B, "very_sparse", SHAPE, 16),
        BasisKey(PORTABLE_RULE, 7, TAG_B, "very_sparse", SHAPE, 17),
        BasisKey(PORTABLE_RULE, 7, TAG_B, "dense", (40, 8, 3), None),
        BasisKey("another-rule-v1", 7, TAG_B, "dense", SHAPE, None),
    }
    assert len({k.digest() for k in keys}) == len(keys)


def test_very_sparse_entries_depend_on_m_max(cache_dir: Path) -> None:
    a16 = generate_basis(5, TAG_A, (4, 1, 30), "very_sparse", 16)
    a20 = generate_basis(5, TAG_A, (4, 1, 30), "very_sparse", 20)
    np.testing.assert_array_equal(bits(a20), bits(spec_bases.generate_basis(5, TAG_A, (4, 1, 30), "very_sparse", 20)))
    assert not np.array_equal(bits(a16), bits(a20))
    assert len(list(cache_dir.glob("*.json"))) == 2


def test_least_recently_used_entries_are_evicted(tmp_path: Path) -> None:
    cache = BasesCache(tmp_path, max_bytes=2 * 4 * 40 * 3 * 8)  # room for two entries
    keys = [BasisKey(PORTABLE_RULE, seed, TAG_B, "dense", SHAPE, None) for seed in range(3)]
    for k in keys[:2]:
        cache.store(k, torch.zeros(SHAPE))
    meta0 = tmp_path / f"{keys[0].digest()}.json"
    meta1 = tmp_path / f"{keys[1].digest()}.json"
    # make key 0 the older entry, then use it: key 1 becomes the least recently used
    os.utime(meta0, (1, 1))
    os.utime(meta1, (2, 2))
    assert cache.load(keys[0]) is not None
    cache.store(keys[2], torch.zeros(SHAPE))
    assert cache.load(keys[1]) is None
    assert cache.load(keys[0]) is not None and cache.load(keys[2]) is not None
    assert len(list(tmp_path.glob("*.f32"))) == 2


def test_a_tensor_larger_than_the_bound_is_not_stored(tmp_path: Path) -> None:
    cache = BasesCache(tmp_path, max_bytes=100)
    cache.store(KEY, torch.zeros(SHAPE))
    assert not list(tmp_path.iterdir())


def test_small_tensors_are_not_cached_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bases_cache.CACHE_ENV, str(tmp_path))
    generate_basis(7, TAG_B, SHAPE)
    assert not list(tmp_path.iterdir())


def test_unwritable_cache_only_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(bases_cache, "MIN_BYTES", 0)
    set_bases_cache(blocker / "cache")
    try:
        with pytest.warns(UserWarning, match="uncached"):
            got = generate_basis(7, TAG_B, SHAPE)
    finally:
        set_bases_cache(None)
    np.testing.assert_array_equal(bits(got), expected())


def test_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bases_cache.CACHE_ENV, raising=False)
    assert active_cache() is None  # off by default
    monkeypatch.setenv(bases_cache.CACHE_ENV, str(tmp_path))
    cache = active_cache()
    assert cache is not None and cache.directory == tmp_path and cache.max_bytes == bases_cache.DEFAULT_MAX_BYTES
    monkeypatch.setenv(bases_cache.MAX_BYTES_ENV, "12345")
    assert active_cache().max_bytes == 12345  # type: ignore[union-attr]
    monkeypatch.setenv(bases_cache.MAX_BYTES_ENV, "1 GiB")
    with pytest.raises(ConfigError, match=bases_cache.MAX_BYTES_ENV):
        active_cache()
    set_bases_cache(tmp_path / "api", max_bytes=7)
    try:
        chosen = active_cache()
        assert chosen is not None and chosen.directory == tmp_path / "api" and chosen.max_bytes == 7
    finally:
        set_bases_cache(None)
