"""Checkpoint format v1: one safetensors file per adapter (SPEC.md section 6).

Tensors: ``<module path>.randlora_lambda`` (r, nb) and ``<module path>.randlora_gamma`` (nb, m) for
every adapted layer; the shared bases once as ``randlora_A`` / ``randlora_B`` (or not at all when
``save_projection`` is false, which is safe only because the portable rule regenerates them
bit-exactly); trainable biases as ``<module path>.bias``; ``modules_to_save`` parameters as
``<module path>.<parameter name>``. Metadata says what the tensors mean.

The in-memory seam: :func:`validate` checks an :class:`AdapterCheckpoint` object against every
rule a reader applies to a file (SPEC 6.3), with the same messages, so an implementation can build
one from a model, or apply one to a model, without encoding it. File I/O is the only other thing
this module does: :func:`to_bytes` / :func:`save` write (validate, then encode once) and
:func:`open_checkpoint` reads: it validates the header before reading any tensor and then reads each
tensor once, on request (:func:`load` and :func:`from_bytes` read them all).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from randlora_spec.bases import PORTABLE_RULE, BasesShape, basis_kind, generate_bases
from randlora_spec.checkpoint_header import (
    BASIS_A_KEY,
    BASIS_B_KEY,
    BOOKKEEPING_KEY,
    FLOAT_CODES,
    FORMAT_ID,
    FORMAT_VERSION,
    GAMMA_SUFFIX,
    LAMBDA_SUFFIX,
    MAGNITUDE_SUFFIX,
    MAX_METADATA_VALUE_BYTES,
    REQUIRED_METADATA,
    CheckpointHeader,
    check_contents,
    header_from_metadata,
)
from randlora_spec.config import SPEC_VERSION, RandLoraConfig
from randlora_spec.errors import BasisRuleError, CheckpointError
from randlora_spec.layer_kinds import ALL_FEATURES, BASE_FEATURES, LayerRecord
from randlora_spec.safetensors_io import (
    SafetensorsBuffer,
    SafetensorsFile,
    TensorSpec,
    atomic_write_bytes,
    check_ndim,
    dtype_code,
    encode,
    open_safetensors,
)
from randlora_spec.untrusted import brief

BF16_LARGEST_FINITE_INPUT = float(np.array(0x7F7F7FFF, np.uint32).view(np.float32))
"""The largest float32 whose rounding to BF16 is finite; larger magnitudes round to infinity."""


@dataclass
class AdapterCheckpoint:
    """Everything one adapter checkpoint holds: valid when a reader made it; :func:`validate` checks one built otherwise.

    ``tensors`` holds every non-basis tensor by its key; ``bases`` is ``(A, B)`` or ``None``.
    ``bf16_keys`` names tensors to store as BF16 when writing (and records which were BF16 on read).
    """

    config: RandLoraConfig
    adapter_name: str
    layers: dict[str, LayerRecord]
    bases_shape: BasesShape
    tensors: dict[str, np.ndarray]
    bases: tuple[np.ndarray, np.ndarray] | None = None
    biases: list[str] = field(default_factory=list)
    modules_to_save: dict[str, list[str]] = field(default_factory=dict)
    bf16_keys: frozenset[str] = frozenset()

    def lam(self, path: str) -> np.ndarray:
        """Lambda (r, nb) of the layer at ``path``."""
        return self.tensors[path + LAMBDA_SUFFIX]

    def gamma(self, path: str) -> np.ndarray:
        """Gamma (nb, m) of the layer at ``path``."""
        return self.tensors[path + GAMMA_SUFFIX]

    def magnitude(self, path: str) -> np.ndarray | None:
        """The DoRA magnitude (out_features,) of the layer at ``path``, or ``None`` without ``use_dora``."""
        return self.tensors.get(path + MAGNITUDE_SUFFIX) if self.config.use_dora else None


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple, set, frozenset)) else value


def _fields_of(ckpt: AdapterCheckpoint) -> dict[str, Any]:
    """The JSON-valued metadata of ``ckpt`` as plain values, unsorted and unchecked (what a file would hold)."""
    # Unchecked: a checkpoint built by hand may hold anything in these fields, whatever they are declared as.
    layers: object = ckpt.layers
    if isinstance(ckpt.layers, dict):
        layers = {path: (rec.to_json() if isinstance(rec, LayerRecord) else None) for path, rec in ckpt.layers.items()}
    s = ckpt.bases_shape
    shape = {"r": s.r, "m_max": s.m_max, "M_max": s.M_max, "nb_max": s.nb_max} if isinstance(s, BasesShape) else None
    mts = ckpt.modules_to_save
    if isinstance(mts, dict):
        mts = {path: _listed(names) for path, names in mts.items()}
    return {"layers": layers, "bases_shape": shape, "extra": {"biases": _listed(ckpt.biases), "modules_to_save": mts}}


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def metadata_for(ckpt: AdapterCheckpoint) -> dict[str, str]:
    """The safetensors ``__metadata__`` map that describes ``ckpt``."""
    fields = _fields_of(ckpt)
    extra = fields["extra"]
    bookkeeping = ckpt.config.bookkeeping()
    return ({BOOKKEEPING_KEY: _compact(bookkeeping)} if bookkeeping else {}) | {
        "format": FORMAT_ID,
        "format_version": FORMAT_VERSION,
        "spec_version": SPEC_VERSION,
        "config": ckpt.config.to_json(),
        "basis_rule": ckpt.config.basis_rule,
        "adapter_name": ckpt.adapter_name,
        "layers": _compact(dict(sorted(fields["layers"].items()))),
        "bases": "stored" if ckpt.bases is not None else "absent",
        "bases_shape": _compact(fields["bases_shape"]),
        "extra": _compact(
            {
                "biases": sorted(extra["biases"]),
                "modules_to_save": {k: sorted(v) for k, v in sorted(extra["modules_to_save"].items())},
            }
        ),
    }


def check_finite(key: str, values: np.ndarray, source: str, bf16: bool = False) -> None:
    """SPEC 6.3 item 22 (values): no NaN or infinity, and with ``bf16`` none once rounded to BF16.

    Uses two reductions (min and max) and no temporary array the size of ``values``.
    """
    if values.size == 0:
        return
    with np.errstate(all="ignore"):
        lo, hi = values.min(), values.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):  # min and max propagate NaN
            raise CheckpointError(f"{source}: tensor {brief(key)} contains NaN or Inf values")
        limit = np.float32(BF16_LARGEST_FINITE_INPUT)
        if bf16 and not (-limit <= np.float32(lo) and np.float32(hi) <= limit):
            raise CheckpointError(
                f"{source}: tensor {brief(key)} contains NaN or Inf values once rounded to BF16 "
                f"(magnitudes above {BF16_LARGEST_FINITE_INPUT:.7g} overflow)"
            )


def _arrays_of(ckpt: AdapterCheckpoint, source: str) -> dict[str, np.ndarray]:
    """Every tensor a file of ``ckpt`` would hold, bases included, after checking they are arrays."""
    if not isinstance(ckpt.tensors, dict):
        raise CheckpointError(f"{source}: tensors must be a dict of key -> numpy array, got {type(ckpt.tensors).__name__}")
    for key, values in ckpt.tensors.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{source}: tensor keys must be strings, got {brief(key)}")
        if not isinstance(values, np.ndarray):
            raise CheckpointError(f"{source}: tensor {brief(key)} must be a numpy array, got {type(values).__name__}")
    if not isinstance(ckpt.bf16_keys, (set, frozenset)):
        raise CheckpointError(f"{source}: bf16_keys must be a set of tensor keys, got {type(ckpt.bf16_keys).__name__}")
    arrays = dict(ckpt.tensors)
    if ckpt.bases is not None:
        bases = ckpt.bases
        if not (isinstance(bases, (tuple, list)) and len(bases) == 2 and all(isinstance(b, np.ndarray) for b in bases)):
            raise CheckpointError(f"{source}: bases must be None or a pair of numpy arrays (A, B), got {brief(bases)}")
        clash = sorted({BASIS_A_KEY, BASIS_B_KEY} & arrays.keys())
        if clash:  # the bases belong in ``bases``; a file would hold these keys once
            raise CheckpointError(f"{source}: unexpected tensors {clash}")
        arrays[BASIS_A_KEY], arrays[BASIS_B_KEY] = bases
    for key, values in arrays.items():
        check_ndim(key, values.ndim, source)
    return arrays


def _stored_dtype(key: str, values: np.ndarray, bf16_keys: frozenset[str]) -> str:
    code = dtype_code(values.dtype) or str(values.dtype)
    return "BF16" if code in FLOAT_CODES and key in bf16_keys else code


def validate(
    ckpt: AdapterCheckpoint,
    supported_basis_rules: Iterable[str] = (PORTABLE_RULE,),
    source: str = "<checkpoint>",
    supported_features: Iterable[str] = BASE_FEATURES,
) -> CheckpointHeader:
    """Check ``ckpt`` as a reader checks a file holding it (SPEC 6.3 items 12-26), without encoding it.

    A defect gets the exception and message that parsing a file with that defect gives (``source``
    stands for the path). Also checked, since a file cannot express them otherwise: the fields have
    the types of :class:`AdapterCheckpoint` (numpy arrays, a :class:`RandLoraConfig`, ...), and
    tensors in ``bf16_keys`` stay finite once rounded to BF16 (a writer must not produce Inf).

    Returns:
        The header a file written from ``ckpt`` would have.

    Raises:
        CheckpointError: any defect, or a layer kind or variant not in ``supported_features``.
        BasisRuleError: bases absent and the rule not among ``supported_basis_rules``.

    """
    if not isinstance(ckpt, AdapterCheckpoint):
        raise CheckpointError(f"{source}: expected an AdapterCheckpoint, got {type(ckpt).__name__}")
    if not isinstance(ckpt.config, RandLoraConfig):
        raise CheckpointError(f"{source}: config must be a RandLoraConfig, got {type(ckpt.config).__name__}")
    arrays = _arrays_of(ckpt, source)
    specs = {key: TensorSpec(_stored_dtype(key, values, ckpt.bf16_keys), values.shape) for key, values in arrays.items()}
    fields = _fields_of(ckpt)
    bases = "stored" if ckpt.bases is not None else "absent"
    header = check_contents(
        ckpt.config, ckpt.adapter_name, bases, fields.__getitem__, specs, source, supported_basis_rules, supported_features
    )
    for key in sorted(arrays):
        check_finite(key, arrays[key], source, bf16=key in ckpt.bf16_keys)
    return header


def to_bytes(
    ckpt: AdapterCheckpoint,
    readable_basis_rules: Iterable[str] = (PORTABLE_RULE,),
    readable_features: Iterable[str] = BASE_FEATURES,
) -> bytes:
    """Validate ``ckpt`` (:func:`validate`), then encode it once; deterministic for equal inputs.

    It is validated as a reader supporting ``readable_basis_rules`` and ``readable_features`` would
    read it, so by default a file without bases is only written when the portable rule can
    regenerate them, and only linear layers without DoRA are written: a writer must not produce a
    file its readers refuse. A writer of other layer kinds or of DoRA adapters says which readers it
    writes for (e.g. :data:`~randlora_spec.layer_kinds.ALL_FEATURES`).
    """
    validate(ckpt, readable_basis_rules, "<checkpoint being written>", readable_features)
    tensors = dict(ckpt.tensors)
    if ckpt.bases is not None:
        tensors[BASIS_A_KEY], tensors[BASIS_B_KEY] = ckpt.bases
    return encode(tensors, metadata_for(ckpt), bf16=ckpt.bf16_keys)


def save(path: str | Path, ckpt: AdapterCheckpoint, readable_features: Iterable[str] = BASE_FEATURES) -> None:
    """Validate and write ``ckpt`` to ``path`` atomically (temporary file, fsync, rename).

    ``readable_features`` as for :func:`to_bytes`. Symbolic links are written through, special files
    refused, an existing file's permission bits kept: see
    :func:`randlora_spec.safetensors_io.atomic_write_bytes` (SPEC 6.4).
    """
    atomic_write_bytes(path, to_bytes(ckpt, readable_features=readable_features))


class CheckpointReader:
    """A checkpoint opened for reading: its validated :attr:`header`, and tensors read on request.

    Made by :func:`open_checkpoint` (a file) or :func:`from_bytes` (bytes). The header has passed
    every check of SPEC 6.3 but "finite values", which :meth:`read` applies to each tensor it reads.
    Close it (or use it as a context manager) when done. Not safe for concurrent use by threads.
    """

    def __init__(
        self,
        container: SafetensorsFile | SafetensorsBuffer,
        supported_basis_rules: Iterable[str] = (PORTABLE_RULE,),
        supported_features: Iterable[str] = BASE_FEATURES,
    ) -> None:
        """Validate the checkpoint header of an opened ``container``; see :func:`open_checkpoint`."""
        self.source = container.source
        self._container = container
        self.header: CheckpointHeader = header_from_metadata(
            container.header.metadata, container.header.tensors, self.source, supported_basis_rules, supported_features
        )

    def read(self, key: str) -> np.ndarray:
        """The tensor ``key`` (a new writable array; BF16 widened to float32), checked to be finite.

        Raises:
            KeyError: the checkpoint has no tensor ``key`` (``header.tensors`` lists them).
            CheckpointError: NaN or infinite values, or the file changed after it was opened.

        """
        values = self._container.read(key)
        check_finite(key, values, self.source)
        return values

    def load(self) -> AdapterCheckpoint:
        """Every tensor, read once each in file order, as a validated :class:`AdapterCheckpoint`."""
        spans = self._container.header.tensors
        values = {key: self.read(key) for key in sorted(spans, key=lambda k: spans[k].begin)}
        h = self.header
        bases = (values.pop(BASIS_A_KEY), values.pop(BASIS_B_KEY)) if h.bases_stored else None
        return AdapterCheckpoint(
            config=h.config,
            adapter_name=h.adapter_name,
            layers=h.layers,
            bases_shape=h.bases_shape,
            tensors=dict(sorted(values.items())),
            bases=bases,
            biases=h.biases,
            modules_to_save=h.modules_to_save,
            bf16_keys=h.bf16_keys,
        )

    def close(self) -> None:
        """Release the file (a no-op for bytes)."""
        self._container.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(
    path: str | Path,
    supported_basis_rules: Iterable[str] = (PORTABLE_RULE,),
    source: str | None = None,
    supported_features: Iterable[str] = BASE_FEATURES,
) -> CheckpointReader:
    """Open the checkpoint at ``path`` and validate everything but tensor values, reading no tensor byte.

    The file is opened once; its header length is read and checked (against the 16 MiB limit and
    the file's size) before the header itself is read. Tensors are read later, by seek and read
    (never memory-mapped), each once: :meth:`CheckpointReader.read`, :meth:`CheckpointReader.load`.

    Args:
        path: the checkpoint file.
        supported_basis_rules: rules the caller can regenerate (see :func:`from_bytes`).
        source: a name for messages (default: the path).
        supported_features: layer kinds (and ``dora``) the caller can compute; a file needing
            another is refused (default: linear layers without DoRA, spec 1.0's set).

    Raises:
        CheckpointError: no such file, not a regular file, any structural defect, or an unsupported feature.
        BasisRuleError: bases absent and the rule unsupported.

    """
    container = open_safetensors(path, str(Path(path)) if source is None else source)
    try:
        return CheckpointReader(container, supported_basis_rules, supported_features)
    except BaseException:
        container.close()
        raise


def from_bytes(
    blob: bytes,
    source: str = "<bytes>",
    supported_basis_rules: Iterable[str] = (PORTABLE_RULE,),
    supported_features: Iterable[str] = BASE_FEATURES,
) -> AdapterCheckpoint:
    """Parse and fully validate a checkpoint (the list in SPEC.md section 6.3).

    Args:
        blob: the file's bytes.
        source: a name for messages (usually the path).
        supported_basis_rules: rules the caller can regenerate; a file without bases whose rule is
            not among them is rejected rather than silently regenerated with another rule.
        supported_features: layer kinds (and ``dora``) the caller can compute (see :func:`open_checkpoint`).

    Raises:
        CheckpointError: any structural or numerical defect, or an unsupported feature.
        BasisRuleError: bases absent and the rule unsupported.

    """
    return CheckpointReader(SafetensorsBuffer(blob, source), supported_basis_rules, supported_features).load()


def load(
    path: str | Path,
    supported_basis_rules: Iterable[str] = (PORTABLE_RULE,),
    supported_features: Iterable[str] = BASE_FEATURES,
) -> AdapterCheckpoint:
    """Read and validate the checkpoint at ``path`` (:func:`open_checkpoint`, then read every tensor)."""
    with open_checkpoint(path, supported_basis_rules, supported_features=supported_features) as reader:
        return reader.load()


def resolve_bases(ckpt: AdapterCheckpoint) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's bases: stored ones, or regenerated with the portable rule."""
    if ckpt.bases is not None:
        return ckpt.bases
    if ckpt.config.basis_rule != PORTABLE_RULE:
        raise BasisRuleError(f"cannot regenerate bases for rule {ckpt.config.basis_rule!r} in the reference")
    kind = basis_kind(ckpt.config.sparse, ckpt.config.very_sparse)
    return generate_bases(ckpt.config.projection_prng_key, ckpt.bases_shape, kind)


def checkpoint_bytes_budget(ckpt: AdapterCheckpoint) -> int:
    """Bytes of the trainable tensors plus (when stored) one copy of each basis; size targets use it."""

    def stored(key: str, arr: np.ndarray) -> int:
        return arr.size * 2 if key in ckpt.bf16_keys else arr.nbytes  # BF16 is widened on read

    total = sum(stored(k, t) for k, t in ckpt.tensors.items())
    if ckpt.bases is not None:
        total += sum(stored(k, b) for k, b in zip((BASIS_A_KEY, BASIS_B_KEY), ckpt.bases, strict=True))
    return total


__all__ = [
    "ALL_FEATURES",
    "BASE_FEATURES",
    "BASIS_A_KEY",
    "BASIS_B_KEY",
    "FLOAT_CODES",
    "FORMAT_ID",
    "FORMAT_VERSION",
    "GAMMA_SUFFIX",
    "LAMBDA_SUFFIX",
    "MAGNITUDE_SUFFIX",
    "MAX_METADATA_VALUE_BYTES",
    "REQUIRED_METADATA",
    "AdapterCheckpoint",
    "CheckpointHeader",
    "CheckpointReader",
    "LayerRecord",
    "check_finite",
    "checkpoint_bytes_budget",
    "from_bytes",
    "load",
    "metadata_for",
    "open_checkpoint",
    "resolve_bases",
    "save",
    "to_bytes",
    "validate",
]
