"""Error catalogue rows for randlora-core (docs/errors.md): every bad input raises the documented error.

Each ``@row("ERR-NNN")`` function builds a model and files under ``tmp_path`` and returns the model
and the failing call. The test runs the call, checks the exception against the row of
docs/errors.md (type and message) and asserts that the model (every parameter and buffer bit for
bit, requires_grad, module tree, adapters) and the files (bytes and directory listing) are
exactly as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Block, adapted_block, seeded_block
from torch import nn

from randlora_core import (
    RandLoraConfig,
    RandLoraModel,
    get_randlora_model,
    load_adapter,
    register_layer_wrapper,
    save_adapter,
)
from randlora_core.compute import compute_override
from randlora_core.testing import model_state
from randlora_spec.safetensors_io import decode, encode
from randlora_spec.testing import catalogue

ROWS = catalogue.Setups()
row = ROWS.row


def cfg(**kw: object) -> RandLoraConfig:
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    kw.setdefault("save_projection", True)  # rows about stored bases; the config default is not to store them
    return RandLoraConfig(**kw)


def fresh(**kw: object) -> RandLoraModel:
    return adapted_block(cfg(**kw))


plain = seeded_block


_BLOBS: dict[str, bytes] = {}


def valid_blob(**kw: object) -> bytes:
    """Bytes of a valid checkpoint of ``fresh(**kw)`` (cached)."""
    key = repr(sorted(kw.items()))
    if key not in _BLOBS:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "a.safetensors"
            fresh(**kw).save_adapter(path)
            _BLOBS[key] = path.read_bytes()
    return _BLOBS[key]


def rewrite(blob: bytes, meta: dict[str, str] | None = None, tensors: dict[str, np.ndarray | None] | None = None) -> bytes:
    """Re-encode ``blob`` with metadata entries / tensors replaced (``None`` removes a tensor); no validation."""
    have, metadata = decode(blob)
    metadata.update(meta or {})
    for key, value in (tensors or {}).items():
        if value is None:
            del have[key]
        else:
            have[key] = value
    return encode(have, metadata)


def edit_meta_json(blob: bytes, key: str, fn: Callable[[dict], object]) -> bytes:
    _, metadata = decode(blob)
    value = json.loads(metadata[key])
    value = fn(value) or value
    return rewrite(blob, meta={key: json.dumps(value, separators=(",", ":"))})


def write(tmp: Path, data: bytes, name: str = "adapter.safetensors") -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def load_into_plain(data: bytes) -> catalogue.Setup:
    def setup(tmp: Path) -> tuple[nn.Module, Callable[[], object]]:
        path = write(tmp, data)
        model = plain()
        return model, lambda: load_adapter(model, path)

    return setup


# -- model construction and targeting -------------------------------------------------------------


@row("ERR-030")
def _no_targets(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, RandLoraConfig(r=4))


@row("ERR-031")
def _targets_match_nothing(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, cfg(target_modules=["nope"]))


@row("ERR-032")
def _targets_non_linear(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, cfg(target_modules=["q_proj", "norm"]))


@row("ERR-033")
def _targets_bad_regex(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, cfg(target_modules=r"(q_proj"))


@row("ERR-034")
def _config_not_a_config(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, {"r": 4, "target_modules": ["q_proj"]})  # type: ignore[arg-type]


@row("ERR-035")
def _already_wrapped(tmp: Path):
    model = fresh()
    return model, lambda: get_randlora_model(model, cfg())


@row("ERR-036")
def _unknown_modules_to_save(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, cfg(modules_to_save=["head"]))


@row("ERR-037")
def _rule_not_generatable(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, cfg(basis_rule="peft-torch-v1"))


@row("ERR-038")
def _exclude_bad_regex(tmp: Path):
    model = plain()
    return model, lambda: get_randlora_model(model, cfg(exclude_modules="[o"))


# -- adding adapters ------------------------------------------------------------------------------


@row("ERR-040")
def _name_taken(tmp: Path):
    model = fresh()
    return model, lambda: model.add_adapter("default", cfg(target_modules=["v_proj"]))


@row("ERR-041")
def _bad_name(tmp: Path):
    model = fresh()
    return model, lambda: model.add_adapter("a.b", cfg(target_modules=["v_proj"]))


@row("ERR-042")
def _different_seed(tmp: Path):
    model = fresh()
    return model, lambda: model.add_adapter("b", cfg(target_modules=["v_proj"], projection_prng_key=9))


@row("ERR-043")
def _different_save_projection(tmp: Path):
    model = fresh()
    return model, lambda: model.add_adapter("b", cfg(target_modules=["v_proj"], save_projection=False))


@row("ERR-044")
def _different_sparsity(tmp: Path):
    model = fresh()
    return model, lambda: model.add_adapter("b", cfg(target_modules=["v_proj"], sparse=True))


@row("ERR-045")
def _bases_cannot_grow(tmp: Path):
    model = fresh(target_modules=["q_proj"])
    bases = model.randlora_bases
    model.set_shared_bases(bases.randlora_A.clone(), bases.randlora_B.clone(), regenerable=False)
    return model, lambda: model.add_adapter("b", cfg(r=2, target_modules=["q_proj"]))


@row("ERR-046")
def _very_sparse_m_max_changes(tmp: Path):
    model = fresh(target_modules=["q_proj"], very_sparse=True)
    wide = nn.Linear(40, 40)
    model.model.add_module("wide", wide)
    return model, lambda: model.add_adapter("b", cfg(target_modules=["wide"], very_sparse=True))


@row("ERR-047")
def _set_bases_too_small(tmp: Path):
    model = fresh()
    return model, lambda: model.set_shared_bases(torch.zeros(4, 1, 8), torch.zeros(24, 4, 4))


@row("ERR-048")
def _set_bases_not_3d(tmp: Path):
    model = fresh()
    return model, lambda: model.set_shared_bases(torch.zeros(4, 16), torch.zeros(24, 4, 4))


# -- adapter selection and merging ----------------------------------------------------------------


@row("ERR-050")
def _set_unknown(tmp: Path):
    model = fresh()
    return model, lambda: model.set_adapter(["default", "ghost"])


@row("ERR-051")
def _delete_unknown(tmp: Path):
    model = fresh()
    return model, lambda: model.delete_adapter("ghost")


@row("ERR-052")
def _merge_unknown(tmp: Path):
    model = fresh()
    return model, lambda: model.merge_adapter("ghost")


@row("ERR-053")
def _merge_twice(tmp: Path):
    model = fresh()
    model.merge_adapter()
    return model, lambda: model.merge_adapter()


@row("ERR-054")
def _unmerge_nothing(tmp: Path):
    model = fresh()
    return model, lambda: model.unmerge_adapter()


@row("ERR-055")
def _delete_merged(tmp: Path):
    model = fresh()
    model.merge_adapter()
    return model, lambda: model.delete_adapter("default")


@row("ERR-056")
def _disable_merged(tmp: Path):
    model = fresh()
    model.merge_adapter()
    return model, lambda: model.disable_adapter().__enter__()


@row("ERR-057")
def _merge_none_active(tmp: Path):
    model = fresh()
    model.set_adapter([])
    return model, lambda: model.merge_adapter()


@row("ERR-058")
def _safe_merge_nan(tmp: Path):
    model = fresh()
    with torch.no_grad():
        model.model.o_proj.randlora_lambda["default"][0, 0] = math.nan
    return model, lambda: model.merge_adapter(safe_merge=True)


@row("ERR-059")
def _safe_merge_inf(tmp: Path):
    model = fresh()
    with torch.no_grad():
        model.model.q_proj.randlora_gamma["default"][1, 2] = math.inf
    return model, lambda: model.merge_and_unload(safe_merge=True)


# -- forward --------------------------------------------------------------------------------------


@row("ERR-060")
def _wrong_last_dim(tmp: Path):
    model = fresh()
    return model, lambda: model.model.q_proj(torch.randn(2, 5))


@row("ERR-061")
def _integer_input(tmp: Path):
    model = fresh()
    return model, lambda: model.model.q_proj(torch.ones(2, 16, dtype=torch.int64))


@row("ERR-062")
def _complex_input(tmp: Path):
    model = fresh()
    return model, lambda: model.model.q_proj(torch.ones(2, 16, dtype=torch.complex64))


# -- saving ---------------------------------------------------------------------------------------


@row("ERR-065")
def _save_unknown(tmp: Path):
    model = fresh()
    return model, lambda: model.save_adapter(tmp / "x.safetensors", "ghost")


@row("ERR-066")
def _save_none_active(tmp: Path):
    model = fresh()
    model.set_adapter([])
    return model, lambda: save_adapter(model, tmp / "x.safetensors")


@row("ERR-067")
def _save_nan(tmp: Path):
    model = fresh()
    path = tmp / "adapter.safetensors"
    model.save_adapter(path)  # the previous checkpoint must survive the failed save
    with torch.no_grad():
        model.model.q_proj.randlora_gamma["default"][0, 0] = math.nan
    return model, lambda: model.save_adapter(path)


@row("ERR-068")
def _save_missing_dir(tmp: Path):
    model = fresh()
    return model, lambda: model.save_adapter(tmp / "missing" / "a.safetensors")


@row("ERR-069")
def _save_onto_directory(tmp: Path):
    model = fresh()
    (tmp / "adapter.safetensors").mkdir()
    return model, lambda: model.save_adapter(tmp / "adapter.safetensors")


# -- runtime knobs --------------------------------------------------------------------------------


@row("ERR-063")
def _compute_override(tmp: Path):
    model = fresh()

    def call() -> None:
        with compute_override("fast"):  # type: ignore[arg-type]
            model(torch.randn(2, 16))

    return model, call


@row("ERR-064")
def _register_bad_wrapper(tmp: Path):
    return None, lambda: register_layer_wrapper(nn.Linear, object)  # type: ignore[arg-type]


# -- checkpoint files: container ------------------------------------------------------------------


@row("ERR-070")
def _missing_file(tmp: Path):
    model = plain()
    return model, lambda: load_adapter(model, tmp / "nope.safetensors")


ROWS["ERR-071"] = load_into_plain(b"")  # empty file


@row("ERR-072")
def _truncated_data(tmp: Path):
    return load_into_plain(valid_blob()[:-100])(tmp)


@row("ERR-073")
def _truncated_header(tmp: Path):
    blob = valid_blob()
    return load_into_plain(blob[:200])(tmp)


@row("ERR-074")
def _bit_flip_header(tmp: Path):
    blob = bytearray(valid_blob())
    blob[8] ^= 0x40  # the header's opening '{' becomes ';'
    return load_into_plain(bytes(blob))(tmp)


@row("ERR-075")
def _bit_flip_to_nan(tmp: Path):
    blob = bytearray(valid_blob())
    # The last tensor in the data buffer ends the file; set its last float32's exponent bits.
    blob[-1] |= 0x7F
    blob[-2] |= 0x80
    return load_into_plain(bytes(blob))(tmp)


@row("ERR-076")
def _pickle_file(tmp: Path):
    path = tmp / "adapter.bin"
    torch.save({"w": torch.zeros(2)}, path)  # what torch.save / PEFT's adapter_model.bin look like (zip + pickle)
    model = plain()
    return model, lambda: load_adapter(model, path)


ROWS["ERR-077"] = load_into_plain((2**40).to_bytes(8, "little") + b"{}")  # oversized header length


@row("ERR-078")
def _header_not_json(tmp: Path):
    text = b'{"a": '
    return load_into_plain(len(text).to_bytes(8, "little") + text)(tmp)


@row("ERR-079")
def _header_not_object(tmp: Path):
    text = b"[1, 2, 3]"
    return load_into_plain(len(text).to_bytes(8, "little") + text)(tmp)


@row("ERR-080")
def _offsets_overlap(tmp: Path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    text = json.dumps(header).encode()
    return load_into_plain(len(text).to_bytes(8, "little") + text + bytes(12))(tmp)


@row("ERR-081")
def _trailing_bytes(tmp: Path):
    return load_into_plain(valid_blob() + b"\0" * 8)(tmp)


@row("ERR-082")
def _unknown_container_dtype(tmp: Path):
    header = {"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    text = json.dumps(header).encode()
    return load_into_plain(len(text).to_bytes(8, "little") + text + bytes(2))(tmp)


# -- checkpoint files: metadata -------------------------------------------------------------------


@row("ERR-085")
def _plain_safetensors(tmp: Path):
    return load_into_plain(encode({"lora_A": np.zeros((2, 2), np.float32)}, {"format": "pt"}))(tmp)


@row("ERR-086")
def _wrong_format_id(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), meta={"format": "peft.adapter"}))(tmp)


@row("ERR-087")
def _wrong_format_version(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), meta={"format_version": "2"}))(tmp)


@row("ERR-088")
def _unknown_spec_version(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), meta={"spec_version": "2.0"}))(tmp)


@row("ERR-089")
def _unknown_basis_rule(tmp: Path):
    blob = valid_blob(save_projection=False)
    config = json.loads(decode(blob)[1]["config"])
    config["basis_rule"] = "acme-xorshift-v3"
    meta = {"config": json.dumps(config), "basis_rule": "acme-xorshift-v3"}
    return load_into_plain(rewrite(blob, meta=meta))(tmp)


@row("ERR-090")
def _rule_disagrees(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), meta={"basis_rule": "peft-torch-v1"}))(tmp)


@row("ERR-091")
def _invalid_embedded_config(tmp: Path):
    return load_into_plain(edit_meta_json(valid_blob(), "config", lambda c: c.update(randlora_dropout=1.5)))(tmp)


@row("ERR-092")
def _bad_adapter_name(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), meta={"adapter_name": "a.b"}))(tmp)


@row("ERR-093")
def _layers_record_malformed(tmp: Path):
    return load_into_plain(edit_meta_json(valid_blob(), "layers", lambda v: v["q_proj"].update(fan_in_fan_out="no")))(tmp)


@row("ERR-094")
def _bases_shape_inconsistent(tmp: Path):
    return load_into_plain(edit_meta_json(valid_blob(), "bases_shape", lambda v: v.update(nb_max=v["nb_max"] + 1)))(tmp)


@row("ERR-095")
def _metadata_too_large(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), meta={"extra": " " * (4 * 1024 * 1024 + 1)}))(tmp)


@row("ERR-096")
def _missing_metadata(tmp: Path):
    have, meta = decode(valid_blob())
    del meta["bases_shape"]
    return load_into_plain(encode(have, meta))(tmp)


# -- checkpoint files: tensors --------------------------------------------------------------------


@row("ERR-100")
def _missing_tensor(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), tensors={"o_proj.randlora_gamma": None}))(tmp)


@row("ERR-101")
def _extra_tensor(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), tensors={"k_proj.randlora_lambda": np.zeros((4, 4), np.float32)}))(tmp)


@row("ERR-102")
def _wrong_shape(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), tensors={"q_proj.randlora_lambda": np.zeros((4, 5), np.float32)}))(tmp)


@row("ERR-103")
def _wrong_dtype(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), tensors={"q_proj.randlora_lambda": np.zeros((4, 4), np.int32)}))(tmp)


@row("ERR-104")
def _nan_value(tmp: Path):
    gamma = decode(valid_blob())[0]["o_proj.randlora_gamma"].copy()
    gamma[0, 0] = np.nan
    return load_into_plain(rewrite(valid_blob(), tensors={"o_proj.randlora_gamma": gamma}))(tmp)


@row("ERR-105")
def _bases_absent_but_required(tmp: Path):
    return load_into_plain(rewrite(valid_blob(), meta={"bases": "absent"}, tensors={"randlora_A": None, "randlora_B": None}))(tmp)


@row("ERR-106")
def _bases_wrong_shape(tmp: Path):
    have = decode(valid_blob())[0]
    return load_into_plain(rewrite(valid_blob(), tensors={"randlora_A": have["randlora_A"][:, :, :-1].copy()}))(tmp)


@row("ERR-107")
def _bases_wrong_dtype(tmp: Path):
    have = decode(valid_blob())[0]
    return load_into_plain(rewrite(valid_blob(), tensors={"randlora_B": have["randlora_B"].astype(np.float16)}))(tmp)


@row("ERR-108")
def _bias_wrong_shape(tmp: Path):
    blob = valid_blob(bias="randlora_only")
    return load_into_plain(rewrite(blob, tensors={"q_proj.bias": np.zeros(7, np.float32)}))(tmp)


# -- checkpoint files: fit to the model -----------------------------------------------------------


@row("ERR-110")
def _layer_sizes_differ(tmp: Path):
    path = write(tmp, valid_blob())
    torch.manual_seed(0)
    model = Block(hidden=32)
    return model, lambda: load_adapter(model, path)


@row("ERR-111")
def _layer_missing(tmp: Path):
    path = write(tmp, valid_blob())
    model = nn.Sequential(nn.Linear(16, 24))
    return model, lambda: load_adapter(model, path)


@row("ERR-112")
def _layer_not_adaptable(tmp: Path):
    path = write(tmp, valid_blob())
    model = plain()
    model.o_proj = nn.Bilinear(24, 24, 16)  # type: ignore[assignment]
    return model, lambda: load_adapter(model, path)


@row("ERR-113")
def _layout_differs(tmp: Path):
    return load_into_plain(edit_meta_json(valid_blob(), "layers", lambda v: v["q_proj"].update(fan_in_fan_out=True)))(tmp)


@row("ERR-114")
def _bias_missing_in_model(tmp: Path):
    blob = valid_blob(bias="randlora_only", target_modules=["q_proj", "o_proj"])
    path = write(tmp, blob)
    model = plain()
    model.q_proj.bias = None  # type: ignore[assignment]
    return model, lambda: load_adapter(model, path)


@row("ERR-115")
def _load_different_seed(tmp: Path):
    path = write(tmp, valid_blob(projection_prng_key=7))
    model = fresh()
    return model, lambda: load_adapter(model, path, "other")


@row("ERR-116")
def _load_different_save_projection(tmp: Path):
    path = write(tmp, valid_blob(save_projection=False))
    model = fresh()
    return model, lambda: load_adapter(model, path, "other")


@row("ERR-117")
def _load_bases_differ(tmp: Path):
    blob = valid_blob()
    a = decode(blob)[0]["randlora_A"].copy()
    a[0, 0, 0] += 1.0  # finite, well-formed, but not the model's bases
    path = write(tmp, rewrite(blob, tensors={"randlora_A": a}))
    model = fresh()
    return model, lambda: load_adapter(model, path, "other")


@row("ERR-118")
def _load_does_not_fit_bases(tmp: Path):
    path = write(tmp, valid_blob(r=2, target_modules=["q_proj"]))
    model = fresh(target_modules=["q_proj"])
    bases = model.randlora_bases
    model.set_shared_bases(bases.randlora_A.clone(), bases.randlora_B.clone(), regenerable=False)
    return model, lambda: load_adapter(model, path, "other")


@row("ERR-119")
def _load_name_taken(tmp: Path):
    path = write(tmp, valid_blob())
    model = fresh()
    return model, lambda: load_adapter(model, path, "default")


@row("ERR-120")
def _load_path_is_directory(tmp: Path):
    (tmp / "adapter.safetensors").mkdir()
    model = plain()
    return model, lambda: load_adapter(model, tmp / "adapter.safetensors")


@row("ERR-121")
def _load_bad_name(tmp: Path):
    path = write(tmp, valid_blob())
    model = plain()
    return model, lambda: load_adapter(model, path, "")


@row("ERR-122")
def _load_misspelt_option(tmp: Path):
    path = write(tmp, valid_blob())
    model = plain()
    return model, lambda: load_adapter(model, path, is_trainble=False)


@pytest.mark.parametrize("row_id", sorted(ROWS))
def test_catalogue_row(row_id: str, tmp_path: Path) -> None:
    model, call = ROWS[row_id](tmp_path)
    catalogue.check_row(row_id, call, model, tmp_path, state=model_state)


def test_float_inputs_of_another_dtype_are_autocast() -> None:
    """Documented behaviour (docs/errors.md, dtype notes): float inputs are computed in the weight dtype, output in theirs."""
    model = fresh()
    x = torch.randn(3, 16)
    expected = model.model.q_proj(x)
    # the rounded input computed in float32, the output rounded to the input dtype (float32-level differences
    # between the fused and the unfused path, then at most one ulp of the output dtype)
    for dtype, rtol in ((torch.float64, 2e-5), (torch.float16, 1e-3), (torch.bfloat16, 1.6e-2)):
        y = model.model.q_proj(x.to(dtype))
        assert y.dtype == dtype
        reference = model.model.q_proj(x.to(dtype).float()).to(dtype)
        torch.testing.assert_close(y, reference, rtol=rtol, atol=1e-4 * float(expected.abs().max()))


def test_nan_without_safe_merge_is_merged() -> None:
    """Documented: only safe_merge checks finiteness (as PEFT); a plain merge writes the NaN into the weight."""
    model = fresh()
    with torch.no_grad():
        model.model.o_proj.randlora_lambda["default"][0, 0] = math.nan
    model.merge_adapter()
    assert torch.isnan(model.model.o_proj.base_layer.weight).any()
