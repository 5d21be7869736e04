"""Tiny random-weight transformers models of five families, and PEFT / randlora-core model pairs on them.

A pair is a PEFT RandLoRA model and a randlora-core model adapting separate copies of one base
model with the same config, the core model given PEFT's bases and lambda/gamma (so both compute
the same function and every difference is an implementation difference). Models are float64:
through a whole network (T5 most) float32 rounding differences of two correct implementations
grow past float32's per-operation tolerance, while in float64 they stay at ~1e-13 of the output.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft_helpers import peft
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from randlora_core import RandLoraConfig, RandLoraModel, get_randlora_model

VOCAB = 64


def _llama() -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


def _gpt2() -> nn.Module:
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(cfg)


def _t5() -> nn.Module:
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def _bert() -> nn.Module:
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def _opt() -> nn.Module:
    cfg = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    return OPTForCausalLM(cfg)


@dataclass(frozen=True)
class Family:
    """A model family and the targets the scenarios use on it."""

    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    """Targets by name (list form)."""
    regex: str
    """Targets by a full-match regular expression."""
    saved: list[str]
    """A ``modules_to_save`` entry (a head both libraries match identically)."""
    seq2seq: bool = False

    def base(self, seed: int = 0) -> nn.Module:
        """A fresh float64 base model, random weights from ``seed``, in eval mode."""
        torch.manual_seed(seed)
        return self.build().to(torch.float64).eval()

    def inputs(self, seed: int = 1) -> dict[str, torch.Tensor]:
        """Keyword inputs of a batch of two sequences."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (2, 7), generator=gen)
        if self.seq2seq:
            return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (2, 5), generator=gen)}
        return {"input_ids": ids}


FAMILIES = {
    f.name: f
    for f in (
        Family("llama", _llama, ["q_proj", "v_proj", "down_proj"], r".*\.(k_proj|up_proj)", ["lm_head"]),
        Family("gpt2", _gpt2, ["c_attn", "c_proj"], r".*\.mlp\.c_fc", ["lm_head"]),
        Family("t5", _t5, ["q", "v", "wo"], r".*(SelfAttention|EncDecAttention)\.(k|o)", ["lm_head"], seq2seq=True),
        Family("bert", _bert, ["query", "value", "dense"], r".*attention\.self\.(key|query)", ["classifier"]),
        Family("opt", _opt, ["q_proj", "v_proj", "fc1"], r".*self_attn\.(k_proj|out_proj)", ["lm_head"]),
    )
}


def logits(model: nn.Module, family: Family, seed: int = 1) -> torch.Tensor:
    """The model's logits on the family's batch."""
    return model(**family.inputs(seed)).logits


def peft_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's RandLoRA layers by their path in the base model."""
    layer_cls = peft.tuners.randlora.layer.RandLoraLayer
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, layer_cls)}


def add_peft(peft_model: nn.Module | None, base: nn.Module, name: str, config: dict[str, Any], **kwargs: Any) -> nn.Module:
    """``get_peft_model`` (first adapter) or ``add_adapter`` with a PEFT RandLoRA config, lambda drawn at random."""
    cfg = peft.RandLoraConfig(init_weights=False, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if peft_model is None:
            return peft.get_peft_model(base, cfg, adapter_name=name, **kwargs)
        peft_model.add_adapter(name, cfg)
        return peft_model


def randomize_gamma(peft_model: nn.Module, seed: int = 0) -> None:
    """Trained-looking gamma (PEFT starts it constant, which would hide layout errors in gamma)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "randlora_gamma" in name:
                param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=gen) * param.float().abs().mean())


def mirror(peft_model: nn.Module, base: nn.Module, configs: dict[str, dict[str, Any]], **kwargs: Any) -> RandLoraModel:
    """randlora-core adapters ``configs`` on ``base`` holding the PEFT model's bases, lambda, gamma and copies.

    Every adapter's PEFT bases must be one pair (as they are for adapters of one rank on one set of
    targets); the core model holds one shared pair.
    """
    ours: RandLoraModel | None = None
    for name, config in configs.items():
        core_config = RandLoraConfig(**config)
        if ours is None:
            ours = get_randlora_model(base, core_config, adapter_name=name, **kwargs)
        else:
            ours.add_adapter(name, core_config)
    assert ours is not None
    layers = peft_layers(peft_model)
    first = next(iter(layers.values()))
    a, b = first.randlora_A[next(iter(configs))], first.randlora_B[next(iter(configs))]
    for name in configs:
        assert torch.equal(first.randlora_A[name], a) and torch.equal(first.randlora_B[name], b), "one pair of bases"
    ours.set_shared_bases(a.float(), b.float())
    with torch.no_grad():
        for path, layer in layers.items():
            mine = ours.model.get_submodule(path)
            for name in layer.randlora_lambda:
                mine.randlora_lambda[name].copy_(layer.randlora_lambda[name])
                mine.randlora_gamma[name].copy_(layer.randlora_gamma[name])
        _copy_saved(peft_model, ours)
    return ours


def _copy_saved(peft_model: nn.Module, ours: RandLoraModel) -> None:
    wrapper_cls = peft.utils.other.ModulesToSaveWrapper
    for path, wrapper in peft_model.base_model.model.named_modules():
        if isinstance(wrapper, wrapper_cls):
            mine = ours.model.get_submodule(path)
            for name, module in wrapper.modules_to_save.items():
                mine.modules_to_save[name].load_state_dict(module.state_dict())


def pair(family: Family, seed: int = 0, **config: Any) -> tuple[nn.Module, RandLoraModel, nn.Module]:
    """``(PEFT model, core model, untouched base)`` with one adapter "default" of ``config`` (r=4, alpha 8 by default)."""
    config = {"r": 4, "randlora_alpha": 8.0, "target_modules": family.targets, **config}
    base = family.base(seed)
    peft_model = add_peft(None, copy.deepcopy(base), "default", config)
    randomize_gamma(peft_model)
    return peft_model, mirror(peft_model, copy.deepcopy(base), {"default": config}), base


def trainable_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter (lambda/gamma, ``modules_to_save`` copies, biases), keyed alike for both libraries."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = name.removeprefix("base_model.model.") if name.startswith("base_model.") else name.removeprefix("model.")
            out[key.replace(".base_layer.", ".")] = param
    return out
