"""Fixtures: tiny real transformers models and PEFT adapter directories saved by real PEFT."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft_helpers import peft_model, tiny_gpt2, tiny_llama
from transformers import GPT2LMHeadModel, LlamaForCausalLM


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def make_peft_dir(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Save a real PEFT RandLoRA adapter of ``base`` (a copy) and return (directory, peft model)."""

    def make(base: torch.nn.Module, name: str = "peft", **config: object) -> tuple[Path, torch.nn.Module]:
        model = peft_model(copy.deepcopy(base), **config)
        out = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(str(out))
        return out, model

    return make
