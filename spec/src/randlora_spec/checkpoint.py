"""Checkpoint format v1: one safetensors file per adapter (SPEC.md section 6).

Tensors: ``<module path>.randlora_lambda`` (r, nb) and ``<module path>.randlora_gamma`` (nb, m) for
every adapted layer; the shared bases once as ``randlora_A`` / ``randlora_B`` (or not at all when
``save_projection`` is false, which is safe only because the portable rule regenerates them
bit-exactly); trainable biases as ``<module path>.bias``; ``modules_to_save`` parameters as
``<module path>.<parameter name>``. Metadata says what the tensors mean. :func:`from_bytes`
validates everything before returning, so a caller can reject a bad file before touching a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from randlora_spec.bases import PORTABLE_RULE, BasesShape, basis_kind, generate_bases, num_bases
from randlora_spec.config import SPEC_VERSION, RandLoraConfig
from randlora_spec.errors import BasisRuleError, CheckpointError, ConfigError
from randlora_spec.safetensors_io import atomic_write_bytes, decode, encode, read_dtypes

FORMAT_ID = "randlora.adapter"
FORMAT_VERSION = "1"
BASIS_A_KEY = "randlora_A"
BASIS_B_KEY = "randlora_B"
LAMBDA_SUFFIX = ".randlora_lambda"
GAMMA_SUFFIX = ".randlora_gamma"
MAX_METADATA_VALUE_BYTES = 4 * 1024 * 1024
"""A single metadata value larger than this is rejected before JSON parsing."""
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
REQUIRED_METADATA = (
    "format",
    "format_version",
    "spec_version",
    "config",
    "basis_rule",
    "adapter_name",
    "layers",
    "bases",
    "bases_shape",
    "extra",
)


@dataclass(frozen=True)
class LayerRecord:
    """The base layer an adapter was trained on: its sizes and weight layout."""

    in_features: int
    out_features: int
    fan_in_fan_out: bool = False

    @property
    def m(self) -> int:
        """Smaller side of the layer."""
        return min(self.in_features, self.out_features)

    @property
    def M(self) -> int:  # noqa: N802 - the spec's symbol
        """Larger side of the layer."""
        return max(self.in_features, self.out_features)


@dataclass
class AdapterCheckpoint:
    """Everything one adapter checkpoint holds, validated.

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


def metadata_for(ckpt: AdapterCheckpoint) -> dict[str, str]:
    """The safetensors ``__metadata__`` map that describes ``ckpt``."""
    shape = ckpt.bases_shape
    return {
        "format": FORMAT_ID,
        "format_version": FORMAT_VERSION,
        "spec_version": SPEC_VERSION,
        "config": ckpt.config.to_json(),
        "basis_rule": ckpt.config.basis_rule,
        "adapter_name": ckpt.adapter_name,
        "layers": json.dumps(
            {
                p: {
                    "in_features": rec.in_features,
                    "out_features": rec.out_features,
                    "fan_in_fan_out": rec.fan_in_fan_out,
                }
                for p, rec in sorted(ckpt.layers.items())
            },
            separators=(",", ":"),
        ),
        "bases": "stored" if ckpt.bases is not None else "absent",
        "bases_shape": json.dumps(
            {"r": shape.r, "m_max": shape.m_max, "M_max": shape.M_max, "nb_max": shape.nb_max}, separators=(",", ":")
        ),
        "extra": json.dumps(
            {
                "biases": sorted(ckpt.biases),
                "modules_to_save": {k: sorted(v) for k, v in sorted(ckpt.modules_to_save.items())},
            },
            separators=(",", ":"),
        ),
    }


def to_bytes(ckpt: AdapterCheckpoint, readable_basis_rules: Iterable[str] = (PORTABLE_RULE,)) -> bytes:
    """Serialise (after validating) to safetensors bytes; deterministic for equal inputs.

    The output is validated as a reader supporting ``readable_basis_rules`` would, so by default a
    file without bases is only written when the portable rule can regenerate them: a writer must
    not produce a file that ordinary readers refuse.
    """
    tensors = dict(ckpt.tensors)
    if ckpt.bases is not None:
        tensors[BASIS_A_KEY], tensors[BASIS_B_KEY] = ckpt.bases
    blob = encode(tensors, metadata_for(ckpt), bf16=ckpt.bf16_keys)
    from_bytes(blob, source="<checkpoint being written>", supported_basis_rules=readable_basis_rules)
    return blob


def save(path: str | Path, ckpt: AdapterCheckpoint) -> None:
    """Validate and write ``ckpt`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(path, to_bytes(ckpt))


def _json_field(meta: dict[str, str], key: str, source: str) -> Any:
    raw = meta[key]
    if len(raw) > MAX_METADATA_VALUE_BYTES:
        raise CheckpointError(f"{source}: metadata {key!r} is {len(raw)} bytes, over the {MAX_METADATA_VALUE_BYTES}-byte limit")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{source}: metadata {key!r} is not valid JSON ({exc})") from None


def _positive_int(value: Any, what: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{source}: {what} must be a positive integer, got {value!r}")
    return value


def _parse_layers(raw: Any, source: str) -> dict[str, LayerRecord]:
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{source}: metadata 'layers' must be a non-empty object of module path -> shape")
    layers = {}
    for path, rec in raw.items():
        if not path or not isinstance(rec, dict) or set(rec) != {"in_features", "out_features", "fan_in_fan_out"}:
            raise CheckpointError(f"{source}: layer record for {path!r} must hold in_features, out_features, fan_in_fan_out")
        if not isinstance(rec["fan_in_fan_out"], bool):
            raise CheckpointError(f"{source}: layer {path!r} fan_in_fan_out must be a boolean")
        layers[path] = LayerRecord(
            _positive_int(rec["in_features"], f"layer {path!r} in_features", source),
            _positive_int(rec["out_features"], f"layer {path!r} out_features", source),
            rec["fan_in_fan_out"],
        )
    return layers


def _parse_extra(raw: Any, source: str) -> tuple[list[str], dict[str, list[str]]]:
    if not isinstance(raw, dict) or set(raw) != {"biases", "modules_to_save"}:
        raise CheckpointError(f"{source}: metadata 'extra' must hold exactly 'biases' and 'modules_to_save'")
    biases, mts = raw["biases"], raw["modules_to_save"]
    if not isinstance(biases, list) or not all(isinstance(p, str) and p for p in biases):
        raise CheckpointError(f"{source}: extra.biases must be a list of module paths")
    if not isinstance(mts, dict) or not all(
        k and isinstance(v, list) and all(isinstance(n, str) and n for n in v) for k, v in mts.items()
    ):
        raise CheckpointError(f"{source}: extra.modules_to_save must map module paths to parameter-name lists")
    return biases, mts


def _parse_bases_shape(raw: Any, config: RandLoraConfig, layers: dict[str, LayerRecord], source: str) -> BasesShape:
    if not isinstance(raw, dict) or set(raw) != {"r", "m_max", "M_max", "nb_max"}:
        raise CheckpointError(f"{source}: metadata 'bases_shape' must hold r, m_max, M_max, nb_max")
    shape = BasesShape(**{k: _positive_int(raw[k], f"bases_shape.{k}", source) for k in ("r", "m_max", "M_max", "nb_max")})
    if shape.r != config.r:
        raise CheckpointError(f"{source}: bases_shape.r = {shape.r} differs from config r = {config.r}")
    if shape.nb_max != num_bases(shape.m_max, shape.r) or shape.m_max > shape.M_max:
        raise CheckpointError(f"{source}: bases_shape {raw} is inconsistent (needs nb_max = ceil(m_max / r), m_max <= M_max)")
    for path, rec in layers.items():
        if rec.m > shape.m_max or rec.M > shape.M_max:
            raise CheckpointError(
                f"{source}: layer {path!r} ({rec.in_features}x{rec.out_features}) does not fit bases_shape {raw}"
            )
    return shape


def from_bytes(
    blob: bytes, source: str = "<bytes>", supported_basis_rules: Iterable[str] = (PORTABLE_RULE,)
) -> AdapterCheckpoint:
    """Parse and fully validate a checkpoint (the list in SPEC.md section 6.3).

    Args:
        blob: the file's bytes.
        source: a name for messages (usually the path).
        supported_basis_rules: rules the caller can regenerate; a file without bases whose rule is
            not among them is rejected rather than silently regenerated with another rule.

    Raises:
        CheckpointError: any structural or numerical defect.
        BasisRuleError: bases absent and the rule unsupported.

    """
    tensors, meta = decode(blob, source)
    dtypes = read_dtypes(blob, source)
    missing_meta = [k for k in REQUIRED_METADATA if k not in meta]
    if missing_meta:
        raise CheckpointError(f"{source}: not a randlora checkpoint: metadata lacks {missing_meta}")
    if meta["format"] != FORMAT_ID:
        raise CheckpointError(f"{source}: format is {meta['format']!r}, expected {FORMAT_ID!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format_version {meta['format_version']!r} is not supported (this reader: {FORMAT_VERSION})"
        )
    if meta["spec_version"].split(".")[0] != SPEC_VERSION.split(".")[0]:
        raise CheckpointError(f"{source}: spec_version {meta['spec_version']!r} is not supported (this reader: {SPEC_VERSION})")
    try:
        config = RandLoraConfig.parse(_json_field(meta, "config", source))
    except ConfigError as exc:
        raise CheckpointError(f"{source}: embedded config is invalid: {exc}") from None
    if meta["basis_rule"] != config.basis_rule:
        raise CheckpointError(f"{source}: basis_rule {meta['basis_rule']!r} disagrees with the config's {config.basis_rule!r}")
    adapter_name = meta["adapter_name"]
    if not adapter_name or "." in adapter_name:
        raise CheckpointError(f"{source}: adapter_name {adapter_name!r} must be non-empty and contain no '.'")
    layers = _parse_layers(_json_field(meta, "layers", source), source)
    shape = _parse_bases_shape(_json_field(meta, "bases_shape", source), config, layers, source)
    biases, mts = _parse_extra(_json_field(meta, "extra", source), source)

    if biases and config.bias == "none":
        raise CheckpointError(f"{source}: biases {biases[:5]} are stored but the config says bias='none'")
    if config.bias == "randlora_only" and set(biases) - set(layers):
        raise CheckpointError(f"{source}: bias='randlora_only' but biases of non-adapted modules are stored")
    if meta["bases"] not in ("stored", "absent"):
        raise CheckpointError(f"{source}: metadata 'bases' must be 'stored' or 'absent', got {meta['bases']!r}")
    stored = meta["bases"] == "stored"
    expected = {p + LAMBDA_SUFFIX for p in layers} | {p + GAMMA_SUFFIX for p in layers}
    expected |= {p + ".bias" for p in biases} | {f"{p}.{n}" for p, names in mts.items() for n in names}
    if stored:
        expected |= {BASIS_A_KEY, BASIS_B_KEY}
    elif config.save_projection:
        raise CheckpointError(f"{source}: bases are absent but the config says save_projection=True (file incomplete?)")
    elif config.basis_rule not in set(supported_basis_rules):
        raise BasisRuleError(
            f"{source}: bases are absent and basis_rule {config.basis_rule!r} cannot be regenerated here "
            f"(supported: {sorted(set(supported_basis_rules))}); refusing to substitute another rule"
        )
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors {extra[:10]}{' ...' if len(extra) > 10 else ''}")

    for key, arr in tensors.items():
        if dtypes[key] not in FLOAT_CODES:
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {dtypes[key]}; only floating point is allowed")
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(f"{source}: tensor {key!r} contains NaN or Inf values")
    r = config.r
    for path, rec in layers.items():
        nb = num_bases(rec.m, r)
        for key, want in ((path + LAMBDA_SUFFIX, (r, nb)), (path + GAMMA_SUFFIX, (nb, rec.m))):
            if tensors[key].shape != want:
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tensors[key].shape}, expected {want}")
    for path in biases:
        rec = layers.get(path)
        bias = tensors[path + ".bias"]
        if bias.ndim != 1 or (rec is not None and bias.shape[0] != rec.out_features):
            want = f"({rec.out_features},)" if rec is not None else "1-D"
            raise CheckpointError(f"{source}: tensor {path + '.bias'!r} has shape {bias.shape}, expected {want}")
    bases = None
    if stored:
        allowed = {"F32"} if config.basis_rule == PORTABLE_RULE else FLOAT_CODES
        for key in (BASIS_A_KEY, BASIS_B_KEY):
            if dtypes[key] not in allowed:
                raise CheckpointError(f"{source}: basis {key!r} is {dtypes[key]}; rule {config.basis_rule!r} defines F32 values")
        a, b = tensors.pop(BASIS_A_KEY), tensors.pop(BASIS_B_KEY)
        if a.shape != shape.a_shape or b.shape != shape.b_shape:
            raise CheckpointError(
                f"{source}: stored bases have shapes {a.shape}, {b.shape}; bases_shape says {shape.a_shape}, {shape.b_shape}"
            )
        bases = (a, b)
    return AdapterCheckpoint(
        config=config,
        adapter_name=adapter_name,
        layers=layers,
        bases_shape=shape,
        tensors=tensors,
        bases=bases,
        biases=biases,
        modules_to_save=mts,
        bf16_keys=frozenset(k for k, code in dtypes.items() if code == "BF16"),
    )


def load(path: str | Path, supported_basis_rules: Iterable[str] = (PORTABLE_RULE,)) -> AdapterCheckpoint:
    """Read and validate the checkpoint at ``path`` (see :func:`from_bytes`)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    return from_bytes(p.read_bytes(), str(p), supported_basis_rules)


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
    "AdapterCheckpoint",
    "LayerRecord",
    "checkpoint_bytes_budget",
    "from_bytes",
    "load",
    "resolve_bases",
    "save",
    "to_bytes",
]
