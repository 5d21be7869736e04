"""The RandLoRA configuration schema (pydantic v2), exported as JSON Schema.

Field names equal PEFT's ``RandLoraConfig`` where PEFT has them, so PEFT users recognise them and
adapter_config.json files convert both ways.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from randlora_spec.bases import PEFT_RULE, PORTABLE_RULE
from randlora_spec.errors import ConfigError
from randlora_spec.untrusted import JSON_INT_LIMIT, MAX_JSON_INT_DIGITS, brief

SPEC_VERSION = "1.0"
"""Version of SPEC.md this package implements (major.minor; a new major breaks compatibility)."""

ALL_LINEAR = "all-linear"
"""The ``target_modules`` value that selects every linear layer but the output head (SPEC 2.3)."""

BOOKKEEPING_FIELDS = ("task_type", "base_model_name_or_path", "revision", "auto_mapping")
"""PEFT's bookkeeping fields, kept as config fields with PEFT's meaning (SPEC 2.1): they say what the
adapter is for and where its base model comes from, never what it computes. Not part of the
canonical JSON; checkpoints carry them in their own metadata entry (SPEC 6.2)."""

PEFT_BOOKKEEPING_KEYS = frozenset({"peft_type", "peft_version", "inference_mode"})
"""Keys of PEFT's adapter_config.json that are dropped on conversion: PEFT's own bookkeeping."""

PEFT_SAVE_PROJECTION_DEFAULT = True
"""PEFT's default for ``save_projection``: a PEFT config without the key stores its bases (SPEC 2.2)."""

Name = Annotated[str, Field(min_length=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]

BASIS_RULE_PATTERN = r"^[a-z0-9][a-z0-9.\-]*-v[0-9]+$"

RUNTIME_FIELDS = ("compute",)
OMITTED_WHEN_FALSE = ("use_dora",)
"""Fields added after spec 1.0 that canonical JSON leaves out at their default (false), so files of
adapters that do not use them stay byte-identical and readable by 1.0 readers, while files that do
are refused by those readers (an unknown field) instead of being misread (SPEC 2.1)."""
NON_CANONICAL_FIELDS = (*RUNTIME_FIELDS, *BOOKKEEPING_FIELDS)
"""Config fields that select how an implementation runs, not what it computes (SPEC 2.1): accepted
when parsing, but not part of the canonical JSON, checkpoints or the PEFT conversion."""


class RandLoraConfig(BaseModel):
    """Configuration of one RandLoRA adapter.

    Example:
        >>> cfg = RandLoraConfig(r=8, target_modules=["q_proj", "v_proj"])
        >>> RandLoraConfig.model_validate_json(cfg.model_dump_json()) == cfg
        True

    """

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        validate_assignment=True,
        json_schema_extra={
            "not": {
                "description": "sparse and very_sparse are mutually exclusive",
                "properties": {"sparse": {"const": True}, "very_sparse": {"const": True}},
                "required": ["sparse", "very_sparse"],
            }
        },
    )

    r: int = Field(32, ge=1, description="Rank of each random basis; smaller r means more trainable parameters.")
    randlora_alpha: float = Field(640.0, gt=0, allow_inf_nan=False, description="Update scale numerator: alpha / r.")
    randlora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability on the adapter's input, in [0, 1).")
    projection_prng_key: int = Field(0, ge=0, lt=2**64, description="64-bit seed of the shared random bases, in [0, 2**64).")
    save_projection: bool = Field(
        False,
        description="Store the shared bases in checkpoints (the portable rule regenerates them exactly; PEFT's default: true).",
    )
    sparse: bool = Field(False, description="Ternary bases with sparsity s = 3.")
    very_sparse: bool = Field(False, description="Ternary bases with sparsity s = sqrt(m_max).")
    fan_in_fan_out: bool = Field(False, description="Target layers store weight as (in, out) (GPT-2 Conv1D).")
    bias: Literal["none", "all", "randlora_only"] = Field("none", description="Which biases are trainable.")
    target_modules: list[Name] | Name | None = Field(
        None, description="Module names or suffixes, a full-match regex string, or 'all-linear'."
    )
    exclude_modules: list[Name] | Name | None = Field(None, description="Names or a regex excluded from targeting.")
    layers_to_transform: list[NonNegativeInt] | NonNegativeInt | None = Field(None, description="Layer indices to adapt.")
    layers_pattern: list[Name] | Name | None = Field(None, description="Name of the layer-list module, e.g. 'layers'.")
    modules_to_save: list[Name] | None = Field(None, description="Modules trained fully and saved with the adapter.")
    init_weights: bool = Field(True, description="Start as a no-op (lambda = 0); False draws lambda ~ N(0, 1).")
    use_dora: bool = Field(
        False,
        description=(
            "DoRA-style variant (the paper's RandDoRA): a trainable magnitude per output feature rescales the "
            "row-normalised updated weight (SPEC 3.11). Left out of canonical JSON when false."
        ),
    )
    basis_rule: str = Field(
        PORTABLE_RULE,
        pattern=BASIS_RULE_PATTERN,
        description=f"Versioned id of the basis-generation rule; '{PORTABLE_RULE}' is portable, '{PEFT_RULE}' is PEFT's.",
    )
    spec_version: str = Field(SPEC_VERSION, pattern=r"^1\.[0-9]+$", description="Version of SPEC.md the config follows (1.x).")
    compute: Literal["auto", "factored", "dense", "sparse"] = Field(
        "auto",
        description=(
            "How an implementation evaluates the adapter: 'factored' (two thin matmuls per layer), 'dense' "
            "(delta_W folded into the base matmul), 'sparse' (the factored path on the nonzeros of ternary "
            "bases) or 'auto' (chosen per call by a cost model). Results agree within the tolerances; a runtime "
            "preference, not serialised in canonical JSON or checkpoints."
        ),
    )

    task_type: Name | None = Field(None, description="PEFT bookkeeping: the task (e.g. 'CAUSAL_LM'), for PEFT's auto classes.")
    base_model_name_or_path: Name | None = Field(None, description="PEFT bookkeeping: where the base model comes from.")
    revision: Name | None = Field(None, description="PEFT bookkeeping: the base model's revision.")
    auto_mapping: dict[Name, str | None] | None = Field(
        None, description="PEFT bookkeeping: PEFT's auto_mapping (base model class and library), carried, never executed."
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error_from(exc) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> RandLoraConfig:
        """Validate JSON text; errors become :class:`ConfigError` naming each field."""
        try:
            data = json.loads(json_data)
        except (ValueError, RecursionError) as exc:  # also Python's limit on integer digits
            raise ConfigError(f"invalid RandLoraConfig: config: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"invalid RandLoraConfig: config: must be a JSON object, got {type(data).__name__}")
        return cls(**data)

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise config_error_from(exc) from None

    @field_validator("very_sparse")
    @classmethod
    def _one_sparsity(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("sparse"):
            raise ValueError("sparse and very_sparse are mutually exclusive: set at most one of them")
        return value

    @field_validator("r", "layers_to_transform")
    @classmethod
    def _writable_ints(cls, value: Any) -> Any:
        # Python cannot write longer integers as text (to_json would fail), nor read them from JSON.
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, int) and abs(number) >= JSON_INT_LIMIT:
                raise ValueError(f"integers have at most {MAX_JSON_INT_DIGITS} digits")
        return value

    @field_validator("layers_pattern")
    @classmethod
    def _pattern_needs_layers(cls, value: list[str] | str | None, info: ValidationInfo) -> list[str] | str | None:
        if value is not None and info.data.get("layers_to_transform") is None:
            raise ValueError("layers_pattern is only meaningful together with layers_to_transform")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RandLoraConfig:
        # Field validators only see earlier fields at construction; this also covers assignment.
        if self.sparse and self.very_sparse:
            raise PydanticCustomError("combination", "sparse, very_sparse: mutually exclusive, set at most one of them")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise PydanticCustomError("combination", "layers_pattern: only meaningful together with layers_to_transform")
        return self

    def check_patterns(self) -> None:
        """Raise :class:`ConfigError` unless every ``target_modules`` / ``exclude_modules`` string is a valid regex.

        Checked when the config is applied to a model rather than at construction, so that a config
        naming a pattern stays constructible and serialisable as PEFT's is (SPEC 2.3).
        """
        for field in ("target_modules", "exclude_modules"):
            pattern = getattr(self, field)
            if isinstance(pattern, str) and pattern.lower() != ALL_LINEAR:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{field}: {pattern!r} is not a valid regular expression ({exc})") from None

    @property
    def scaling(self) -> float:
        """The update's scale ``randlora_alpha / r``."""
        return self.randlora_alpha / self.r

    @classmethod
    def parse(cls, data: dict[str, Any] | str) -> RandLoraConfig:
        """Validate a dict or JSON string, raising :class:`ConfigError` that names each bad field."""
        try:
            if isinstance(data, str):
                return cls.model_validate_json(data)
            if not isinstance(data, dict):
                raise ConfigError(f"config must be a JSON object (dict), got {type(data).__name__}")
            for key in data:
                if not isinstance(key, str):
                    raise ConfigError(f"invalid RandLoraConfig: config: field names must be strings, got {brief(key)}")
            return cls(**data)
        except ValidationError as exc:
            raise config_error_from(exc) from None

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so identical configs give identical bytes.

        Runtime-only (``compute``) and bookkeeping fields (:data:`BOOKKEEPING_FIELDS`) are left out:
        they do not change what an adapter computes, so files stay byte-identical and readable by any
        1.x reader (checkpoints carry bookkeeping separately, :meth:`bookkeeping`). Fields of
        :data:`OMITTED_WHEN_FALSE` appear only when true.
        """
        data = self.model_dump(mode="json", exclude=set(NON_CANONICAL_FIELDS))
        for name in OMITTED_WHEN_FALSE:
            if data[name] is False:
                del data[name]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def bookkeeping(self) -> dict[str, Any]:
        """The bookkeeping fields that are set (not ``None``), by name."""
        return {k: v for k, v in self.model_dump(mode="json", include=set(BOOKKEEPING_FIELDS)).items() if v is not None}

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT ``adapter_config.json`` content for this config (``peft_type: RANDLORA``).

        PEFT regenerates bases with its own machine-dependent rule, so the result is faithful only
        when the bases travel with the checkpoint; the caller decides how to handle that. PEFT's
        RandLoraConfig has no ``exclude_modules``: it is left out, so a caller converting an adapter
        must express the final set of adapted modules in ``target_modules`` (e.g. explicit paths).

        Raises:
            ConfigError: ``use_dora`` is set: PEFT's RandLoRA has no DoRA variant, so no PEFT adapter
                can hold this one.

        """
        if self.use_dora:
            raise ConfigError("use_dora: PEFT's RandLoraConfig has no DoRA variant; a DoRA adapter cannot be expressed in PEFT")
        exclude = {"basis_rule", "spec_version", "exclude_modules", *RUNTIME_FIELDS, *OMITTED_WHEN_FALSE}
        data = self.model_dump(mode="json", exclude=exclude)
        data.update({"peft_type": "RANDLORA", "inference_mode": True})
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> RandLoraConfig:
        """Build from PEFT's ``adapter_config.json`` content.

        PEFT's own keys (``peft_type``, ``peft_version``, ``inference_mode``) are dropped, its
        bookkeeping kept (:data:`BOOKKEEPING_FIELDS`); any other unknown key is an error. The basis
        rule becomes PEFT's rule, since that is how PEFT made the bases, and a missing
        ``save_projection`` takes PEFT's default (true), not this spec's (SPEC 2.2 rule 5).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
        if data.get("peft_type") != "RANDLORA":
            raise ConfigError(f"peft_type must be 'RANDLORA', got {data.get('peft_type')!r}")
        fields = {k: v for k, v in data.items() if k not in PEFT_BOOKKEEPING_KEYS}
        if "use_dora" in fields:  # ours, not PEFT's: an adapter_config.json holding it was not written by PEFT
            raise ConfigError("use_dora: not a field of PEFT's RandLoraConfig (PEFT's RandLoRA has no DoRA variant)")
        if fields.get("layers_pattern") is not None and fields.get("layers_to_transform") is None:
            fields["layers_pattern"] = None  # PEFT accepts and ignores it without layers_to_transform
        fields["basis_rule"] = PEFT_RULE
        fields.setdefault("save_projection", PEFT_SAVE_PROJECTION_DEFAULT)
        return cls.parse(fields)


def config_error_from(exc: ValidationError) -> ConfigError:
    """Turn a pydantic error into a :class:`ConfigError` whose message names every failing field.

    For fields typed as a union (``list[str] | str``) pydantic reports one error per branch; the
    branch whose type did not even match is noise, so it is dropped when another branch has a
    real complaint, and union tags are removed from locations (``target_modules.1``).
    """
    entries: list[tuple[str, str, bool]] = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # model-level rules already start with the fields they involve
            entries.append(("", msg, False))
            continue
        field = str(err["loc"][0])
        location = ".".join([field, *(str(p) for p in err["loc"][1:] if isinstance(p, int))])
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not part of RandLoraConfig)"
        type_mismatch = err["type"].endswith("_type") and len(err["loc"]) > 1
        entries.append((location, msg, type_mismatch))
    fields_with_real_errors = {loc.split(".")[0] for loc, _, mismatch in entries if not mismatch}
    parts: list[str] = []
    for location, msg, mismatch in entries:
        if mismatch and location.split(".")[0] in fields_with_real_errors:
            continue
        text = f"{location}: {msg}" if location else msg
        if text not in parts:
            parts.append(text)
    return ConfigError("invalid RandLoraConfig: " + "; ".join(parts))


def json_schema() -> dict[str, Any]:
    """The language-neutral JSON Schema of :class:`RandLoraConfig`."""
    schema = RandLoraConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://randlora.dev/schema/randlora-config.schema.json"
    return schema
