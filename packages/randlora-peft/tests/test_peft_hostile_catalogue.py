"""Error catalogue rows ERR-260 - ERR-294 (docs/errors.md): hostile PEFT directories, sidecars, configs and CLI inputs.

Each row is a refusal: the documented exception type and message, and nothing changed on disk
(the directory tree under ``tmp_path`` is identical afterwards: no DST appears, no temporary file
is left). The inputs are hand-made hostile versions of real files: a directory our writer made
(with its sidecar ``randlora_layers.json``), one PEFT saved, and our checkpoint files.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft_helpers import peft_model, portable_checkpoint, tiny_llama
from safetensors.torch import load_file, save_file

from randlora_core.testing import model_state
from randlora_peft import lora_command, read_peft_adapter, write_peft_adapter
from randlora_peft.cli import _parser, convert
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import BasesShape
from randlora_spec.checkpoint import LayerRecord
from randlora_spec.testing import catalogue

Call = Callable[[], object]
ROWS = catalogue.Setups()
row = ROWS.row
DEEP = b"[" * 100_000 + b"]" * 100_000
BIG_JSON = b'{"pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
Setup = Callable[[Path], tuple[object, Call]]


def register(row_id: str, setup: Callable[[Path], Call]) -> None:
    """Register a setup that involves no model."""
    ROWS.row(row_id)(lambda tmp: (None, setup(tmp)))


def ours(tmp: Path, name: str = "peft", **kw: object) -> Path:
    """A PEFT directory written by our writer (with the sidecar) from a small portable checkpoint."""
    return write_peft_adapter(portable_checkpoint(**kw), tmp / name)


def edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def sidecar_edit(edit: Callable[[dict], object]) -> Callable[[Path], Call]:
    def setup(tmp: Path) -> Call:
        d = ours(tmp)
        edit_json(d / "randlora_layers.json", edit)
        return lambda: read_peft_adapter(d)

    return setup


def sidecar_text(raw: bytes) -> Callable[[Path], Call]:
    def setup(tmp: Path) -> Call:
        d = ours(tmp)
        (d / "randlora_layers.json").write_bytes(raw)
        return lambda: read_peft_adapter(d)

    return setup


def _layer_field(field: str, value: object) -> Callable[[dict], object]:
    return lambda s: s["layers"]["blk.v"].__setitem__(field, value)


register("ERR-260", sidecar_edit(_layer_field("in_features", "x")))
register("ERR-261", sidecar_edit(_layer_field("in_features", [16])))
register("ERR-262", sidecar_edit(_layer_field("in_features", 16.9)))
register("ERR-263", sidecar_text(b'{"format": "randlora-peft.layers/1", "layers": {"blk.q": {"in_features": Infinity}}}'))
register("ERR-264", sidecar_edit(_layer_field("in_features", True)))
register("ERR-265", sidecar_edit(_layer_field("out_features", 2**40)))
register("ERR-266", sidecar_edit(_layer_field("fan_in_fan_out", "yes")))
register("ERR-267", sidecar_edit(lambda s: s["bases_shape"].__setitem__("M_max", "24")))
register("ERR-268", sidecar_edit(lambda s: s["bases_shape"].__setitem__("nb_max", 5)))
register("ERR-269", sidecar_edit(lambda s: s["bases_shape"].update(M_max=2**24)))
register("ERR-271", sidecar_text(DEEP))
register("ERR-272", sidecar_text(BIG_JSON))
register("ERR-273", sidecar_edit(lambda s: s.__setitem__("save_projection", "no")))
register("ERR-274", sidecar_edit(lambda s: s.__setitem__("basis_rule", 5)))


def peft_saved(tmp: Path, **config: object) -> Path:
    """A directory saved by PEFT itself (q_proj, o_proj of the tiny Llama: 32x32)."""
    model = peft_model(tiny_llama(), target_modules=["q_proj", "o_proj"], **config)
    out = tmp / "peft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    return out


def _sidecar_layer_sizes_bomb(tmp: Path) -> Call:
    d = peft_saved(tmp, save_projection=False)
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    claim = {"in_features": 32, "out_features": 2**24, "fan_in_fan_out": False}
    sidecar = {"format": "randlora-peft.layers/1", "layers": {q: claim, o: claim}}
    (d / "randlora_layers.json").write_text(json.dumps(sidecar))
    return lambda: read_peft_adapter(d)


def _sidecar_fifo(tmp: Path) -> Call:
    d = ours(tmp)
    (d / "randlora_layers.json").unlink()
    os.mkfifo(d / "randlora_layers.json")
    return lambda: read_peft_adapter(d)


def config_text(raw: bytes) -> Callable[[Path], Call]:
    def setup(tmp: Path) -> Call:
        d = ours(tmp)
        (d / "adapter_config.json").write_bytes(raw)
        return lambda: read_peft_adapter(d)

    return setup


register("ERR-276", config_text(BIG_JSON))
register("ERR-277", config_text(DEEP))
register("ERR-278", config_text(b'{"peft_type": "RANDLORA", "r": 4, "randlora_alpha": NaN}'))


def _weights_directory(tmp: Path) -> Call:
    d = ours(tmp)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.safetensors").mkdir()
    return lambda: read_peft_adapter(d)


def _layer_shapes_float(tmp: Path) -> Call:
    d = ours(tmp)
    return lambda: read_peft_adapter(d, layer_shapes={"blk.q": (16, 16), "blk.v": (16.9, 24)})


@row("ERR-281")
def _rank_bomb(tmp: Path) -> tuple[object, Call]:
    """r = 2**21 with a lambda to match (16 MiB of file) on a real 32x32 model: PEFT's bases would take 512 MiB."""
    d = peft_saved(tmp, save_projection=False)
    r = 2**21
    tensors = {
        k: torch.zeros((r, 1)) if k.endswith("randlora_lambda") else torch.zeros((1, 32))
        for k in load_file(str(d / "adapter_model.safetensors"))
    }
    save_file(tensors, str(d / "adapter_model.safetensors"))
    edit_json(d / "adapter_config.json", lambda c: c.__setitem__("r", r))
    model = tiny_llama()
    return model, lambda: read_peft_adapter(d, model=model)


def claimed_layer_checkpoint(tmp: Path) -> Path:
    """Our checkpoint without bases whose layer record claims 16 -> 2**24 columns (a few hundred bytes)."""
    ckpt = portable_checkpoint(save_projection=False)
    ckpt.layers = {"blk.q": LayerRecord(16, 16), "blk.v": LayerRecord(16, 2**24)}
    ckpt.bases_shape = BasesShape(r=4, m_max=16, M_max=2**24, nb_max=4)
    path = tmp / "claims.safetensors"
    spec_ckpt.save(path, ckpt)
    return path


def cli(argv: list[str]) -> Call:
    args = _parser().parse_args(["convert", *argv])
    return lambda: convert(args)


def to_lora(argv: list[str]) -> Call:
    args = _parser().parse_args(["to-lora", *argv, "--rank", "2"])
    return lambda: lora_command.run(args)


def _window_bomb(tmp: Path) -> Call:
    src = claimed_layer_checkpoint(tmp)
    return cli([str(src), str(tmp / "out")])


def _config_fifo(tmp: Path) -> Call:
    d = ours(tmp)
    (d / "adapter_config.json").unlink()
    os.mkfifo(d / "adapter_config.json")
    return lambda: read_peft_adapter(d)


def _layer_shapes_fifo(tmp: Path) -> Call:
    d = ours(tmp)
    os.mkfifo(tmp / "shapes.json")
    return cli([str(d), str(tmp / "out.safetensors"), "--layer-shapes", str(tmp / "shapes.json")])


def _auto_mapping_not_strings(tmp: Path) -> Call:
    d = ours(tmp)
    edit_json(d / "adapter_config.json", lambda c: c.__setitem__("auto_mapping", {"base_model_class": 5}))
    return cli([str(d), str(tmp / "out.safetensors")])


def layer_shapes_file(raw: bytes) -> Callable[[Path], Call]:
    def setup(tmp: Path) -> Call:
        d = ours(tmp)
        (tmp / "shapes.json").write_bytes(raw)
        return cli([str(d), str(tmp / "out.safetensors"), "--layer-shapes", str(tmp / "shapes.json")])

    return setup


register("ERR-286", layer_shapes_file(b'{"blk.q": ["x", 16], "blk.v": [16, 24]}'))
register("ERR-287", layer_shapes_file(DEEP))
register("ERR-288", layer_shapes_file(BIG_JSON))
register("ERR-289", lambda tmp: cli([str(ours(tmp) / "adapter_model.safetensors"), str(tmp / "out")]))
register("ERR-290", lambda tmp: cli([str(ours(tmp)), str(tmp / "out"), "--to-peft"]))


register("ERR-293", lambda tmp: to_lora([str(ours(tmp) / "adapter_model.safetensors"), str(tmp / "out")]))


def _to_lora_fifo(tmp: Path) -> Call:
    os.mkfifo(tmp / "adapter.safetensors")
    return to_lora([str(tmp / "adapter.safetensors"), str(tmp / "out")])


def _dst_exists(tmp: Path) -> Call:
    d = ours(tmp)
    (tmp / "out.safetensors").write_bytes(b"keep me")
    return cli([str(d), str(tmp / "out.safetensors")])


def _many_names_time_bomb(tmp: Path) -> Call:
    """200,000 modules_to_save names and 2,000 deep keys: refused in linear time (was names x keys x depth)."""
    d = ours(tmp)
    edit_json(d / "adapter_config.json", lambda c: c.__setitem__("modules_to_save", [f"m{i}" for i in range(200_000)]))
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors.update({f"base_model.model.a.b.c.d.e.f.g{i}.weight": torch.zeros(1) for i in range(2_000)})
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return lambda: read_peft_adapter(d)


BOMBS = {
    "sidecar bases_shape of 1 GiB": ("ERR-269", 1_073_742_080),
    "sidecar layer sizes: 2 GiB of PEFT bases": ("ERR-270", 2_147_484_160),
    "r = 2**21 on a real model: 512 MiB": ("ERR-281", 536_870_912),
    "our file's layer record: 1 GiB of PEFT bases": ("ERR-282", 1_073_742_080),
}
"""The memory bombs among the rows (row, bytes the input asks for), run under RLIMIT_AS by test_peft_hostile."""
TIME_BOMB = "ERR-292"
"""The row whose input cost names x keys x depth before (run under a timeout by test_peft_hostile)."""


for _row_id, _setup in {
    "ERR-270": _sidecar_layer_sizes_bomb,
    "ERR-275": _sidecar_fifo,
    "ERR-279": _weights_directory,
    "ERR-280": _layer_shapes_float,
    "ERR-282": _window_bomb,
    "ERR-283": _config_fifo,
    "ERR-284": _layer_shapes_fifo,
    "ERR-285": _auto_mapping_not_strings,
    "ERR-291": _dst_exists,
    "ERR-292": _many_names_time_bomb,
    "ERR-294": _to_lora_fifo,
}.items():
    register(_row_id, _setup)


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path) -> None:
    model, call = ROWS[row_id](tmp_path)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)


def test_rows_cover_every_registered_refusal() -> None:
    assert sorted(ROWS) == [f"ERR-{n}" for n in range(260, 295)]
