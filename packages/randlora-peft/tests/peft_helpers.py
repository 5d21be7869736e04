"""Helpers shared by the tests: tiny real transformers models (random weights, no downloads), PEFT models."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

from randlora_peft._peft import import_peft  # noqa: E402 - after the offline switches

peft = import_peft()

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from randlora_spec.tolerances import check_close  # noqa: E402

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # 32x32, 32->16, 32x32, 32->48, 48->32
GPT2_TARGETS = ["c_attn", "c_proj"]  # Conv1D: 32->96, 32->32, 128->32


def tiny_llama(seed: int = 0, layers: int = 1) -> LlamaForCausalLM:
    """A Llama-style causal LM (nn.Linear projections of several shapes), hidden 32."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 (Conv1D layers, fan_in_fan_out), hidden 32, dropout off, untied head."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=1,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def peft_model(base: torch.nn.Module, **config: object) -> torch.nn.Module:
    """``peft.get_peft_model`` with a RandLoRA config; lambda drawn at random so the adapter matters."""
    config.setdefault("init_weights", False)
    config.setdefault("r", 4)
    config.setdefault("randlora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.RandLoraConfig(**config))


def tokens(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    """Random token ids for the tiny models."""
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: str = "float32") -> None:
    """Within the spec's declared tolerance for ``dtype``."""
    a = actual.detach().to(torch.float64).numpy()
    e = expected.detach().to(torch.float64).numpy()
    ok, err, bound = check_close(a, e, dtype)
    assert ok, f"max error {err:.3g} > bound {bound:.3g}"


def same_module_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same module tree (names and types) and identical parameter/buffer values."""
    if [(n, type(m)) for n, m in a.named_modules()] != [(n, type(m)) for n, m in b.named_modules()]:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def np_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact equality of values (dtype-independent)."""
    return a.shape == b.shape and bool(np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def portable_checkpoint(save_projection: bool = True, seed: int = 0, scale: float = 1.0, alpha: float = 8.0) -> object:
    """A small randlora checkpoint under the portable rule: layers ``blk.q`` (16x16) and ``blk.v`` (16 -> 24), r = 4.

    ``seed`` and ``scale`` vary lambda and gamma, ``alpha`` the config, so two checkpoints can differ in every file.
    """
    from randlora_spec.bases import BasesShape, generate_bases
    from randlora_spec.checkpoint import AdapterCheckpoint, LayerRecord
    from randlora_spec.config import RandLoraConfig

    cfg = RandLoraConfig(
        r=4, randlora_alpha=alpha, target_modules=["q", "v"], save_projection=save_projection, projection_prng_key=3
    )
    layers = {"blk.q": LayerRecord(16, 16), "blk.v": LayerRecord(16, 24)}
    shape = BasesShape(r=4, m_max=16, M_max=24, nb_max=4)
    rng = np.random.default_rng(seed)
    tensors = {}
    for path in layers:
        tensors[path + ".randlora_lambda"] = (scale * rng.standard_normal((4, 4))).astype(np.float32)
        tensors[path + ".randlora_gamma"] = (scale * rng.standard_normal((4, 16))).astype(np.float32)
    bases = generate_bases(3, shape) if save_projection else None
    return AdapterCheckpoint(config=cfg, adapter_name="default", layers=layers, bases_shape=shape, tensors=tensors, bases=bases)
