"""torch.compile: a training step of a model with RandLoRA layers is one graph, and its gradients equal eager's.

A pure-torch Llama-style block (attention and gated MLP, every projection an ``nn.Linear``) keeps this
in core's own venv (no transformers); randlora-peft's tests repeat it on transformers' Llama.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch._dynamo
from torch import nn

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.compute import compute_override


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 48, heads: int = 4) -> None:
        super().__init__()
        self.attn = Attention(d, heads)
        self.gate_proj, self.up_proj = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def adapted() -> nn.Module:
    torch.manual_seed(0)
    return get_randlora_model(TinyLlama(), RandLoraConfig(r=4, target_modules="all-linear", init_weights=False))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).float().pow(2).mean()


def grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params))


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("compute", [None, "dense"])  # None: auto, which picks factored at these sizes
def test_training_step_has_no_graph_break(compute: str | None) -> None:
    model = adapted()
    torch._dynamo.reset()
    with compute_override(compute):
        explanation = torch._dynamo.explain(lambda ids: loss_of(model, ids))(IDS)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_fullgraph_gradients_equal_eager() -> None:
    model = adapted()
    eager = grads(model, loss_of(model, IDS))
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: loss_of(model, ids), fullgraph=True, backend="aot_eager")
    for g_eager, g_compiled in zip(eager, grads(model, compiled(IDS)), strict=True):
        assert torch.equal(g_eager, g_compiled)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor on CPU needs a C++ compiler")
def test_inductor_gradients_match_eager() -> None:
    model = adapted()
    loss = loss_of(model, IDS)
    eager = grads(model, loss)
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids: loss_of(model, ids), fullgraph=True)
    loss_c = compiled(IDS)
    torch.testing.assert_close(loss_c, loss, rtol=2e-5, atol=1e-6)
    for g_eager, g_compiled in zip(eager, grads(model, loss_c), strict=True):
        scale = float(g_eager.abs().max())
        torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=1e-6 + 2e-5 * scale)  # float32, SPEC 7
