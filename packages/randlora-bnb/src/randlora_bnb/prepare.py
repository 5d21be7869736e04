"""QLoRA-style preparation of a quantized model before adding RandLoRA adapters.

randlora-core freezes the base model when it adds the first adapter but does nothing about dtypes
or gradient checkpointing; this module covers that, like PEFT's ``prepare_model_for_kbit_training``
but for any ``nn.Module`` (transformers models included).
"""

from __future__ import annotations

import inspect
from typing import Any

import bitsandbytes as bnb
import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _is_quantized_param(param: nn.Parameter) -> bool:
    # Quantized parameters manage their own dtype: Params4bit data are packed codes (possibly viewed
    # as a float quant_storage), Int8Params are int8 or float16 weights quantized on the fly.
    return isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def _make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def enable_input_require_grads(model: nn.Module) -> bool:
    """Make the input embeddings' output require grad; True if the model exposes its input embeddings.

    With re-entrant gradient checkpointing a checkpointed segment whose inputs do not require grad
    yields no gradient at all, and in a frozen model nothing before the first adapter does. Uses
    the model's own ``enable_input_require_grads`` (transformers) when present, else a forward hook
    on ``model.get_input_embeddings()``.
    """
    enable_grads = getattr(model, "enable_input_require_grads", None)
    if callable(enable_grads):
        enable_grads()
        return True
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not isinstance(embeddings, nn.Module):
        return False
    embeddings.register_forward_hook(_make_output_require_grad)
    return True


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    upcast_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Prepare a bitsandbytes-quantized model for RandLoRA training (in place); returns ``model``.

    1. Freezes every parameter (the adapters added afterwards are the only trainable ones).
    2. Casts every float16 / bfloat16 parameter that is not bitsandbytes-quantized (layer norms,
       embeddings, biases, an unquantized head) to ``upcast_dtype``: small parameters in half
       precision make layer norms and losses unstable, and they cost little memory in float32.
    3. With ``use_gradient_checkpointing``: makes the input embeddings' output require grad (see
       :func:`enable_input_require_grads`) unless ``use_reentrant=False`` is requested, and calls
       ``model.gradient_checkpointing_enable`` (transformers) when the model has it, passing
       ``gradient_checkpointing_kwargs``. Plain ``nn.Module`` models checkpoint however they like.

    Call it on the quantized model before :func:`randlora_core.get_randlora_model`.
    """
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in HALF_DTYPES and not _is_quantized_param(param):
            param.data = param.data.to(upcast_dtype)
    if use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            enable_input_require_grads(model)
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if callable(enable):
            if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
                enable(gradient_checkpointing_kwargs=kwargs)
            else:
                enable()
    return model
