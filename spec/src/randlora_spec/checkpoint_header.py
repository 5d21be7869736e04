"""The validated header of a checkpoint (SPEC.md 6.2, 6.3 items 12-25 except "finite values").

A :class:`CheckpointHeader` says everything a checkpoint holds except tensor values: config,
adapter name, layers, bases allocation, biases, ``modules_to_save`` and each tensor's dtype code and
shape. It is built from a file's safetensors metadata (:func:`header_from_metadata`) or, by
:func:`randlora_spec.checkpoint.validate`, from an in-memory checkpoint; both go through
:func:`check_contents`, so a defect gets the same message whichever way it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from randlora_spec.bases import PORTABLE_RULE, BasesShape, num_bases
from randlora_spec.config import BOOKKEEPING_FIELDS, SPEC_VERSION, RandLoraConfig
from randlora_spec.errors import BasisRuleError, CheckpointError, ConfigError
from randlora_spec.layer_kinds import BASE_FEATURES, LayerRecord, check_features, parse_record, positive_int
from randlora_spec.safetensors_io import TensorSpec
from randlora_spec.untrusted import brief, parse_json

FORMAT_ID = "randlora.adapter"
FORMAT_VERSION = "1"
BASIS_A_KEY = "randlora_A"
BASIS_B_KEY = "randlora_B"
LAMBDA_SUFFIX = ".randlora_lambda"
GAMMA_SUFFIX = ".randlora_gamma"
MAGNITUDE_SUFFIX = ".randlora_magnitude"
"""Key suffix of a DoRA adapter's magnitude vector ``(out_features,)`` (SPEC 3.11, 6.2)."""
MAX_METADATA_VALUE_BYTES = 4 * 1024 * 1024
"""A single metadata value larger than this is rejected before JSON parsing."""
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
BOOKKEEPING_KEY = "bookkeeping"
"""Optional metadata entry: the config's bookkeeping fields that are set (SPEC 6.2), as a JSON object."""
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
class CheckpointHeader:
    """Everything a checkpoint holds except tensor values, validated (SPEC 6.3 items 12-25 but "finite").

    ``tensors`` maps every tensor key (bases included, when stored) to its stored dtype code
    (``F32``, ``BF16``, ...) and shape.
    """

    config: RandLoraConfig
    adapter_name: str
    layers: dict[str, LayerRecord]
    bases_shape: BasesShape
    bases_stored: bool
    biases: list[str]
    modules_to_save: dict[str, list[str]]
    tensors: dict[str, TensorSpec]

    @property
    def bf16_keys(self) -> frozenset[str]:
        """Keys of the tensors stored as BF16."""
        return frozenset(k for k, spec in self.tensors.items() if spec.dtype == "BF16")


def _parse_layers(raw: Any, source: str) -> dict[str, LayerRecord]:
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{source}: metadata 'layers' must be a non-empty object of module path -> shape")
    return {path: parse_record(path, rec, source) for path, rec in raw.items()}


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) and n for n in value)


def _parse_extra(raw: Any, source: str) -> tuple[list[str], dict[str, list[str]]]:
    if not isinstance(raw, dict) or set(raw) != {"biases", "modules_to_save"}:
        raise CheckpointError(f"{source}: metadata 'extra' must hold exactly 'biases' and 'modules_to_save'")
    biases, mts = raw["biases"], raw["modules_to_save"]
    if not _names(biases):
        raise CheckpointError(f"{source}: extra.biases must be a list of module paths")
    if not isinstance(mts, dict) or not all(isinstance(k, str) and k and _names(v) for k, v in mts.items()):
        raise CheckpointError(f"{source}: extra.modules_to_save must map module paths to parameter-name lists")
    return biases, mts


def _parse_bases_shape(raw: Any, config: RandLoraConfig, layers: dict[str, LayerRecord], source: str) -> BasesShape:
    if not isinstance(raw, dict) or set(raw) != {"r", "m_max", "M_max", "nb_max"}:
        raise CheckpointError(f"{source}: metadata 'bases_shape' must hold r, m_max, M_max, nb_max")
    shape = BasesShape(**{k: positive_int(raw[k], f"bases_shape.{k}", source) for k in ("r", "m_max", "M_max", "nb_max")})
    if shape.r != config.r:
        raise CheckpointError(f"{source}: bases_shape.r = {brief(shape.r)} differs from config r = {config.r}")
    if shape.nb_max != num_bases(shape.m_max, shape.r) or shape.m_max > shape.M_max:
        raise CheckpointError(
            f"{source}: bases_shape {brief(raw)} is inconsistent (needs nb_max = ceil(m_max / r), m_max <= M_max)"
        )
    for path, rec in layers.items():
        if rec.m > shape.m_max or rec.M > shape.M_max:
            raise CheckpointError(
                f"{source}: layer {brief(path)} ({rec.in_features}x{rec.out_features}) does not fit bases_shape {brief(raw)}"
            )
    return shape


def _listing(keys: list[str]) -> str:
    return f"{brief(keys[:10])}{' ...' if len(keys) > 10 else ''}"


def _expected_tensors(
    config: RandLoraConfig,
    layers: dict[str, LayerRecord],
    biases: list[str],
    mts: dict[str, list[str]],
    stored: bool,
    source: str,
    supported_basis_rules: Iterable[str],
) -> set[str]:
    """SPEC 6.3 items 20 and 21: the tensor keys a checkpoint with this header must hold exactly."""
    expected = {p + LAMBDA_SUFFIX for p in layers} | {p + GAMMA_SUFFIX for p in layers}
    if config.use_dora:
        expected |= {p + MAGNITUDE_SUFFIX for p in layers}
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
    return expected


def _check_layer_shapes(
    config: RandLoraConfig, layers: dict[str, LayerRecord], tensors: Mapping[str, TensorSpec], source: str
) -> None:
    """SPEC 6.3 item 23: lambda (r, nb), gamma (nb, m) and, for DoRA, the magnitude (O,) of every layer."""
    r = config.r
    for path, rec in layers.items():
        nb = num_bases(rec.m, r)
        wants: list[tuple[str, tuple[int, ...]]] = [(path + LAMBDA_SUFFIX, (r, nb)), (path + GAMMA_SUFFIX, (nb, rec.m))]
        if config.use_dora:
            wants.append((path + MAGNITUDE_SUFFIX, (rec.out_features,)))
        for key, want in wants:
            if tensors[key].shape != want:
                raise CheckpointError(f"{source}: tensor {brief(key)} has shape {brief(tensors[key].shape)}, expected {want}")


def _check_biases(layers: dict[str, LayerRecord], biases: list[str], tensors: Mapping[str, TensorSpec], source: str) -> None:
    """SPEC 6.3 item 25: every stored bias is 1-D, of length out_features on an adapted layer."""
    for path in biases:
        rec = layers.get(path)
        bias = tensors[path + ".bias"].shape
        if len(bias) != 1 or (rec is not None and bias[0] != rec.out_features):
            want = f"({rec.out_features},)" if rec is not None else "1-D"
            raise CheckpointError(f"{source}: tensor {brief(path + '.bias')} has shape {brief(bias)}, expected {want}")


def _check_stored_bases(config: RandLoraConfig, shape: BasesShape, tensors: Mapping[str, TensorSpec], source: str) -> None:
    """SPEC 6.3 item 24: stored bases have the allocation's shapes, and F32 under the portable rule."""
    allowed = {"F32"} if config.basis_rule == PORTABLE_RULE else FLOAT_CODES
    for key in (BASIS_A_KEY, BASIS_B_KEY):
        if tensors[key].dtype not in allowed:
            raise CheckpointError(
                f"{source}: basis {key!r} is {tensors[key].dtype}; rule {config.basis_rule!r} defines F32 values"
            )
    a, b = tensors[BASIS_A_KEY].shape, tensors[BASIS_B_KEY].shape
    if a != shape.a_shape or b != shape.b_shape:
        raise CheckpointError(
            f"{source}: stored bases have shapes {brief(a)}, {brief(b)}; bases_shape says {shape.a_shape}, {shape.b_shape}"
        )


def _check_biases_allowed(config: RandLoraConfig, layers: dict[str, LayerRecord], biases: list[str], source: str) -> None:
    """SPEC 6.3 item 19: the stored biases agree with the config's ``bias``."""
    if biases and config.bias == "none":
        raise CheckpointError(f"{source}: biases {brief(biases[:5])} are stored but the config says bias='none'")
    if config.bias == "randlora_only" and set(biases) - set(layers):
        raise CheckpointError(f"{source}: bias='randlora_only' but biases of non-adapted modules are stored")


def check_contents(
    config: RandLoraConfig,
    adapter_name: Any,
    bases: Any,
    json_value: Callable[[str], Any],
    tensors: Mapping[str, TensorSpec],
    source: str,
    supported_basis_rules: Iterable[str],
    supported_features: Iterable[str] = BASE_FEATURES,
) -> CheckpointHeader:
    """SPEC 6.3 items 16-26 (values excepted) for a checkpoint whose config has been validated.

    ``json_value(key)`` gives the parsed value of the JSON-valued metadata ``layers``,
    ``bases_shape`` or ``extra`` (asked in that order, once each); ``bases`` is the metadata value
    ``stored`` or ``absent``; ``tensors`` describes every tensor present; ``supported_features``
    are the layer kinds (and ``dora``) the caller can compute (:mod:`randlora_spec.layer_kinds`).
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise CheckpointError(f"{source}: adapter_name {brief(adapter_name)} must be non-empty and contain no '.'")
    layers = _parse_layers(json_value("layers"), source)
    check_features(layers, config.use_dora, supported_features, source)
    shape = _parse_bases_shape(json_value("bases_shape"), config, layers, source)
    biases, mts = _parse_extra(json_value("extra"), source)
    _check_biases_allowed(config, layers, biases, source)
    if bases not in ("stored", "absent"):
        raise CheckpointError(f"{source}: metadata 'bases' must be 'stored' or 'absent', got {brief(bases)}")
    stored = bases == "stored"
    expected = _expected_tensors(config, layers, biases, mts, stored, source, supported_basis_rules)
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_listing(missing)}")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors {_listing(extra)}")
    for key, spec in tensors.items():
        if spec.dtype not in FLOAT_CODES:
            raise CheckpointError(f"{source}: tensor {brief(key)} has dtype {spec.dtype}; only floating point is allowed")
    _check_layer_shapes(config, layers, tensors, source)
    _check_biases(layers, biases, tensors, source)
    if stored:
        _check_stored_bases(config, shape, tensors, source)
    return CheckpointHeader(config, adapter_name, layers, shape, stored, biases, mts, dict(tensors))


def _json_field(meta: Mapping[str, str], key: str, source: str) -> Any:
    raw = meta[key]
    if len(raw) > MAX_METADATA_VALUE_BYTES:
        raise CheckpointError(f"{source}: metadata {key!r} is {len(raw)} bytes, over the {MAX_METADATA_VALUE_BYTES}-byte limit")
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise CheckpointError(f"{source}: metadata {key!r} is not valid JSON ({exc})") from None


def _config(metadata: Mapping[str, str], source: str) -> RandLoraConfig:
    """The embedded config, with the bookkeeping entry's fields when the file has one."""
    raw = _json_field(metadata, "config", source)
    if BOOKKEEPING_KEY in metadata:
        bookkeeping = _json_field(metadata, BOOKKEEPING_KEY, source)
        if not isinstance(bookkeeping, dict) or not set(bookkeeping) <= set(BOOKKEEPING_FIELDS):
            raise CheckpointError(f"{source}: metadata {BOOKKEEPING_KEY!r} must be an object of {list(BOOKKEEPING_FIELDS)}")
        if isinstance(raw, dict) and set(bookkeeping) & set(raw):
            raise CheckpointError(f"{source}: bookkeeping fields belong in metadata {BOOKKEEPING_KEY!r}, not in the config")
        raw = {**raw, **bookkeeping} if isinstance(raw, dict) else raw
    try:
        return RandLoraConfig.parse(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: embedded config is invalid: {exc}") from None


def header_from_metadata(
    metadata: Mapping[str, str],
    tensors: Mapping[str, TensorSpec],
    source: str,
    supported_basis_rules: Iterable[str] = (PORTABLE_RULE,),
    supported_features: Iterable[str] = BASE_FEATURES,
) -> CheckpointHeader:
    """Validate a file's metadata and tensor descriptions (SPEC 6.3 items 12-26 except finite values).

    Args:
        metadata: the container's ``__metadata__`` (strings to strings).
        tensors: every tensor of the container, by key: stored dtype code and shape.
        source: a name for messages (usually the path).
        supported_basis_rules: rules the caller can regenerate; a file without bases whose rule is
            not among them is rejected rather than silently regenerated with another rule.
        supported_features: layer kinds (and ``dora``) the caller can compute; a file needing
            another is rejected (default: spec 1.0's, linear layers only).

    Raises:
        CheckpointError: any structural defect, or a feature the caller does not support.
        BasisRuleError: bases absent and the rule unsupported.

    """
    missing_meta = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing_meta:
        raise CheckpointError(f"{source}: not a randlora checkpoint: metadata lacks {missing_meta}")
    if metadata["format"] != FORMAT_ID:
        raise CheckpointError(f"{source}: format is {brief(metadata['format'])}, expected {FORMAT_ID!r}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: format_version {brief(metadata['format_version'])} is not supported (this reader: {FORMAT_VERSION})"
        )
    if metadata["spec_version"].partition(".")[0] != SPEC_VERSION.partition(".")[0]:
        raise CheckpointError(
            f"{source}: spec_version {brief(metadata['spec_version'])} is not supported (this reader: {SPEC_VERSION})"
        )
    config = _config(metadata, source)
    if metadata["basis_rule"] != config.basis_rule:
        raise CheckpointError(
            f"{source}: basis_rule {brief(metadata['basis_rule'])} disagrees with the config's {config.basis_rule!r}"
        )
    return check_contents(
        config,
        metadata["adapter_name"],
        metadata["bases"],
        lambda key: _json_field(metadata, key, source),
        tensors,
        source,
        supported_basis_rules,
        supported_features,
    )
