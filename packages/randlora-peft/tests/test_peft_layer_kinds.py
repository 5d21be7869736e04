"""Adapters PEFT's RandLoRA cannot hold are refused on the way to PEFT (catalogue row ERR-367), and the peft
drivers skip the golden cases of other layer kinds and DoRA with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.testing import model_state
from randlora_peft import save_peft_adapter
from randlora_peft.driver import PeftDriver, PeftNativeDriver
from randlora_spec.driver import Unsupported
from randlora_spec.errors import ConfigError
from randlora_spec.golden import load_cases
from randlora_spec.testing import catalogue


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 4)


def test_err_367_an_adapter_on_a_convolution_has_no_peft_form(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_randlora_model(Net(), RandLoraConfig(r=2, target_modules=["conv", "head"]))
    call = lambda: save_peft_adapter(model, tmp_path / "peft")  # noqa: E731
    catalogue.check_row("ERR-367", call, model, tmp_path, state=model_state)


def test_a_dora_adapter_has_no_peft_form(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_randlora_model(Net(), RandLoraConfig(r=2, target_modules=["head"], use_dora=True))
    with pytest.raises(Exception) as info:
        save_peft_adapter(model, tmp_path / "peft")
    assert isinstance(info.value, ConfigError) or "dora" in str(info.value)
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("driver", [PeftDriver(), PeftNativeDriver()], ids=lambda d: d.name)
def test_drivers_skip_other_kinds_and_dora_with_the_reason(driver: PeftDriver) -> None:
    wanted = ("forward-conv2d-float32", "merge-dora-in-lt-out-float64", "checkpoint-layer-kinds")
    cases = [c for c in load_cases() if c.id in wanted]
    assert len(cases) == 3
    for case in cases:
        result = driver.run(case)
        assert isinstance(result, Unsupported) and "PEFT 0.21's RandLoRA adapts only" in result.reason


def test_lora_export_refuses_other_kinds_and_dora() -> None:
    from randlora_peft.lora_export import convert_to_lora
    from randlora_spec.errors import CheckpointError

    torch.manual_seed(0)
    for targets, dora in ((["conv"], False), (["head"], True)):
        model = get_randlora_model(Net(), RandLoraConfig(r=2, target_modules=targets, use_dora=dora))
        with pytest.raises(CheckpointError, match="only \\['linear'\\] are supported here"):
            convert_to_lora(model, rank=2)
