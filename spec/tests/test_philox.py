import numpy as np
import pytest

from randlora_spec.philox import philox4x32, seed_to_key

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter, key -> result.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_known_answer_vectors(counter, key, expected):
    out = philox4x32(np.array([counter], dtype=np.uint64), key)
    assert out.dtype == np.uint32
    assert tuple(int(v) for v in out[0]) == expected


def test_batched_equals_single():
    counters = np.array([c for c, _, _ in KAT[:2]], dtype=np.uint64)
    batch = philox4x32(counters, (0, 0))
    for i, c in enumerate(counters):
        assert np.array_equal(batch[i], philox4x32(c[None], (0, 0))[0])


def test_seed_to_key_splits_low_high():
    assert seed_to_key(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)
    assert seed_to_key(2**64 - 1) == (0xFFFFFFFF, 0xFFFFFFFF)
    with pytest.raises(ValueError, match="seed"):
        seed_to_key(2**64)
    with pytest.raises(ValueError, match="seed"):
        seed_to_key(-1)


def test_counter_must_have_four_words():
    with pytest.raises(ValueError, match="4 words"):
        philox4x32(np.zeros((2, 3), dtype=np.uint64), (0, 0))
