"""PEFT's RandLoRA scenarios, run through PEFT and through randlora-core on the same base models.

Five tiny random-weight transformers families (Llama, GPT-2 with Conv1D layers, T5, BERT, OPT;
:mod:`parity_models`). In every scenario a PEFT RandLoRA model and a randlora-core model adapt
copies of one base model with the same config; the core model is given PEFT's bases, lambda and
gamma (or loads PEFT's saved directory), and both must agree within the spec's tolerances
(``randlora_spec.tolerances``; the models are float64, see :mod:`parity_models`): forward and gradients, merge /
unmerge / safe merge / merge_and_unload, disabled adapters, several adapters and deleting one,
save and load with and without ``save_projection``, a bfloat16 base, ``modules_to_save``, the five
targeting forms, trainable-parameter counts, status reports, base-model state dicts and SGD
trajectories.

Where randlora-core deliberately differs from PEFT the scenarios avoid the difference and
README.md (randlora-core, "PEFT parity") says why: ``modules_to_save`` names match whole path
components (PEFT's ``"norm"`` also matches ``input_layernorm``), so the heads used here are named
the same either way; ``task_type`` is bookkeeping only (PEFT's task-specific model classes add
classifier heads to ``modules_to_save``), so no scenario sets it; biases are frozen while adapters
are disabled and follow their adapter's trainability, so the scenarios that compare trainable
sets use ``bias="none"``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from parity_models import FAMILIES, Family, add_peft, logits, mirror, pair, peft_layers, randomize_gamma, trainable_values
from peft_helpers import assert_close

from randlora_core import RandLoraConfig, RandLoraModel, get_randlora_model
from randlora_peft import MachineDependentBasesWarning, load_peft_adapter

F64 = "float64"


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in trainable_values(model).items()}


def _status(model: torch.nn.Module) -> tuple:
    s = model.get_model_status()
    return s.trainable_params, s.total_params, s.num_adapter_layers, s.enabled, s.active_adapters, s.requires_grad


def test_single_adapter_lifecycle(family: Family) -> None:
    """Forward, gradients, counts, status, disable, merge / unmerge, safe merge_and_unload, base state dict."""
    theirs, ours, base = pair(family)
    y = logits(theirs, family)
    assert_close(logits(ours, family), y, F64)
    y.square().mean().backward()
    logits(ours, family).square().mean().backward()
    g_theirs, g_ours = _grads(theirs), _grads(ours)
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for key, grad in g_theirs.items():
        assert_close(g_ours[key], grad, F64)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert _status(ours) == _status(theirs)
    from peft.utils.save_and_load import get_base_model_state_dict

    expected_state = get_base_model_state_dict(theirs)
    state = ours.get_base_model_state_dict()
    assert state.keys() == expected_state.keys() and all(torch.equal(state[k], expected_state[k]) for k in state)
    with torch.no_grad():
        y_base = logits(base, family)
        with theirs.disable_adapter(), ours.disable_adapter():
            assert torch.equal(logits(theirs, family), y_base) and torch.equal(logits(ours, family), y_base)
            assert trainable_values(ours).keys() == trainable_values(theirs).keys() == set()
        theirs.merge_adapter()
        ours.merge_adapter()
        assert_close(logits(ours, family), logits(theirs, family), F64)
        for path, layer in peft_layers(theirs).items():
            assert_close(ours.model.get_submodule(path).get_base_layer().weight, layer.get_base_layer().weight, F64)
        theirs.unmerge_adapter()
        ours.unmerge_adapter()
        assert_close(logits(ours, family), y, F64)
        plain_theirs = theirs.merge_and_unload(safe_merge=True)
        plain_ours = ours.merge_and_unload(safe_merge=True)
        assert type(plain_ours) is type(plain_theirs) is type(base)
        assert_close(logits(plain_ours, family), logits(plain_theirs, family), F64)


def test_several_adapters_and_delete(family: Family) -> None:
    config = {"r": 4, "randlora_alpha": 8.0, "target_modules": family.targets}
    other = {**config, "randlora_alpha": 24.0}
    base = family.base()
    theirs = add_peft(None, copy.deepcopy(base), "default", config)
    add_peft(theirs, None, "other", other)
    randomize_gamma(theirs)
    ours = mirror(theirs, copy.deepcopy(base), {"default": config, "other": other})
    with torch.no_grad():
        for active in ("other", "default"):
            theirs.set_adapter(active)
            ours.set_adapter(active)
            assert_close(logits(ours, family), logits(theirs, family), F64)
        theirs.base_model.set_adapter(["default", "other"])
        ours.base_model.set_adapter(["default", "other"])  # PEFT's spelling works on ours too
        assert_close(logits(ours, family), logits(theirs, family), F64)
        assert trainable_values(ours).keys() == trainable_values(theirs).keys()
        assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
        theirs.delete_adapter("other")
        ours.delete_adapter("other")
        assert ours.active_adapters == theirs.active_adapters == ["default"]
        assert list(ours.peft_config) == list(theirs.peft_config)
        assert_close(logits(ours, family), logits(theirs, family), F64)
        assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load(family: Family, tmp_path: Path, save_projection: bool) -> None:
    """PEFT's save_pretrained read by randlora-peft, and core's own save_pretrained / from_pretrained."""
    theirs, ours, base = pair(family, save_projection=save_projection, modules_to_save=family.saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(str(tmp_path / "peft"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MachineDependentBasesWarning)  # save_projection=False: PEFT's own rule, here
        loaded = load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        expected = logits(theirs, family)
        assert_close(logits(loaded, family), expected, F64)
        ours.save_pretrained(tmp_path / "core")
        restored = RandLoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "core")
        assert torch.equal(logits(restored, family), logits(ours, family))
        assert_close(logits(restored, family), expected, F64)


def test_bfloat16_base(family: Family) -> None:
    """A bfloat16 base: both keep lambda/gamma in float32 (autocast_adapter_dtype) and agree within bfloat16 tolerance."""
    config = {"r": 4, "randlora_alpha": 8.0, "target_modules": family.targets}
    base = family.base().to(torch.bfloat16)
    theirs = add_peft(None, copy.deepcopy(base), "default", config)
    randomize_gamma(theirs)
    ours = mirror(theirs, copy.deepcopy(base), {"default": config})
    dtypes = {p.dtype for k, p in trainable_values(ours).items() if "randlora_" in k}
    assert dtypes == {p.dtype for k, p in trainable_values(theirs).items() if "randlora_" in k} == {torch.float32}
    y_theirs, y_ours = logits(theirs, family), logits(ours, family)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    assert_close(y_ours.float(), y_theirs.float(), "bfloat16")
    y_theirs.float().square().mean().backward()
    y_ours.float().square().mean().backward()
    for key, grad in _grads(theirs).items():
        assert_close(_grads(ours)[key], grad, "bfloat16")


def _forms(family: Family) -> dict[str, dict]:
    return {
        "list": {"target_modules": family.targets},
        "regex": {"target_modules": family.regex},
        "layers_to_transform": {"target_modules": family.targets, "layers_to_transform": [1]},
        "all-linear": {"target_modules": "all-linear"},
        "defaults": {},
    }


def test_targeting_forms_and_parameter_counts(family: Family) -> None:
    """The same modules adapted and the same trainable counts, for each form of targeting and with extras."""
    base = family.base()
    for form, targets in _forms(family).items():
        for extra in ({}, {"modules_to_save": family.saved}, {"bias": "randlora_only"}):
            config = {"r": 4, "randlora_alpha": 8.0, **targets, **extra}
            theirs = add_peft(None, copy.deepcopy(base), "default", config)
            ours = get_randlora_model(copy.deepcopy(base), RandLoraConfig(**config))
            assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names), (form, extra)
            counts = ours.get_nb_trainable_parameters(), theirs.get_nb_trainable_parameters()
            assert counts[0] == counts[1], (form, extra, counts)


def test_sgd_trajectory(family: Family) -> None:
    """Three SGD steps train the same parameters to the same values (modules_to_save copy and biases included)."""
    bias = "randlora_only" if family.name in ("gpt2", "bert", "opt") else "none"  # Llama and T5 layers have no bias
    theirs, ours, _ = pair(family, modules_to_save=family.saved, bias=bias)
    theirs.train()
    ours.train()
    losses = []
    for model in (theirs, ours):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        curve = []
        for step in range(3):
            loss = logits(model, family, seed=10 + step).float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.detach())
        losses.append(torch.stack(curve))
    assert_close(losses[1], losses[0], F64)
    after_theirs, after_ours = trainable_values(theirs), trainable_values(ours)
    assert after_ours.keys() == after_theirs.keys()
    for key, value in after_theirs.items():
        assert_close(after_ours[key], value, F64)


def test_default_target_table_is_peft_s() -> None:
    """randlora-core's per-architecture defaults (target_modules=None) are PEFT's RandLoRA table, entry for entry."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_RANDLORA_TARGET_MODULES_MAPPING as PEFT_TABLE

    from randlora_core import DEFAULT_TARGET_MODULES

    ours = {k: v if isinstance(v, str) else sorted(v) for k, v in DEFAULT_TARGET_MODULES.items()}
    assert ours == {k: v if isinstance(v, str) else sorted(v) for k, v in PEFT_TABLE.items()}


@pytest.mark.parametrize("targets", [["wo"], "all-linear"])
def test_t5_feed_forward_reads_the_wrapped_weight(targets: object) -> None:
    """Issue #14, item 1: T5's feed-forward reads ``self.wo.weight.dtype``; the wrapper passes it through, as PEFT's."""
    family = FAMILIES["t5"]
    theirs, ours, _ = pair(family, target_modules=targets)
    assert ours.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float64
    with torch.no_grad():
        assert_close(logits(ours, family), logits(theirs, family), F64)
