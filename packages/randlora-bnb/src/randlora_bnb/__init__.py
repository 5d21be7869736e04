"""randlora-bnb: RandLoRA on bitsandbytes 8-bit (LLM.int8()) and 4-bit (NF4 / FP4) base layers.

Installing the package is enough: randlora-core discovers the wrappers through the
``randlora.layers`` entry point, so :func:`randlora_core.get_randlora_model` adapts
``bitsandbytes.nn.Linear8bitLt`` and ``Linear4bit`` layers like any ``nn.Linear``. This module adds
the wrappers themselves, quantization helpers and QLoRA-style model preparation.
"""

from randlora_bnb.layer import QuantizedMergeWarning, RandLoraBnbLinear, RandLoraLinear4bit, RandLoraLinear8bitLt
from randlora_bnb.prepare import enable_input_require_grads, prepare_model_for_kbit_training
from randlora_bnb.quant import (
    QUANT_TYPES,
    WeightSnapshot,
    bnb_dequantize_agrees,
    dequantize_weight,
    is_quantized,
    quant_type_of,
    quantize_linear,
    quantize_model,
    requantize_weight,
    restore_standard_layout,
    restore_weight,
    snapshot_weight,
)
from randlora_bnb.register import register

__version__ = "1.0.0"

__all__ = [
    "QUANT_TYPES",
    "QuantizedMergeWarning",
    "RandLoraBnbLinear",
    "RandLoraLinear4bit",
    "RandLoraLinear8bitLt",
    "WeightSnapshot",
    "bnb_dequantize_agrees",
    "dequantize_weight",
    "enable_input_require_grads",
    "is_quantized",
    "prepare_model_for_kbit_training",
    "quant_type_of",
    "quantize_linear",
    "quantize_model",
    "register",
    "requantize_weight",
    "restore_standard_layout",
    "restore_weight",
    "snapshot_weight",
]
