"""The randlora-peft command line, and the size acceptance test (8 targeted 512x512 layers, r = 32)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from peft_helpers import assert_close, peft, peft_model, tokens
from transformers import LlamaConfig, LlamaForCausalLM

from randlora_core import load_adapter
from randlora_peft.cli import main
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PEFT_RULE

SIZE_LINE = re.compile(r"^(before|after):\s+([\d,]+) bytes", re.MULTILINE)


def _sizes(text: str) -> dict[str, int]:
    return {k: int(v.replace(",", "")) for k, v in SIZE_LINE.findall(text)}


def _header_bytes(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[LlamaForCausalLM, Path, torch.nn.Module, Path]:
    """Llama with hidden 512, 2 layers: q/k/v/o are 8 square 512x512 layers; PEFT RandLoRA r = 32 on them."""
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=512,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=16,
    )
    base = LlamaForCausalLM(cfg).eval()
    pm = peft_model(copy.deepcopy(base), r=32, randlora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(root / "peft"))
    cfg.save_pretrained(str(root / "config"))
    return base, root / "peft", pm, root / "config"


@pytest.mark.parametrize("compact", [True, False])
def test_acceptance_8_square_layers_r32(wide, tmp_path, capsys, compact):
    base, peft_dir, pm, _ = wide
    peft_bytes = (peft_dir / "adapter_model.safetensors").stat().st_size
    assert 10_000_000 < peft_bytes < 10_600_000  # PEFT: about 10.3 MB
    out = tmp_path / "adapter.safetensors"
    argv = ["convert", str(peft_dir), str(out)] + ([] if compact else ["--no-compact-bases"])
    assert main(argv) == 0
    printed = capsys.readouterr().out
    sizes = _sizes(printed)
    assert sizes["after"] == out.stat().st_size
    assert sizes["before"] >= peft_bytes  # the PEFT directory: weights and config
    assert "ratio:" in printed and "x smaller" in printed
    ckpt = spec_ckpt.load(out)
    assert ckpt.config.basis_rule == PEFT_RULE and len(ckpt.layers) == 8
    trainable = sum(t.nbytes for t in ckpt.tensors.values())
    assert trainable == 69_632 * 4
    budget = spec_ckpt.checkpoint_bytes_budget(ckpt)  # trainable bytes + one float32 copy of A and B
    assert out.stat().st_size <= 1.02 * budget + _header_bytes(out)
    assert peft_bytes / out.stat().st_size >= (7.0 if not compact else 12.0)
    core = load_adapter(copy.deepcopy(base), out)
    x = tokens(length=5)
    with torch.no_grad():
        assert_close(core(x).logits, pm(x).logits)


def test_convert_with_base_model_config_and_back_to_peft(wide, tmp_path, capsys):
    base, peft_dir, pm, config_dir = wide
    ours = tmp_path / "ours.safetensors"
    assert main(["convert", str(peft_dir), str(ours), "--to-randlora", "--base-model", str(config_dir)]) == 0
    capsys.readouterr()
    back = tmp_path / "back"
    assert main(["convert", str(ours), str(back), "--task-type", "CAUSAL_LM"]) == 0  # direction inferred: ours -> PEFT
    printed = capsys.readouterr().out
    assert "-> PEFT adapter" in printed and _sizes(printed)["before"] == ours.stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(back))
    assert isinstance(pm2, peft.PeftModelForCausalLM)
    x = tokens(length=5)
    with torch.no_grad():
        assert_close(pm2(x).logits, pm(x).logits)


def test_layer_shapes_file_and_errors(llama, make_peft_dir, tmp_path, capsys):
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "a.safetensors"
    assert main(["convert", str(peft_dir), str(out)]) == 1  # v_proj is not square: shapes needed
    assert "--base-model" in capsys.readouterr().err
    shapes = tmp_path / "shapes.json"
    shapes.write_text(
        json.dumps({"model.layers.0.self_attn.q_proj": [32, 32], "model.layers.0.self_attn.v_proj": [32, 16, False]})
    )
    assert main(["convert", str(peft_dir), str(out), "--layer-shapes", str(shapes)]) == 0
    capsys.readouterr()
    assert main(["convert", str(peft_dir), str(out), "--layer-shapes", str(shapes)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(peft_dir), str(tmp_path / "b.safetensors"), "--to-peft"]) == 1
    assert "needs a randlora checkpoint file" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "c")]) == 1
    assert main(["convert", str(tmp_path), str(tmp_path / "d.safetensors")]) == 1
    assert "not a PEFT adapter directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(peft_dir)])
    assert exc.value.code == 2


def test_save_projection_false_conversion_warns_on_stderr(llama, make_peft_dir, tmp_path, capsys):
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj", "o_proj"], save_projection=False)
    assert main(["convert", str(peft_dir), str(tmp_path / "x.safetensors"), "--no-regenerate"]) == 1
    assert "save_projection=False" in capsys.readouterr().err
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps({f"model.layers.0.self_attn.{n}": [32, 32] for n in ("q_proj", "o_proj")}))
    assert main(["convert", str(peft_dir), str(tmp_path / "x.safetensors"), "--layer-shapes", str(shapes)]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "machine" in captured.err
    assert "x larger" in captured.out  # PEFT stored no bases; ours does


def test_console_script_is_registered_and_runs_as_a_module(llama, make_peft_dir, tmp_path):
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("randlora-peft") == "randlora_peft.cli:main"
    peft_dir, _ = make_peft_dir(llama, target_modules=["q_proj", "o_proj"])
    out = tmp_path / "a.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "randlora_peft", "convert", str(peft_dir), str(out)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert _sizes(done.stdout)["after"] == out.stat().st_size
    assert "bitsandbytes" not in done.stderr and "kernels" not in done.stderr
