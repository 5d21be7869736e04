"""Error catalogue rows ERR-360 - ERR-365 (docs/errors.md): layer kinds and DoRA in randlora-core.

As in test_core_error_catalogue.py, each call must raise the documented error and leave the model
(every parameter and buffer bit for bit, the module tree, the adapters) and the files unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model, load_adapter, save_adapter
from randlora_core.testing import model_state
from randlora_spec.testing import catalogue

ROWS = catalogue.Setups()
row = ROWS.row


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.embed = nn.Embedding(10, 8, padding_idx=0)
        self.q = nn.Linear(8, 8)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.q(self.conv(image).mean((2, 3)) + self.embed(ids).mean(1))


def adapted(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    kw.setdefault("target_modules", ["conv", "embed", "q"])
    return get_randlora_model(Net(), RandLoraConfig(r=2, init_weights=False, **kw))


def saved(tmp: Path) -> Path:
    path = tmp / "adapter.safetensors"
    save_adapter(adapted(), path)
    return path


@row("ERR-360")
def _max_norm(tmp: Path):
    torch.manual_seed(0)
    net = Net()
    net.embed = nn.Embedding(10, 8, max_norm=1.0)
    return net, lambda: get_randlora_model(net, RandLoraConfig(r=2, target_modules=["embed"]))


@row("ERR-361")
def _kind_differs(tmp: Path):
    path = saved(tmp)
    torch.manual_seed(0)
    net = Net()
    net.conv = nn.Linear(27, 8)  # type: ignore[assignment]
    return net, lambda: load_adapter(net, path)


@row("ERR-362")
def _kernel_differs(tmp: Path):
    path = saved(tmp)
    torch.manual_seed(0)
    net = Net()
    net.conv = nn.Conv2d(3, 8, (1, 9))
    return net, lambda: load_adapter(net, path)


@row("ERR-363")
def _dora_scale_zero(tmp: Path):
    model = adapted(use_dora=True, target_modules=["q"])
    model.add_adapter("b", RandLoraConfig(r=2, init_weights=False, use_dora=True, target_modules=["q"]))
    model.set_adapter(["default", "b"])
    with torch.no_grad():
        for name in ("default", "b"):  # f = 1/2 for both: c = 1 + (1/2 - 1) + (1/2 - 1) = 0
            model.model.q.randlora_magnitude[name].mul_(0.5)
    return model, lambda: model.merge_adapter(["default", "b"])


@row("ERR-364")
def _conv_input(tmp: Path):
    model = adapted()
    return model, lambda: model.model.conv(torch.randn(2, 4, 5, 5))


@row("ERR-365")
def _embedding_input(tmp: Path):
    model = adapted()
    return model, lambda: model.model.embed(torch.zeros(2, 3))


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path) -> None:
    model, call = ROWS[row_id](tmp_path)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)


def test_safe_merge_refuses_the_same_dora_merge(tmp_path: Path) -> None:
    model, _ = _dora_scale_zero(tmp_path)
    before = model_state(model)
    with pytest.raises(Exception) as info:
        model.merge_adapter(safe_merge=True)
    catalogue.check("ERR-363", info.value)
    assert model_state(model) == before
