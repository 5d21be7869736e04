"""The torch portable basis rule: Philox KATs, bit-exactness with the spec, slices, the shared module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randlora_core import BasisRuleError, RandLoraBases, RandLoraConfig, ShapeError, get_randlora_model
from randlora_core import bases as core_bases
from randlora_core.bases import generate_bases, generate_basis, philox4x32
from randlora_spec import bases as spec_bases
from randlora_spec.bases import TAG_A, BasesShape

# Random123 kat_vectors, the three "philox4x32 10" lines: counter, key -> output (hex words).
KAT = [
    ("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
]


def words(text: str) -> list[int]:
    return [int(w, 16) for w in text.split()]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_known_answers(counter: str, key: str, expected: str) -> None:
    out = philox4x32(torch.tensor(words(counter)), tuple(words(key)))
    assert out.tolist() == words(expected)


def test_philox_batched_equals_single() -> None:
    counters = torch.tensor([words(c) for c, _, _ in KAT])
    out = philox4x32(counters, (0xA4093822, 0x299F31D0))
    for i in range(3):
        assert out[i].tolist() == philox4x32(counters[i], (0xA4093822, 0x299F31D0)).tolist()


def bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = t.numpy() if isinstance(t, torch.Tensor) else t
    assert arr.dtype == np.float32
    return arr.view(np.uint32)


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
@pytest.mark.parametrize("seed", [0, 1, 2**40 + 3, 2**64 - 1])
def test_bit_exact_with_spec(kind: str, seed: int) -> None:
    shape = BasesShape(r=5, m_max=19, M_max=33, nb_max=4)
    a, b = generate_bases(seed, shape, kind)
    ra, rb = spec_bases.generate_bases(seed, shape, kind)
    assert a.dtype == b.dtype == torch.float32
    assert a.shape == shape.a_shape and b.shape == shape.b_shape
    np.testing.assert_array_equal(bits(a), bits(ra))
    np.testing.assert_array_equal(bits(b), bits(rb))


def test_spec_worked_examples() -> None:
    # SPEC 4.3 table: (seed, tag, index, value bits)
    a0 = generate_basis(0, TAG_A, (1, 1, 1))
    assert bits(a0)[0, 0, 0] == 0xBF2CD28D
    b = generate_basis(2**40 + 3, 0x42, (6, 3, 2))
    assert bits(b)[5, 2, 1] == 0x3F8AC6EC
    a = generate_basis(2**64 - 1, TAG_A, (4, 1, 8))
    assert bits(a)[3, 0, 7] == 0xBE8DDD0F


def test_sparse_zeros_are_positive_zero() -> None:
    a = generate_basis(99, TAG_A, (2, 1, 8), "sparse")
    assert bits(a)[0, 0, 0] == 0  # +0.0, never -0.0
    assert bits(a)[0, 0, 2] == 0x3FDDB3D7 and bits(a)[1, 0, 6] == 0xBFDDB3D7


def test_chunked_generation_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = BasesShape(r=3, m_max=10, M_max=23, nb_max=4)
    whole = generate_bases(7, shape)
    monkeypatch.setattr(core_bases, "CHUNK_ELEMENTS", 17)  # chunk borders fall mid-row
    chunked = generate_bases(7, shape)
    for x, y in zip(whole, chunked, strict=True):
        assert torch.equal(x, y)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    small=st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 5)),
    extra=st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(0, 3)),
    kind=st.sampled_from(["dense", "sparse"]),
)
def test_slice_property(seed: int, small: tuple[int, int, int], extra: tuple[int, int, int], kind: str) -> None:
    r, m_max, nb = small
    big_m = m_max + extra[1]
    s = BasesShape(r=r, m_max=m_max, M_max=big_m, nb_max=nb)
    g = BasesShape(r=r + extra[0], m_max=m_max + extra[1], M_max=big_m + extra[1], nb_max=nb + extra[2])
    a_s, b_s = generate_bases(seed, s, kind)
    a_g, b_g = generate_bases(seed, g, kind)
    assert torch.equal(a_g[:r, :, :m_max], a_s)
    assert torch.equal(b_g[:big_m, :nb, :r], b_s)


def test_dense_statistics() -> None:
    a = generate_basis(3, TAG_A, (64, 1, 512))
    assert abs(a.mean().item()) < 0.02 and abs(a.var().item() - 1.0) < 0.02
    assert a.abs().max().item() < 3**0.5


def test_errors() -> None:
    with pytest.raises(BasisRuleError, match="peft-torch-v1"):
        generate_bases(0, BasesShape(1, 1, 1, 1), basis_rule="peft-torch-v1")
    with pytest.raises(BasisRuleError, match="tag"):
        generate_basis(0, 0x43, (1, 1, 1))
    with pytest.raises(ShapeError, match="very_sparse"):
        generate_basis(0, TAG_A, (1, 1, 1), "very_sparse")
    with pytest.raises(ShapeError, match="3 sizes"):
        generate_basis(0, TAG_A, (1, 1))  # type: ignore[arg-type]


def test_shared_bases_module_float32_and_shared(block: torch.nn.Module) -> None:
    model = get_randlora_model(block, RandLoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    bases = model.randlora_bases
    assert isinstance(bases, RandLoraBases)
    # registered once on the model; every layer reads the same storage
    assert [n for n, m in model.named_modules() if isinstance(m, RandLoraBases)] == ["randlora_bases"]
    for _, layer in model.named_randlora_layers():
        a_s, b_flat = layer.bases.window(*layer.geometry("default"), torch.float32, torch.device("cpu"))
        assert a_s.data_ptr() == bases.randlora_A.data_ptr()
        assert b_flat.data_ptr() == bases.randlora_B.data_ptr()
    # not in the state_dict (checkpoints store them explicitly)
    assert not any("randlora_A" in k or "randlora_B" in k for k in model.state_dict())
    before = bases.randlora_A.clone()
    model.half()
    assert bases.randlora_A.dtype == torch.float32 and torch.equal(bases.randlora_A, before)
    model.to(torch.bfloat16)
    assert bases.randlora_B.dtype == torch.float32
    assert model.model.q_proj.randlora_lambda["default"].dtype == torch.bfloat16
