"""Reading, rewriting and creating bitsandbytes quantized linear weights.

Two layer families, identified by their own types:
- ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8()): an ``Int8Params`` weight; quantized, its data is
  the int8 ``CB`` (out, in) with the per-row absmax ``SCB`` (float32; on the parameter until the
  first forward, then on the layer's ``state``): dense weight ``CB * SCB / 127``. With
  ``has_fp16_weights=True`` (or before the first move to a device) the data is still float.
- ``bitsandbytes.nn.Linear4bit`` (QLoRA; NF4 or FP4): a ``Params4bit`` of packed 4-bit codes and a
  ``QuantState`` (blockwise absmax, 8-bit itself with ``compress_statistics``; code, blocksize,
  original dtype and shape).
Re-quantizing uses the layer's own settings and replaces the *parameter*, never the module, so
the module a model holds (and ``merge_and_unload`` returns) stays the same object.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

if TYPE_CHECKING:
    from typing_extensions import Unpack

QUANT_TYPES = ("int8", "nf4", "fp4")
"""The quantization kinds this package supports, by the names the spec's tolerances use."""
INT8_SCALE = 127.0
"""LLM.int8() maps each row's absmax to 127."""


def quant_type_of(module: nn.Module) -> str:
    """``"int8"``, ``"nf4"`` or ``"fp4"`` for a bitsandbytes linear layer.

    Raises:
        TypeError: ``module`` is neither a ``Linear8bitLt`` nor a ``Linear4bit``.

    """
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    if isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        state = _quant_state(module)
        return str(getattr(weight, "quant_type", None) or getattr(state, "quant_type", "fp4"))
    raise _unsupported(module)


def _unsupported(module: nn.Module) -> TypeError:
    return TypeError(f"not a bitsandbytes Linear8bitLt/Linear4bit: {type(module).__name__}")


def is_quantized(module: nn.Module) -> bool:
    """Whether the layer's weight currently holds quantized data (False before bitsandbytes quantized it)."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.data.dtype == torch.int8
    if isinstance(module, bnb.nn.Linear4bit):
        return bool(getattr(module.weight, "bnb_quantized", False)) and _quant_state(module) is not None
    raise _unsupported(module)


def _quant_state(module: nn.Module) -> bnbf.QuantState | None:
    # The parameter normally carries the state; FSDP-style conversions can lose it while the module
    # keeps a copy (bitsandbytes restores it the same way in Linear4bit.forward).
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _required_state(module: nn.Module) -> bnbf.QuantState:
    """The ``QuantState`` of a layer :func:`is_quantized` accepted (which implies it has one)."""
    state = _quant_state(module)
    if state is None:
        raise RuntimeError("Linear4bit holds quantized data but no quant_state; its state is inconsistent")
    return state


def _int8_scale(module: bnb.nn.Linear8bitLt) -> torch.Tensor:
    # SCB sits on the parameter until the first forward moves it into the matmul state.
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    if scb is None:
        raise RuntimeError("Linear8bitLt holds int8 data but no row scales (SCB); its state is inconsistent")
    return scb


def _dequantize_4bit(data: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """Codes times blockwise absmax, rounded to the state's dtype, as float32 of the state's shape.

    Written out in torch rather than calling ``bitsandbytes.functional.dequantize_4bit`` because
    bitsandbytes' CPU kernel (0.50.2) scrambles the blocks when a row is a multiple of 16 values
    but not of the blocksize (e.g. ``in_features`` 16 or 48 with blocksize 64). Where that kernel is
    right the two agree bit for bit (tested), and on other devices this is used for merges only.
    """
    flat = data.reshape(-1)
    if flat.dtype != torch.uint8:  # a float/int quant_storage is a view of the same bytes
        flat = flat.view(torch.uint8)
    n = int(state.shape[0]) * int(state.shape[1])
    codes = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:n]  # first value in the high nibble
    absmax = state.absmax
    if state.nested:  # statistics themselves 8-bit quantized around an offset, as bitsandbytes decodes them
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    scale = absmax.to(torch.float32).repeat_interleave(state.blocksize)[:n]
    values: torch.Tensor = state.code.to(device=flat.device, dtype=torch.float32)[codes.long()] * scale
    return values.to(state.dtype).to(torch.float32).reshape(int(state.shape[0]), int(state.shape[1]))


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense float32 ``(out_features, in_features)`` tensor, on its device.

    This is the matrix the layer's forward multiplies with (up to the rounding of its compute
    dtype). A 4-bit weight in bitsandbytes' CPU inference layout is first restored, exactly, to the
    standard layout (see :func:`restore_standard_layout`).
    """
    if isinstance(module, bnb.nn.Linear8bitLt):
        data = module.weight.data
        if data.dtype != torch.int8:  # has_fp16_weights, or not quantized yet
            return data.detach().to(torch.float32).clone()
        # Same expression as bitsandbytes' own int8 backward / CPU matmul, so the values agree bit for bit.
        return data.to(torch.float32).mul_(_int8_scale(module).to(torch.float32).unsqueeze(1).mul(1.0 / INT8_SCALE))
    if isinstance(module, bnb.nn.Linear4bit):
        if not is_quantized(module):
            return module.weight.data.detach().to(torch.float32).clone()
        restore_standard_layout(module)
        return _dequantize_4bit(module.weight.data, _required_state(module))
    raise _unsupported(module)


def bnb_dequantize_agrees(module: nn.Module) -> bool:
    """Whether bitsandbytes' own 4-bit dequantization of this layer agrees with :func:`dequantize_weight`'s.

    False exposes the bitsandbytes CPU kernel bug described in :func:`_dequantize_4bit` for this
    layer's shape: its forward, which dequantizes with that kernel, would use a scrambled weight.
    Agreement allows rounding-level differences (2**-10 of the largest value: some bitsandbytes
    releases decode FP4 on CPU with slightly different constants); scrambled blocks are off by
    whole quantization levels.
    """
    if not isinstance(module, bnb.nn.Linear4bit) or not is_quantized(module):
        return True
    reference = dequantize_weight(module)
    state = _required_state(module)
    theirs = bnbf.dequantize_4bit(module.weight.data, state)
    if tuple(theirs.shape) != tuple(state.shape):  # bitsandbytes' legacy transposed-output shim (1-row data)
        theirs = theirs.t()
    if reference.numel() == 0:
        return True
    error = float((theirs.to(torch.float32) - reference).abs().max())
    return error <= float(reference.abs().max()) * 2.0**-10


def requantize_weight(module: nn.Module, dense: torch.Tensor) -> None:
    """Replace the layer's weight by ``dense`` (out, in), quantized with the layer's own settings.

    The module object is kept (only its weight parameter is replaced, or rewritten in place when
    the layer holds float data), so references to it stay valid.
    """
    if isinstance(module, bnb.nn.Linear8bitLt):
        _requantize_int8(module, dense)
    elif isinstance(module, bnb.nn.Linear4bit):
        _requantize_4bit(module, dense)
    else:
        raise _unsupported(module)


def _requantize_int8(module: bnb.nn.Linear8bitLt, dense: torch.Tensor) -> None:
    weight = module.weight
    if weight.data.dtype != torch.int8:
        weight.data.copy_(dense.to(weight.dtype))
    else:
        # Quantize on the layer's device with the same routine Int8Params uses (via float16, row-wise).
        cb, scb, _ = bnbf.int8_vectorwise_quant(dense.to(device=weight.device, dtype=torch.float16).contiguous())
        module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    # Drop cached CB/SCB (and any fp16-weights cache): the next forward picks up the new weight.
    module.state.reset_grads()


def _requantize_4bit(module: bnb.nn.Linear4bit, dense: torch.Tensor) -> None:
    weight = module.weight  # the settings are read from the weight as it was, before any layout restore
    if not is_quantized(module):
        weight.data.copy_(dense.to(weight.dtype))
        return
    restore_standard_layout(module)
    state = _required_state(module)
    settings = Params4bitSettings(
        blocksize=getattr(weight, "blocksize", None) or state.blocksize,
        compress_statistics=getattr(weight, "compress_statistics", state.nested),
        quant_type=getattr(weight, "quant_type", None) or state.quant_type,
        quant_storage=getattr(weight, "quant_storage", None) or weight.data.dtype,
    )
    # Quantize from the original dtype, so dequantization keeps returning what it returned before.
    data, new_state = bnbf.quantize_4bit(dense.to(device=weight.device, dtype=state.dtype).contiguous(), **settings)
    module.weight = bnb.nn.Params4bit(
        data, requires_grad=False, quant_state=new_state, module=module, bnb_quantized=True, **settings
    )
    module.quant_state = new_state


class Params4bitSettings(TypedDict, total=False):
    """The settings a ``Params4bit`` carries besides its data and quant state (its constructor's keywords)."""

    blocksize: int
    compress_statistics: bool
    quant_type: str
    quant_storage: torch.dtype


@dataclass(frozen=True)
class WeightSnapshot:
    """References to a quantized weight's tensors (not copies), enough to reinstall it exactly.

    Re-quantizing never writes into the old tensors (it builds new ones), so holding them keeps the
    pre-merge weight intact at the cost of its quantized size while the snapshot lives.
    """

    data: torch.Tensor
    int8_scale: torch.Tensor | None = None
    quant_state: bnbf.QuantState | None = None
    settings: Params4bitSettings = field(default_factory=Params4bitSettings)


def snapshot_weight(module: nn.Module) -> WeightSnapshot | None:
    """A :class:`WeightSnapshot` of a quantized layer's weight; ``None`` when the weight is not quantized."""
    if not is_quantized(module):
        return None
    if isinstance(module, bnb.nn.Linear8bitLt):
        return WeightSnapshot(data=module.weight.data, int8_scale=_int8_scale(module))
    restore_standard_layout(module)
    weight = module.get_parameter("weight")
    if not isinstance(weight, bnb.nn.Params4bit):  # is_quantized: the weight carries bnb_quantized, a Params4bit's
        raise RuntimeError(f"a quantized Linear4bit holds a {type(weight).__name__} weight, not a Params4bit")
    settings = Params4bitSettings(
        blocksize=weight.blocksize,
        compress_statistics=weight.compress_statistics,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
    )
    return WeightSnapshot(data=weight.data, quant_state=_quant_state(module), settings=settings)


def restore_weight(module: nn.Module, snapshot: WeightSnapshot) -> None:
    """Reinstall the weight captured by :func:`snapshot_weight` (bit-identical), replacing the current one."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        data = snapshot.data
        module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=snapshot.int8_scale)
        module.state.reset_grads()
        return
    if not isinstance(module, bnb.nn.Linear4bit):
        raise _unsupported(module)
    module.weight = bnb.nn.Params4bit(
        snapshot.data,
        requires_grad=False,
        quant_state=snapshot.quant_state,
        module=module,
        bnb_quantized=True,
        **snapshot.settings,
    )
    module.quant_state = snapshot.quant_state


WeightToken = tuple[weakref.ref[torch.Tensor], int, int]
"""What :func:`weight_token` returns: a weak reference to the weight, its data pointer and version."""


def weight_token(module: nn.Module) -> WeightToken:
    """An identity token for the layer's current weight: changes when it is replaced or written in place."""
    weight = module.get_parameter("weight")
    return weakref.ref(weight), weight.data.data_ptr(), weight._version


def same_weight(module: nn.Module, token: WeightToken) -> bool:
    """Whether the layer still holds the weight ``token`` was taken of, unmodified."""
    ref, ptr, version = token
    weight = module.get_parameter("weight")
    return ref() is weight and weight.data.data_ptr() == ptr and weight._version == version


def restore_standard_layout(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference repacking of a ``Linear4bit`` weight, exactly; True if it was packed.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a 4-bit weight in place the first time
    ``Linear4bit`` runs in eval mode without gradients: codes are reordered for its kernel and the
    blockwise absmax is rounded to bfloat16 and transposed. bitsandbytes' own inverse
    (``_convert_weight_packed_for_cpu_inverse``) mis-orders the absmax of non-nested weights with more
    than one block per row (0.50.2), so this function re-derives the standard layout itself: the
    4-bit codes are unchanged and the absmax values are the bfloat16 ones the packed kernel used,
    stored as float32 without nesting. The dense weight is therefore exactly the one the packed layer
    computed with.
    """
    if not isinstance(module, bnb.nn.Linear4bit):
        return False
    state = _quant_state(module)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    packed = module.weight.data
    n, k = int(state.shape[0]), int(state.shape[1])
    block_n = 32  # rows per packing block (bitsandbytes 0.50.2 layout)
    # Each group of 32 bytes holds 64 nibbles: the low nibbles are entries 0..31, the high ones 32..63,
    # and the 64 entries are (32 rows) x (2 adjacent columns) of one row block.
    groups = packed.reshape(-1, 32)
    nibbles = torch.cat([groups & 0xF, (groups >> 4) & 0xF], dim=-1)
    codes = nibbles.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2).reshape(n * k)
    # Standard layout: consecutive codes (row-major) share a byte, the first in the high nibble.
    standard = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)
    standard = standard.reshape(getattr(state, "original_qshape", (n * k // 2, 1)))
    storage_type = getattr(state, "original_storage_type", None)
    if storage_type is not None:
        standard = standard.view(storage_type)
    absmax = state.absmax.t().reshape(-1).to(torch.float32)  # packed as (k // blocksize, n) bfloat16
    restored = bnbf.QuantState(
        absmax=absmax,
        shape=torch.Size((n, k)),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=getattr(state, "original_dtype", torch.float32),
    )
    weight = module.weight
    module.weight = bnb.nn.Params4bit(
        standard,
        requires_grad=False,
        quant_state=restored,
        blocksize=state.blocksize,
        compress_statistics=getattr(weight, "compress_statistics", False),
        quant_type=state.quant_type,
        quant_storage=getattr(weight, "quant_storage", torch.uint8),
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = restored
    return True


def _moved(param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``param.to(device)``, called through the Tensor it is (bitsandbytes annotates its parameters' ``to`` as a module's)."""
    return param.to(device)


class QuantizeOptions(TypedDict, total=False):
    """The keyword options of :func:`quantize_linear`, which :func:`quantize_model` passes on."""

    compute_dtype: torch.dtype | None
    compress_statistics: bool
    blocksize: int
    quant_storage: torch.dtype
    has_fp16_weights: bool
    threshold: float
    device: torch.device | str | None


def quantize_linear(
    linear: nn.Linear,
    quant_type: str,
    *,
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
    has_fp16_weights: bool = False,
    threshold: float = 0.0,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A quantized copy of ``linear``: ``Linear8bitLt`` for ``"int8"``, ``Linear4bit`` for ``"nf4"`` / ``"fp4"``.

    ``linear`` is not modified. 4-bit options: ``compute_dtype``, ``compress_statistics``,
    ``blocksize``, ``quant_storage``; 8-bit options: ``has_fp16_weights``, ``threshold``. The weight
    is quantized on ``device`` (default: the device of ``linear``'s weight); float64 weights are
    quantized from float32, the widest dtype bitsandbytes accepts.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    src = linear.weight.detach()
    target = torch.device(device) if device is not None else src.device
    if src.dtype == torch.float64:
        src = src.to(torch.float32)
    has_bias = linear.bias is not None
    if quant_type == "int8":
        module: nn.Module = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=has_fp16_weights,
            threshold=threshold,
            device="meta",  # the real weight is assigned below; skip allocating and initialising a throwaway one
        )
        # Int8Params quantizes when it moves from the CPU to a device, so it starts on the CPU.
        int8 = bnb.nn.Int8Params(src.to("cpu").clone(), requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights)
        module.weight = _moved(int8, target)
    else:
        module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            device="meta",
        )
        settings = Params4bitSettings(
            blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type, quant_storage=quant_storage
        )
        packed = bnb.nn.Params4bit(src.clone(), requires_grad=False, module=module, **settings)
        module.weight = _moved(packed, target)  # Params4bit quantizes on its first move to a real device
    if has_bias:
        bias = linear.bias.detach().to(device=target).clone()
        module.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    module.train(linear.training)
    return module


def quantize_model(
    model: nn.Module, quant_type: str, *, skip: Iterable[str] = (), **options: Unpack[QuantizeOptions]
) -> nn.Module:
    """Replace every plain ``nn.Linear`` of ``model`` (in place) by a quantized copy; returns ``model``.

    ``skip`` holds module names or ``.``-suffixes left unquantized (e.g. ``["lm_head"]``, as
    transformers' ``llm_int8_skip_modules``). Subclasses of ``nn.Linear`` (bitsandbytes layers
    included) are left alone. ``options`` are passed to :func:`quantize_linear`. A bare
    ``nn.Linear`` cannot be replaced in place: its quantized copy is returned instead.
    """
    if type(model) is nn.Linear:
        return quantize_linear(model, quant_type, **options)
    skipped = tuple(skip)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(name == s or name.endswith("." + s) for s in skipped):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(module, quant_type, **options))
    return model
