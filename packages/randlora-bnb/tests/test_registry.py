"""The registry plug-in: installing randlora-bnb makes randlora-core wrap bitsandbytes layers."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import bitsandbytes as bnb
import torch
from torch import nn

from randlora_bnb import RandLoraLinear4bit, RandLoraLinear8bitLt, register
from randlora_core import RandLoraLinear
from randlora_core.registry import registered_types, wrapper_for

SCRIPT = """
import logging, sys
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import torch, bitsandbytes as bnb
from torch import nn
from randlora_core import RandLoraConfig, get_randlora_model

net = nn.ModuleDict({
    "q4": bnb.nn.Linear4bit(16, 24, compute_dtype=torch.float32, quant_type="nf4"),
    "q8": bnb.nn.Linear8bitLt(16, 24, has_fp16_weights=False),
    "plain": nn.Linear(16, 24),
}).to("cpu")  # bitsandbytes quantizes on the move to a device
assert "randlora_bnb" not in sys.modules
model = get_randlora_model(net, RandLoraConfig(r=2, target_modules=["q4", "q8", "plain"]))
print(",".join(type(model.model[k]).__name__ for k in ("q4", "q8", "plain")))
"""


def test_installing_the_package_is_enough() -> None:
    (ep,) = [e for e in entry_points(group="randlora.layers") if e.name == "bnb"]
    assert ep.value == "randlora_bnb.register:register"
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "RandLoraLinear4bit,RandLoraLinear8bitLt,RandLoraLinear"


def test_bnb_types_take_precedence_over_the_nn_linear_builtin() -> None:
    register()
    register()  # idempotent
    names = registered_types()
    assert names.count("Linear8bitLt") == 1 and names.count("Linear4bit") == 1
    assert wrapper_for(bnb.nn.Linear8bitLt(4, 4)) is RandLoraLinear8bitLt
    assert wrapper_for(bnb.nn.LinearNF4(4, 4)) is RandLoraLinear4bit
    assert wrapper_for(bnb.nn.LinearFP4(4, 4)) is RandLoraLinear4bit
    assert wrapper_for(nn.Linear(4, 4)) is RandLoraLinear


def test_wrapping_does_not_modify_the_base_layer() -> None:
    layer = bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32).to("cpu")
    weight, state = layer.weight, layer.weight.quant_state
    wrapper = RandLoraLinear4bit(layer, fan_in_fan_out=True)  # as randlora-core's checkpoint check builds them
    assert wrapper.fan_in_fan_out is False  # bitsandbytes layers store (out, in)
    assert layer.weight is weight and layer.weight.quant_state is state
