"""The portable basis rule ``randlora-philox4x32-10-v1`` in torch, and the shared-bases module.

:func:`generate_bases` is bit-exact with :func:`randlora_spec.bases.generate_bases`. Philox needs
unsigned 32x32 -> 64 bit products, which torch lacks, so every word lives in an ``int64`` tensor.
The exact product of two 32-bit words is below 2**64, and int64 multiplication wraps modulo 2**64,
so the wrapped product holds exactly the product's 64 bits: the low word is ``p & 0xFFFFFFFF`` and
the high word ``(p >> 32) & 0xFFFFFFFF``. Only integer ops and one float32 multiply are used, so
CUDA gives the same bits as CPU by construction. The rounds run in place on 1M-element chunks.

:class:`RandLoraBases` holds the one shared pair ``(A, B)`` of a model as float32 buffers. It is
registered once on the model (so ``model.to(device)`` moves it once) and every layer reads windows
of the same storage. Bases are float32 values by definition, so dtype casts of the model
(``model.half()``, ``model.to(torch.bfloat16)``) move the buffers but keep them float32; layers cast
their window to the compute dtype when they use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from randlora_core import bases_cache, basis_kernel
from randlora_core.bases_cache import BasisKey
from randlora_spec.bases import (
    DENSE_SCALE,
    PORTABLE_RULE,
    TAG_A,
    TAG_B,
    BasesShape,
    BasisKind,
    sparse_scale,
    sparse_threshold,
)
from randlora_spec.errors import BasisRuleError, ShapeError
from randlora_spec.geometry import shape_of_bases
from randlora_spec.philox import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, ROUNDS, seed_to_key

Window = tuple[torch.Tensor, torch.Tensor]
"""A pair of tensors: the bases ``(A, B)``, or a layer's window of them ``(a_s, b_flat)``."""

MASK32 = 0xFFFFFFFF
CHUNK_ELEMENTS = 1 << 20
"""Elements per step of the pure-torch rule: bounds its int64 working set to a few tens of MiB for any shape."""


def _philox_rounds(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, key: tuple[int, int], rounds: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox rounds on int64 word tensors in [0, 2**32); consumes (overwrites) its inputs."""
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    for round_index in range(rounds):
        if round_index > 0:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        # mulhilo: the exact product M * c (< 2**64) wraps in int64 to the same 64 bits, so the low
        # word is product & MASK32 and the high word is (product >> 32) & MASK32 (the arithmetic
        # shift of a wrapped, negative product differs from the true one only above bit 31).
        p0 = c0.mul_(PHILOX_M0)
        p1 = c2.mul_(PHILOX_M1)
        n0 = (p1 >> 32).bitwise_and_(MASK32).bitwise_xor_(c1).bitwise_xor_(k0)
        n2 = (p0 >> 32).bitwise_and_(MASK32).bitwise_xor_(c3).bitwise_xor_(k1)
        c0, c1, c2, c3 = n0, p1.bitwise_and_(MASK32), n2, p0.bitwise_and_(MASK32)
    return c0, c1, c2, c3


def philox4x32(counter: torch.Tensor, key: tuple[int, int], rounds: int = ROUNDS) -> torch.Tensor:
    """Philox4x32 over ``counter`` of shape ``(..., 4)`` (integer words < 2**32); returns int64 words.

    The result has the same shape, each word in ``[0, 2**32)``.
    """
    if counter.shape[-1] != 4:
        raise ShapeError(f"counter must have a trailing axis of 4 words, got shape {tuple(counter.shape)}")
    c0, c1, c2, c3 = (w.to(torch.int64).bitwise_and(MASK32) for w in counter.unbind(-1))  # fresh copies
    return torch.stack(_philox_rounds(c0, c1, c2, c3, key, rounds), dim=-1)


def _word0(seed: int, tag: int, shape: tuple[int, int, int], flat: torch.Tensor) -> torch.Tensor:
    """Philox word 0 for the row-major flat indices ``flat`` (int64) of a tensor of ``shape``."""
    _, d1, d2 = shape
    counter = (flat // (d1 * d2), (flat // d2) % d1, flat % d2, torch.full_like(flat, tag))
    return _philox_rounds(*counter, seed_to_key(seed), ROUNDS)[0]


def _map_words(words: torch.Tensor, kind: BasisKind, m_max: int) -> torch.Tensor:
    if kind == "dense":
        n = 2 * (words >> 8) + (1 - 2**24)  # odd, |n| < 2**24: exact in float32
        return n.to(torch.float32) * torch.tensor(DENSE_SCALE.item(), dtype=torch.float32, device=words.device)
    threshold = sparse_threshold(kind, m_max)
    sign = torch.where(words < threshold, -1.0, torch.where(words < 2 * threshold, 1.0, 0.0)).to(torch.float32)
    return sign * torch.tensor(sparse_scale(threshold).item(), dtype=torch.float32, device=words.device)


def _fill_torch(out: torch.Tensor, seed: int, tag: int, kind: BasisKind, m_max: int) -> None:
    """The pure-torch rule into ``out``, in chunks of :data:`CHUNK_ELEMENTS` (any device)."""
    dims = (out.shape[0], out.shape[1], out.shape[2])
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, flat.numel())
        index = torch.arange(start, stop, dtype=torch.int64, device=out.device)
        flat[start:stop] = _map_words(_word0(seed, tag, dims, index), kind, m_max)


SPOT_CHECKS = 8
"""Values of every cache hit recomputed with the rule (first, last and spread between)."""


def _agrees_with_rule(t: torch.Tensor, seed: int, tag: int, kind: BasisKind, m_max: int) -> bool:
    n = t.numel()
    index = torch.tensor(sorted({0, n - 1, *((k * 2654435761) % n for k in range(1, SPOT_CHECKS - 1))}))
    want = _map_words(_word0(seed, tag, (t.shape[0], t.shape[1], t.shape[2]), index), kind, m_max)
    return torch.equal(t.view(-1)[index].view(torch.int32), want.view(torch.int32))


def _check_basis_args(seed: int, tag: int, shape: tuple[int, int, int], kind: BasisKind, m_max: int | None) -> None:
    seed_to_key(seed)  # ConfigError unless 0 <= seed < 2**64
    if tag not in (TAG_A, TAG_B):
        raise BasisRuleError(f"tag must be TAG_A (0x41) or TAG_B (0x42), got {tag:#x}")
    if len(shape) != 3 or any(int(n) < 0 or int(n) >= 2**32 for n in shape):
        raise ShapeError(f"basis shape must be 3 sizes in [0, 2**32), got {shape}")
    if kind not in ("dense", "sparse", "very_sparse"):
        raise BasisRuleError(f"basis kind must be 'dense', 'sparse' or 'very_sparse', got {kind!r}")
    if kind == "very_sparse" and m_max is None:
        raise ShapeError("very_sparse bases need m_max (the sparsity is s = sqrt(m_max))")


def generate_basis(
    seed: int,
    tag: int,
    shape: tuple[int, int, int],
    kind: BasisKind = "dense",
    m_max: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One float32 basis tensor of ``shape`` under the portable rule (see the spec's ``generate_basis``).

    On CPU the fused C fill (:mod:`randlora_core.basis_kernel`) writes the values straight into the
    result where it is built; elsewhere the pure-torch rule runs in chunks of :data:`CHUNK_ELEMENTS`,
    so its working memory stays bounded for large allocations. Both give the same bits. Large CPU
    tensors come from the on-disk cache when one is set (:mod:`randlora_core.bases_cache`).
    """
    _check_basis_args(seed, tag, shape, kind, m_max)
    dims = (int(shape[0]), int(shape[1]), int(shape[2]))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cache = bases_cache.active_cache() if dev.type == "cpu" and 4 * math.prod(dims) >= bases_cache.MIN_BYTES else None
    key = BasisKey(PORTABLE_RULE, int(seed), tag, kind, dims, m_max if kind == "very_sparse" else None)
    if cache is not None:
        hit = cache.load(key)
        if hit is not None and _agrees_with_rule(hit, seed, tag, kind, m_max or 0):
            return hit
        if hit is not None:
            cache.discard(key)  # consistent hashes, wrong values: never trusted, rewritten below
    out = torch.empty(dims, dtype=torch.float32, device=dev)
    if out.numel() and basis_kernel.kernel_for(dev) == "c":
        basis_kernel.fill(out, seed, tag, kind, m_max or 0)
    else:
        _fill_torch(out, seed, tag, kind, m_max or 0)
    if cache is not None:
        cache.store(key, out)
    return out


def generate_bases(
    seed: int,
    shape: BasesShape,
    kind: BasisKind = "dense",
    device: torch.device | str | None = None,
    basis_rule: str = PORTABLE_RULE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair ``(A, B)`` for an allocation, as float32 tensors on ``device`` (default CPU).

    Bit-identical to :func:`randlora_spec.bases.generate_bases` for the same arguments.

    Raises:
        BasisRuleError: ``basis_rule`` is not the portable rule (no other rule can be generated here).

    """
    if basis_rule != PORTABLE_RULE:
        raise BasisRuleError(
            f"basis_rule {basis_rule!r} cannot be generated by randlora-core; it implements only {PORTABLE_RULE!r} "
            "(load bases stored in a checkpoint instead)"
        )
    a = generate_basis(seed, TAG_A, shape.a_shape, kind, shape.m_max, device)
    b = generate_basis(seed, TAG_B, shape.b_shape, kind, shape.m_max, device)
    return a, b


class RandLoraBases(nn.Module):
    """The model's shared bases: buffers ``randlora_A`` (r, 1, m_max) and ``randlora_B`` (M_max, nb_max, r).

    The buffers are non-persistent (not in ``state_dict``); checkpoints store them explicitly. They
    always stay float32: a floating-point cast of the module moves them to the new device but keeps
    their exact values. ``regenerable`` says whether they came from the portable rule with ``seed``
    and ``kind`` (so a larger allocation can be regenerated and agrees on the overlap); bases loaded
    from a file written under another rule are not.
    """

    randlora_A: torch.Tensor  # noqa: N815 - PEFT's and the checkpoint's name
    randlora_B: torch.Tensor  # noqa: N815

    def __init__(self, a: torch.Tensor, b: torch.Tensor, seed: int, kind: BasisKind, regenerable: bool = True) -> None:
        super().__init__()
        self.seed, self.kind, self.regenerable = int(seed), kind, regenerable
        self.register_buffer("randlora_A", _checked_float32(a, "A"), persistent=False)
        self.register_buffer("randlora_B", _checked_float32(b, "B"), persistent=False)
        self._cast_cache: dict[tuple[torch.dtype, torch.device], tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = {}
        # the pair each window was cut from is held with it, so a replaced pair's address is never reused while compared
        self._windows: dict[tuple[int, int, int, int, torch.dtype, torch.device], tuple[Window, tuple[int, ...], Window]] = {}

    @property
    def shape(self) -> BasesShape:
        """The current allocation."""
        return shape_of_bases(self.randlora_A.shape, self.randlora_B.shape)

    def replace(self, a: torch.Tensor, b: torch.Tensor, regenerable: bool) -> None:
        """Swap in a new pair (same device as the current buffers); every layer sees it at once."""
        device = self.randlora_A.device
        self.randlora_A = _checked_float32(a, "A").to(device)
        self.randlora_B = _checked_float32(b, "B").to(device)
        self.regenerable = regenerable
        self._cast_cache.clear()
        self._windows.clear()

    def window(
        self, r: int, m: int, big_m: int, nb: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's windows in ``dtype`` on ``device``: ``A[:r, 0, :m]`` (r, m) and ``B_flat`` (M, nb*r).

        In float32 on the buffers' device these are views of the shared storage, except ``B_flat``
        for ``nb`` below the allocation's, which is a copy. Either is kept until the pair changes, so
        every call (and every layer of that window, and what autograd saves for them) shares one.
        """
        a, b = self._cast(dtype, device)
        if torch.compiler.is_compiling():  # a traced graph slices anyway; comparing versions would break it
            self._check_covers(r, m, big_m, nb)
            return a[:r, 0, :m], b[:big_m, :nb, :r].reshape(big_m, nb * r)
        key = (r, m, big_m, nb, dtype, device)
        token = (a.data_ptr(), a._version, b.data_ptr(), b._version)
        hit = self._windows.get(key)
        if hit is not None and hit[0][0] is a and hit[0][1] is b and hit[1] == token:
            return hit[2]
        self._check_covers(r, m, big_m, nb)
        window = a[:r, 0, :m], b[:big_m, :nb, :r].reshape(big_m, nb * r)
        self._windows[key] = ((a, b), token, window)
        return window

    def _check_covers(self, r: int, m: int, big_m: int, nb: int) -> None:
        if not self.shape.covers(BasesShape(r=r, m_max=m, M_max=big_m, nb_max=nb)):
            raise ShapeError(f"shared bases {self.shape} are too small for a window r={r}, m={m}, M={big_m}, nb={nb}")

    def _cast(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.randlora_A, self.randlora_B
        if dtype == a.dtype and device == a.device:
            return a, b
        # Casting the whole pair on every forward would cost a weight-sized copy per layer call;
        # one cached copy per (dtype, device) is reused until the buffers change.
        token = (a.data_ptr(), a._version, b.data_ptr(), b._version)
        hit = self._cast_cache.get((dtype, device))
        if hit is not None and hit[0] == token:
            return hit[1], hit[2]
        cast = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
        self._cast_cache[(dtype, device)] = (token, *cast)
        return cast

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RandLoraBases:
        for name in ("randlora_A", "randlora_B"):
            old = self._buffers[name]
            assert old is not None
            new = fn(old)
            # A dtype cast would round the float32 values (bf16 keeps 8 bits); take the device only.
            self._buffers[name] = new if new.dtype == torch.float32 else old.to(device=new.device)
        self._cast_cache.clear()
        self._windows.clear()
        return self

    def extra_repr(self) -> str:
        """Shapes, kind and seed."""
        return f"A={tuple(self.randlora_A.shape)}, B={tuple(self.randlora_B.shape)}, kind={self.kind!r}, seed={self.seed}"


def _checked_float32(t: torch.Tensor, which: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or (which == "A" and t.shape[1] != 1):
        want = "(r, 1, m_max)" if which == "A" else "(M_max, nb_max, r)"
        raise ShapeError(f"basis {which} must be a 3-D tensor of shape {want}, got {getattr(t, 'shape', type(t))}")
    if t.dtype != torch.float32:
        raise ShapeError(f"basis {which} must be float32 (bases are float32 values), got {t.dtype}")
    return t.detach()
