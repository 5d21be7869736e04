"""CUDA checks (skipped without a GPU): bit-exact bases on device, and device forward against CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.bases import generate_bases
from randlora_spec.bases import BasesShape

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_bases_bit_exact_on_cuda(kind: str) -> None:
    shape = BasesShape(r=8, m_max=300, M_max=700, nb_max=38)
    cpu = generate_bases(2**64 - 5, shape, kind)
    gpu = generate_bases(2**64 - 5, shape, kind, device="cuda")
    for c, g in zip(cpu, gpu, strict=True):
        assert g.device.type == "cuda"
        assert torch.equal(c.view(torch.int32), g.cpu().view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_cuda_matches_cpu(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    model = get_randlora_model(net, RandLoraConfig(r=4, target_modules=["0", "2"], init_weights=False))
    x = torch.randn(5, 32)
    y_cpu = model(x)
    model.to("cuda", dtype)
    assert model.randlora_bases.randlora_A.device.type == "cuda"
    assert model.randlora_bases.randlora_A.dtype == torch.float32
    y = model(x.to("cuda", dtype))
    assert y.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float().cpu(), y_cpu, rtol=tol, atol=tol * y_cpu.abs().max().item())
    y.float().sum().backward()
    assert model.model[0].randlora_lambda["default"].grad.dtype == dtype
