"""accelerate(): PEFT RandLoRA models on randlora-core's kernels, PEFT's API unchanged."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from peft_helpers import GPT2_TARGETS, LLAMA_TARGETS, assert_close, peft, peft_model, tiny_llama, tokens

from randlora_peft import accelerate, is_accelerated, unaccelerate
from randlora_peft._peft import peft_randlora_linear
from randlora_spec import reference
from randlora_spec.errors import TargetModuleError


def _pair(base: torch.nn.Module, **config: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(PEFT model, accelerated deep copy of it)."""
    plain = peft_model(copy.deepcopy(base), **config)
    return plain, accelerate(copy.deepcopy(plain))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("compute", ["auto", "factored", "dense"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_and_gradients_match_peft(arch, compute, llama, gpt2):
    base, targets = (llama, LLAMA_TARGETS) if arch == "llama" else (gpt2, GPT2_TARGETS)
    plain = peft_model(copy.deepcopy(base), target_modules=targets)
    fast = accelerate(copy.deepcopy(plain), compute=compute)
    assert sum(is_accelerated(m) for m in fast.modules()) == sum(isinstance(m, peft_randlora_linear()) for m in plain.modules())
    x = tokens()
    y_plain, y_fast = plain(x).logits, fast(x).logits
    assert_close(y_fast, y_plain)
    y_plain.square().mean().backward()
    y_fast.square().mean().backward()
    g_plain, g_fast = _grads(plain), _grads(fast)
    assert g_plain.keys() == g_fast.keys() and len(g_plain) == 2 * len(targets if arch == "llama" else [0, 1, 2])
    for name in g_plain:
        assert_close(g_fast[name], g_plain[name])


def test_peft_api_keeps_working(llama, tmp_path):
    plain = peft_model(copy.deepcopy(llama), target_modules=["q_proj", "v_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.add_adapter(
            "other", peft.RandLoraConfig(r=4, randlora_alpha=32, target_modules=["q_proj", "v_proj"], init_weights=False)
        )
    fast = accelerate(copy.deepcopy(plain))
    x = tokens()
    with torch.no_grad():
        for name in ("other", "default"):
            plain.set_adapter(name)
            fast.set_adapter(name)
            assert_close(fast(x).logits, plain(x).logits)
        with fast.disable_adapter():
            assert torch.equal(fast(x).logits, llama(x).logits)
        plain.base_model.set_adapter(["default", "other"])
        fast.base_model.set_adapter(["default", "other"])
        assert_close(fast(x).logits, plain(x).logits)
        # merging goes through our get_delta_weight
        fast.base_model.merge_adapter(["default"])
        plain.base_model.merge_adapter(["default"])
        assert_close(fast(x).logits, plain(x).logits)
        fast.base_model.unmerge_adapter()
        plain.base_model.unmerge_adapter()
        fast.set_adapter("default")
        plain.set_adapter("default")
        expected = plain(x).logits
        merged = copy.deepcopy(fast).merge_and_unload()
        assert type(merged) is type(llama)
        assert_close(merged(x).logits, expected)
    # save_pretrained writes the very same files
    plain.save_pretrained(str(tmp_path / "plain"))
    fast.save_pretrained(str(tmp_path / "fast"))
    for name in ("adapter_model.safetensors", "other/adapter_model.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "fast" / name).read_bytes()


def test_adapters_of_different_ranks_on_one_layer():
    # PEFT alone slices the bases by its layer's last-added rank and fails on mixed ranks; our windows follow each adapter
    base = tiny_llama()
    fast = accelerate(peft_model(copy.deepcopy(base), r=4, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast.add_adapter("small", peft.RandLoraConfig(r=2, randlora_alpha=8, target_modules=["q_proj"], init_weights=False))
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    layer.randlora_A["small"] = layer.randlora_A["default"][:2].clone()
    layer.randlora_B["small"] = layer.randlora_B["default"][:, :, :2].repeat(1, 2, 1)[:, :16].contiguous()
    fast.set_adapter("small")
    x = torch.randn(3, 32)
    lam, gamma = layer.randlora_lambda["small"].detach().numpy(), layer.randlora_gamma["small"].detach().numpy()
    expected = reference.forward(
        x.numpy(),
        layer.get_base_layer().weight.detach().numpy(),
        None,
        {"small": reference.Adapter(2, 8.0, lam, gamma)},
        ["small"],
        layer.randlora_A["small"].numpy(),
        layer.randlora_B["small"].numpy(),
    )
    with torch.no_grad():
        assert_close(layer(x), torch.from_numpy(expected))


def test_training_loss_curve_matches_unaccelerated_peft():
    base = tiny_llama(layers=2)
    plain, fast = _pair(base, target_modules=LLAMA_TARGETS, randlora_alpha=16)
    curves = []
    for model in (plain, fast):
        model.train()
        torch.manual_seed(5)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(20):
            x = tokens(seed=100 + step, batch=2, length=8)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
    assert curves[0][-1] < curves[0][0]  # it trains
    assert_close(curves[1], curves[0])


def test_accelerate_is_idempotent_reversible_and_picklable(llama):
    plain = peft_model(copy.deepcopy(llama), target_modules=["q_proj"])
    fast = accelerate(accelerate(copy.deepcopy(plain)))
    clone = pickle.loads(pickle.dumps(fast))
    x = tokens()
    with torch.no_grad():
        assert torch.equal(clone(x).logits, fast(x).logits)
        unaccelerate(fast)
        assert not any(is_accelerated(m) for m in fast.modules())
        assert torch.equal(fast(x).logits, plain(x).logits)


def test_accelerate_needs_randlora_layers(llama):
    with pytest.raises(TargetModuleError, match="no PEFT RandLoRA"):
        accelerate(llama)


@pytest.mark.parametrize("compute", ["factored", "dense"])
def test_one_fused_node_per_layer_with_trainable_bias(compute):
    base = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 16))
    plain = peft_model(copy.deepcopy(base), target_modules=["0", "1"], bias="randlora_only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain.add_adapter("b", peft.RandLoraConfig(r=4, randlora_alpha=4, target_modules=["0", "1"], init_weights=False))
    plain.base_model.set_adapter(["default", "b"])
    fast = accelerate(copy.deepcopy(plain), compute=compute)
    x = torch.randn(2, 5, 24, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_(True)
    layer = fast.base_model.model[0]
    assert "RandLoraFunction" in layer(x_fast).grad_fn.name()
    y, y_fast = plain(x), fast(x_fast)
    assert_close(y_fast, y)
    (y * y).sum().backward()
    (y_fast * y_fast).sum().backward()
    assert_close(x_fast.grad, x.grad)
    g, g_fast = _grads(plain), _grads(fast)
    assert any("bias" in n for n in g) and g.keys() == g_fast.keys()
    for name in g:
        assert_close(g_fast[name], g[name])


def test_dropout_in_training_takes_peft_order_and_rng():
    base = torch.nn.Sequential(torch.nn.Linear(16, 16))
    plain = peft_model(copy.deepcopy(base), target_modules=["0"], randlora_dropout=0.25).train()
    fast = accelerate(copy.deepcopy(plain)).train()
    x = torch.randn(4, 16)
    torch.manual_seed(11)
    y = plain(x)
    torch.manual_seed(11)
    y_fast = fast(x)
    assert "RandLoraFunction" in y_fast.grad_fn.name()  # dropout: the adapter reads its own input inside the node
    assert_close(y_fast, y)


def test_compute_is_validated_and_overridable(llama):
    from randlora_core.compute import compute_override
    from randlora_spec.errors import ConfigError

    with pytest.raises(ConfigError, match="compute"):
        accelerate(peft_model(copy.deepcopy(llama), target_modules=["q_proj"]), compute="fast")
    fast = accelerate(peft_model(copy.deepcopy(llama), target_modules=["q_proj"]), compute="factored")
    x = tokens()
    with torch.no_grad():
        y = fast(x).logits
        with compute_override("dense"):
            assert_close(fast(x).logits, y)


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bfloat16_base_model(autocast_adapter_dtype):
    base = tiny_llama().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = peft.get_peft_model(
            copy.deepcopy(base),
            peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=LLAMA_TARGETS, init_weights=False),
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
    fast = accelerate(copy.deepcopy(plain))
    x = tokens()
    y, y_fast = plain(x).logits, fast(x).logits
    assert y_fast.dtype == y.dtype == torch.bfloat16
    assert_close(y_fast.float(), y.float(), "bfloat16")
    y.float().square().mean().backward()
    y_fast.float().square().mean().backward()
    g, g_fast = _grads(plain), _grads(fast)
    assert g.keys() == g_fast.keys() and g
    for name in g:
        assert_close(g_fast[name].float(), g[name].float(), "bfloat16")
