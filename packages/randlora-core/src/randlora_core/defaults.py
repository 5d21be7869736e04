"""Per-architecture default ``target_modules`` for transformers models (``target_modules=None``).

PEFT adapts, when a config names no targets, the modules its table lists for the model's
``config.model_type``; for RandLoRA that table is PEFT's LoRA table. :data:`DEFAULT_TARGET_MODULES`
holds the same entries (names of the attention projections in each transformers architecture), so
``RandLoraConfig(target_modules=None)`` selects the same layers as PEFT. randlora-core does not
import transformers: the model type is read from the model's ``config`` attribute by duck typing,
and randlora-peft's tests check this table against the installed PEFT's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from randlora_spec.config import RandLoraConfig
from randlora_spec.errors import ConfigError

_QV_PROJ = ("q_proj", "v_proj")
_QUERY_VALUE = ("query", "value")
_QKV = ("query_key_value",)

DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": _QV_PROJ,
    "gpt2": ("c_attn",),
    "bloom": _QKV,
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": _QV_PROJ,
    "gptj": _QV_PROJ,
    "gpt_neox": _QKV,
    "gpt_neo": _QV_PROJ,
    "bert": _QUERY_VALUE,
    "roberta": _QUERY_VALUE,
    "xlm-roberta": _QUERY_VALUE,
    "electra": _QUERY_VALUE,
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": _QUERY_VALUE,
    "llama": _QV_PROJ,
    "llama4": _QV_PROJ,
    "chatglm": _QKV,
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": _QKV,
    "RefinedWeb": _QKV,
    "falcon": _QKV,
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": _QV_PROJ,
    "mixtral": _QV_PROJ,
    "stablelm": _QV_PROJ,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": _QV_PROJ,
    "gemma2": _QV_PROJ,
    "gemma3_text": _QV_PROJ,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": _QV_PROJ,
    "qwen3": _QV_PROJ,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}
"""``config.model_type`` -> module names (suffixes) or one full-match regex, as PEFT's RandLoRA defaults."""


def model_type_of(model: nn.Module) -> str | None:
    """The ``model_type`` of a transformers-style ``model.config`` (attribute or dict key), or ``None``."""
    config: Any = getattr(model, "config", None)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) and model_type else None


def with_default_targets(model: nn.Module, config: RandLoraConfig) -> RandLoraConfig:
    """``config`` itself when it names targets, else a copy whose ``target_modules`` are the architecture's defaults.

    Raises:
        ConfigError: ``target_modules`` is not set and the model has no known ``config.model_type``.

    """
    if config.target_modules is not None:
        return config
    model_type = model_type_of(model)
    defaults = DEFAULT_TARGET_MODULES.get(model_type) if model_type is not None else None
    if defaults is None:
        found = f"its config.model_type is {model_type!r}" if model_type else "it has no config.model_type"
        raise ConfigError(
            "target_modules: must be set (names, a regex, or 'all-linear') for this model: "
            f"{found}, which has no per-architecture default"
        )
    resolved = config.model_copy(deep=True)
    resolved.target_modules = defaults if isinstance(defaults, str) else sorted(defaults)
    return resolved
