"""The fused C fill of the portable rule (``randlora_core._philox``) and the pure-torch fallback, bit for bit.

Both generators are checked against the spec: the Philox known-answer vectors (raw words), every
golden bases case, random shapes, row and block boundaries, and any thread count.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randlora_core import ConfigError, basis_kernel, generate_bases
from randlora_core import bases as core_bases
from randlora_core.bases import generate_basis
from randlora_spec import bases as spec_bases
from randlora_spec.bases import TAG_A, TAG_B, BasesShape
from randlora_spec.golden import load_cases
from randlora_spec.philox import philox4x32, seed_to_key

EXT = basis_kernel.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason="randlora_core._philox is not built here (the torch rule is used)")
REPO = Path(__file__).resolve().parents[3]
GOLDEN = REPO / "spec" / "golden"
BLOCK = 1 << 16  # elements per block the C fill's threads claim

# Random123 kat_vectors, the three "philox4x32 10" lines: counter words, key words -> output words.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000), 0x6627E8D5),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), 0x408F276D),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 0xD16CFE09),
]
# The project's copy of Random123's file, beside the repository in the development checkout only
# (a fresh clone in CI does not have it, and then the table above stands alone).
KAT_RUN = 2 * BLOCK + 9  # words per known-answer run: 3 blocks, so 2 threads both fill some
KAT_FILE = REPO.parent / "shared" / "reference" / "philox4x32-10-kat.txt"


@pytest.fixture(params=["c", "torch"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the fused fill and once with the pure-torch rule forced by the env var."""
    if request.param == "c" and EXT is None:
        pytest.skip("randlora_core._philox is not built here")
    monkeypatch.setenv(basis_kernel.KERNEL_ENV, "auto" if request.param == "c" else "torch")
    assert basis_kernel.kernel_for(torch.device("cpu")) == request.param
    return request.param


def bits(t: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = t.numpy() if isinstance(t, torch.Tensor) else t
    assert arr.dtype == np.float32
    return arr.view(np.uint32)


def ext_words(
    start: tuple[int, int, int], tag: int, key: tuple[int, int], dims: tuple[int, int], n: int, simd: bool, threads: int = 1
) -> np.ndarray:
    out = np.zeros(n, dtype=np.uint32)
    assert EXT is not None
    EXT.fill(out, key[0], key[1], tag, dims[0], dims[1], *start, basis_kernel.WORDS, 0, 0.0, threads, simd)
    return out


def spec_words(start: tuple[int, int, int], tag: int, key: tuple[int, int], dims: tuple[int, int], n: int) -> np.ndarray:
    """Word 0 of the n counters from ``start`` in row-major order over (any, d1, d2), counter words mod 2**32."""
    d1, d2 = dims
    flat = (start[0] * d1 + start[1]) * d2 + start[2] + np.arange(n, dtype=object)
    counters = [[(f // (d1 * d2)) % 2**32, (f // d2) % d1, f % d2, tag] for f in flat]
    return philox4x32(np.array(counters, dtype=np.uint64), key)[:, 0]


@needs_ext
@pytest.mark.parametrize(("simd", "threads"), [(True, 1), (False, 1), (True, 2)])
@pytest.mark.parametrize(("counter", "key", "word0"), KAT)
def test_known_answer_words(counter: tuple[int, ...], key: tuple[int, int], word0: int, simd: bool, threads: int) -> None:
    c0, c1, c2, c3 = counter
    # d1 = d2 = 2**32 lets the counter words take every value; the run crosses rows (and wraps c0)
    # from there, and is long enough for each of 2 threads to claim blocks.
    got = ext_words((c0, c1, c2), c3, key, (2**32, 2**32), KAT_RUN, simd, threads)
    assert got[0] == word0
    np.testing.assert_array_equal(got[:9], spec_words((c0, c1, c2), c3, key, (2**32, 2**32), 9))
    np.testing.assert_array_equal(got, ext_words((c0, c1, c2), c3, key, (2**32, 2**32), KAT_RUN, False, 1))


@pytest.mark.skipif(not KAT_FILE.is_file(), reason="no shared/reference checkout beside the repository")
def test_known_answer_table_is_the_reference_file() -> None:
    rows = [line.split() for line in KAT_FILE.read_text().splitlines() if line.startswith("philox4x32 10 ")]
    words = [tuple(int(w, 16) for w in row[2:]) for row in rows]
    assert [(w[0:4], w[4:6], w[6]) for w in words] == KAT


@needs_ext
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("d2", [1, 3, 7, 8, 9, 64, 1000])
def test_words_across_rows_match_spec(d2: int, simd: bool) -> None:
    rng = np.random.default_rng(d2)
    key = (int(rng.integers(2**32)), int(rng.integers(2**32)))
    start = (int(rng.integers(2**32)), 2, d2 - 1 if d2 > 1 else 0)
    np.testing.assert_array_equal(ext_words(start, TAG_B, key, (5, d2), 301, simd), spec_words(start, TAG_B, key, (5, d2), 301))


@needs_ext
@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_thread_count_and_simd_do_not_change_bits(kind: spec_bases.BasisKind) -> None:
    assert EXT is not None
    shape = (3 * BLOCK + 123, 1, 3)  # several blocks per thread, a block border mid-row
    code, threshold, scale = basis_kernel.mapping(kind, 40)
    k0, k1 = seed_to_key(2**63 + 5)
    results = []
    for threads, simd in ((1, False), (1, True), (2, True), (3, True), (8, True), (5, False)):
        out = torch.empty(shape)
        EXT.fill(out.numpy(), k0, k1, TAG_B, shape[1], shape[2], 0, 0, 0, code, threshold, scale, threads, simd)
        results.append(bits(out))
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    reference = spec_bases.generate_basis(2**63 + 5, TAG_B, shape, kind, 40)
    np.testing.assert_array_equal(results[0], bits(reference))


@pytest.fixture(params=[1, 2])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run a test with torch (and so the C fill) on 1 thread, then on 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_every_golden_bases_case(kernel: str, threads: int) -> None:
    assert basis_kernel.kernel_for(torch.device("cpu")) == kernel and torch.get_num_threads() == threads
    cases = [c for c in load_cases(GOLDEN) if c.kind == "bases"]
    assert len(cases) >= 9 and {c.params["basis_kind"] for c in cases} == {"dense", "sparse", "very_sparse"}
    for case in cases:
        p = case.params
        a, b = generate_bases(p["seed"], BasesShape(**p["bases_shape"]), p["basis_kind"])
        np.testing.assert_array_equal(bits(a), bits(case.expected["randlora_A"]), err_msg=case.id)
        np.testing.assert_array_equal(bits(b), bits(case.expected["randlora_B"]), err_msg=case.id)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1]) | st.integers(0, 2**64 - 1),
    shape=st.tuples(st.integers(0, 7), st.integers(0, 9), st.integers(0, 40)),
    kind=st.sampled_from(["dense", "sparse", "very_sparse"]),
    m_max=st.integers(1, 5000),
    tag=st.sampled_from([TAG_A, TAG_B]),
)
def test_random_shapes_match_spec(seed: int, shape: tuple[int, int, int], kind: str, m_max: int, tag: int) -> None:
    want = bits(spec_bases.generate_basis(seed, tag, shape, kind, m_max))  # type: ignore[arg-type]
    for forced in ("auto", "torch"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(basis_kernel.KERNEL_ENV, forced)
            got = generate_basis(seed, tag, shape, kind, m_max)  # type: ignore[arg-type]
        assert got.shape == shape and got.dtype == torch.float32
        np.testing.assert_array_equal(bits(got), want)


def test_chunk_and_block_borders(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_bases, "CHUNK_ELEMENTS", 1000)  # the torch rule's chunks end mid-row too
    shape = (BLOCK // 7 + 5, 7, 3)  # the C fill's blocks end mid-row
    got = generate_basis(11, TAG_B, shape, "sparse")
    np.testing.assert_array_equal(bits(got), bits(spec_bases.generate_basis(11, TAG_B, shape, "sparse")))


def test_forced_torch_rule_never_calls_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the C fill ran although RANDLORA_BASES_KERNEL=torch")

    monkeypatch.setattr(basis_kernel, "fill", refuse)
    monkeypatch.setenv(basis_kernel.KERNEL_ENV, "torch")
    a, b = generate_bases(3, BasesShape(r=4, m_max=9, M_max=12, nb_max=3))
    ra, rb = spec_bases.generate_bases(3, BasesShape(r=4, m_max=9, M_max=12, nb_max=3))
    np.testing.assert_array_equal(bits(a), bits(ra))
    np.testing.assert_array_equal(bits(b), bits(rb))


def test_missing_extension_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(basis_kernel, "extension", lambda: None)
    assert basis_kernel.kernel_for(torch.device("cpu")) == "torch"
    got = generate_basis(5, TAG_A, (2, 1, 33), "very_sparse", 16)
    np.testing.assert_array_equal(bits(got), bits(spec_bases.generate_basis(5, TAG_A, (2, 1, 33), "very_sparse", 16)))


def test_other_devices_use_the_torch_rule() -> None:
    assert basis_kernel.kernel_for(torch.device("meta")) == "torch"
    assert basis_kernel.kernel_for(torch.device("cuda", 0)) == "torch"


def test_bad_kernel_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(basis_kernel.KERNEL_ENV, "fortran")
    with pytest.raises(ConfigError, match="RANDLORA_BASES_KERNEL"):
        generate_basis(0, TAG_A, (1, 1, 4))


@needs_ext
def test_extension_checks_its_arguments() -> None:
    assert EXT is not None
    good = (0, 0, TAG_A, 1, 4, 0, 0, 0, basis_kernel.DENSE, 0, 1.0, 1, True)
    EXT.fill(np.zeros(4, np.float32), *good)
    with pytest.raises(TypeError):
        EXT.fill(bytes(16), *good)  # read-only
    with pytest.raises(ValueError, match="multiple of 4"):
        EXT.fill(bytearray(6), *good)
    # d1 = 0, d2 > 2**32, i0 >= 2**32, i1 >= d1, i2 >= d2
    for index, value in ((3, 0), (4, 2**32 + 1), (5, 2**32), (6, 1), (7, 4)):
        args = list(good)
        args[index] = value
        with pytest.raises(ValueError):
            EXT.fill(np.zeros(4, np.float32), *args)
    for kind, threshold in ((3, 0), (basis_kernel.TERNARY, 0), (basis_kernel.TERNARY, 2**31 + 1)):
        args = list(good)
        args[8], args[9] = kind, threshold
        with pytest.raises(ValueError):
            EXT.fill(np.zeros(4, np.float32), *args)


def test_extension_is_built_where_it_can_be() -> None:
    """Where a C compiler and Python's headers are present the install must have built the fused fill."""
    can_build = shutil.which("cc") is not None or shutil.which("gcc") is not None
    headers = Path(sysconfig.get_paths()["include"], "Python.h").is_file()
    if not (can_build and headers and sys.platform.startswith("linux")):
        pytest.skip("no C toolchain here: the pure-torch rule is the expected generator")
    assert EXT is not None, "randlora_core._philox was not built although gcc and Python.h are present"
