"""RandLoRA -> LoRA export (randlora_peft.lora_export): PEFT loads the directory; the SVD report is exact.

Also the error rows ERR-340 - ERR-345 of docs/errors.md.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft_helpers import LLAMA_TARGETS, assert_close, peft, peft_model, tiny_gpt2, tiny_llama, tokens

from randlora_core import RandLoraConfig, get_randlora_model
from randlora_core.testing import model_state
from randlora_peft.lora_export import LORA_CONFIG_FILE, convert_to_lora, delta_weights, read_adapter, save_as_lora
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.testing import catalogue


def _peft_delta(peft_lora: torch.nn.Module, path: str) -> torch.Tensor:
    """delta-W (out, in) of PEFT's LoRA layer at ``path``."""
    layer = peft_lora.base_model.model.get_submodule(path)
    delta = layer.get_delta_weight("default")
    return delta.T if layer.fan_in_fan_out else delta


def _load_lora(base: torch.nn.Module, directory: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory))


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """(base, PEFT RandLoRA model, its saved directory) for a two-layer Llama."""
    base = tiny_llama(layers=2)
    model = peft_model(copy.deepcopy(base), target_modules=LLAMA_TARGETS)
    with torch.no_grad():  # trained-looking gamma: with PEFT's constant init delta-W has rank r only
        for name, param in model.named_parameters():
            if "randlora_gamma" in name:
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    directory = tmp_path_factory.mktemp("randlora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(directory))
    return base, model, directory


@pytest.mark.parametrize("rank", [4, 16])
def test_exported_lora_loads_in_peft_with_the_reported_error(llama_source, tmp_path: Path, rank: int, record_property) -> None:
    base, _, source = llama_source
    export = save_as_lora(source, tmp_path / "lora", rank=rank, base_model=base)
    lora = _load_lora(base, tmp_path / "lora")
    assert isinstance(lora.peft_config["default"], peft.LoraConfig) and lora.peft_config["default"].r == rank
    deltas = {path: delta for path, _, delta in delta_weights(read_adapter(source, base))}
    residual = total = 0.0
    for report in export.layers:
        delta = deltas[report.path]
        error = float(torch.linalg.norm(delta - _peft_delta(lora, report.path)) / torch.linalg.norm(delta))
        assert abs(error - report.relative_error) <= 1e-4 + 1e-3 * report.relative_error, report
        assert report.rank == min(rank, report.in_features, report.out_features)
        residual += float(torch.linalg.norm(delta - _peft_delta(lora, report.path))) ** 2
        total += float(torch.linalg.norm(delta)) ** 2
    assert abs((residual / total) ** 0.5 - export.relative_error) <= 1e-4
    record_property("relative_frobenius_error", export.relative_error)
    print(f"\nrank {rank}: relative Frobenius error of delta-W {export.relative_error:.4f}, energy {export.captured_energy:.4f}")


def test_full_rank_export_reproduces_the_adapter_and_lower_ranks_lose_more(llama_source, tmp_path: Path) -> None:
    base, randlora, source = llama_source
    errors = {rank: convert_to_lora(read_adapter(source, base), rank).relative_error for rank in (2, 8, 32)}
    assert errors[2] > errors[8] > errors[32] < 1e-5  # 32 is every layer's full rank (min side 16 or 32)
    save_as_lora(source, tmp_path / "full", rank=64, base_model=base)
    lora = _load_lora(base, tmp_path / "full")
    with torch.no_grad():
        assert_close(lora(tokens()).logits, randlora(tokens()).logits)
    config = json.loads((tmp_path / "full" / LORA_CONFIG_FILE).read_text())
    assert config["r"] == 64 and config["rank_pattern"]["model.layers.0.self_attn.v_proj"] == 16  # each layer at its full rank
    energy = convert_to_lora(read_adapter(source, base), 0.9)
    assert all(r.captured_energy >= 0.9 for r in energy.layers)


def test_matches_peft_convert_to_lora(llama_source) -> None:
    """For an integer rank our factors' product equals PEFT's own convert_to_lora on the PEFT model."""
    base, randlora, source = llama_source
    from peft.tuners.lora.conversion import convert_to_lora as peft_convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, theirs = peft_convert(randlora, rank=8)
    ours = convert_to_lora(read_adapter(source, base), 8).tensors
    assert ours.keys() == theirs.keys()  # PEFT's key layout
    for key in (k for k in ours if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        assert_close(ours[b_key] @ ours[key], theirs[b_key] @ theirs[key])


def test_gpt2_conv1d_and_core_model_source(tmp_path: Path) -> None:
    base = tiny_gpt2()
    core = get_randlora_model(copy.deepcopy(base), RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["c_attn", "c_proj"]))
    with torch.no_grad():
        for name, param in core.named_parameters():
            if "randlora_lambda" in name:
                param.normal_()
    export = save_as_lora(core, tmp_path / "lora", rank=96)  # full rank everywhere
    assert export.relative_error < 1e-5
    lora = _load_lora(base, tmp_path / "lora")
    assert lora.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        assert_close(lora(tokens()).logits, core(tokens()).logits)


# -- error rows -----------------------------------------------------------------------------------

ROWS = catalogue.Setups()
row = ROWS.row


def _core(**kw: object):
    torch.manual_seed(0)
    return get_randlora_model(tiny_llama(), RandLoraConfig(r=4, target_modules=["q_proj"], **kw))


@row("ERR-340")
def _bad_rank(tmp: Path):
    model = _core()
    return model, lambda: save_as_lora(model, tmp / "out", rank=0)


@row("ERR-341")
def _bad_energy(tmp: Path):
    model = _core()
    return model, lambda: save_as_lora(model, tmp / "out", rank=1.5)


@row("ERR-342")
def _bias_adapter(tmp: Path):
    model = _core(bias="all")
    return model, lambda: save_as_lora(model, tmp / "out", rank=4)


@row("ERR-343")
def _destination_taken(tmp: Path):
    (tmp / "out").mkdir()
    (tmp / "out" / LORA_CONFIG_FILE).write_text("{}")
    model = _core()
    return model, lambda: save_as_lora(model, tmp / "out", rank=4)


@row("ERR-344")
def _destination_file(tmp: Path):
    (tmp / "out").write_text("x")
    model = _core()
    return model, lambda: save_as_lora(model, tmp / "out", rank=4)


@row("ERR-345")
def _not_an_adapter(tmp: Path):
    model = tiny_llama()
    return model, lambda: save_as_lora(model, tmp / "out", rank=4)


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path) -> None:
    model, call = ROWS[row_id](tmp_path)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)


def test_to_lora_command(llama_source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``randlora-peft to-lora SRC DST --rank R`` on a randlora checkpoint file; PEFT loads the result."""
    from randlora_peft.cli import main

    base, _, source = llama_source
    checkpoint = tmp_path / "adapter.safetensors"
    spec_ckpt.save(checkpoint, read_adapter(source, base))
    assert main(["to-lora", str(checkpoint), str(tmp_path / "lora"), "--rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "total: 10 layers" in out and "relative Frobenius error of delta-W" in out
    expected = convert_to_lora(read_adapter(checkpoint), 8).relative_error
    assert f"{expected:.4f}" in out.splitlines()[-1]
    assert isinstance(_load_lora(base, tmp_path / "lora").peft_config["default"], peft.LoraConfig)
    assert main(["to-lora", str(checkpoint), str(tmp_path / "lora"), "--rank", "8"]) == 1  # exists: refused
    assert "already holds" in capsys.readouterr().err
    assert main(["to-lora", str(checkpoint), str(tmp_path / "lora"), "--rank", "0.95", "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["to-lora", str(checkpoint), str(tmp_path / "x"), "--rank", "many"])
    assert exit_info.value.code == 2
