"""Hostile inputs to randlora-core's load and adapt paths (issue #13): bounded cost, no change on refusal.

Each refusal is a row of docs/errors.md (ERR-300 ...): the test checks the exception against the
row and that the model (every parameter and buffer bit for bit, requires_grad, module tree,
adapters, including a live outer RandLoraModel) and the files are exactly as before. Memory bombs
run in a child process under ``RLIMIT_AS`` set just above what the child already maps, so an
attempt to allocate what the file asks for fails the test instead of passing as a refusal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Block, randomize_adapters
from torch import nn

from randlora_core import RandLoraConfig, RandLoraModel, apply_checkpoint, build_checkpoint, get_randlora_model, load_adapter
from randlora_core.compute import compute_override
from randlora_core.testing import model_state
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.checkpoint import metadata_for
from randlora_spec.geometry import BasesShape
from randlora_spec.safetensors_io import decode, encode
from randlora_spec.testing import catalogue
from randlora_spec.tolerances import check_close

Case = Callable[[Path], tuple[list[nn.Module], Callable[[], object]]]
CASES: dict[str, tuple[str, Case]] = {}


def case(name: str, row_id: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        assert name not in CASES, name
        CASES[name] = (row_id, fn)
        return fn

    return register


def adapted(dtype: torch.dtype = torch.float32, **kw: object) -> RandLoraModel:
    torch.manual_seed(0)
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    model = get_randlora_model(Block().to(dtype), RandLoraConfig(**kw))  # type: ignore[arg-type]
    randomize_adapters(model)
    return model


def plain(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return Block().to(dtype)


def checkpoint_file(tmp: Path, edit: Callable[[dict[str, np.ndarray], dict[str, str]], None], **kw: object) -> Path:
    """A checkpoint of ``adapted(**kw)`` re-encoded after ``edit(tensors, metadata)`` (no validation)."""
    path = tmp / "adapter.safetensors"
    adapted(**kw).save_adapter(path)
    tensors, metadata = decode(path.read_bytes())
    edit(tensors, metadata)
    path.write_bytes(encode(tensors, metadata))
    return path


def set_meta(metadata: dict[str, str], key: str, value: object) -> None:
    metadata[key] = json.dumps(value, separators=(",", ":"))


# -- sizes recorded in files are not trusted -------------------------------------------------------


def _huge_bases_shape(m_max: int) -> Callable[[dict[str, np.ndarray], dict[str, str]], None]:
    def edit(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        set_meta(metadata, "bases_shape", {"r": 4, "m_max": m_max, "M_max": m_max, "nb_max": -(-m_max // 4)})

    return edit


@case("bases_shape-2^24-absent", "ERR-300")
def _bases_shape_24(tmp: Path):
    path = checkpoint_file(tmp, _huge_bases_shape(2**24), save_projection=False)
    model = plain()
    return [model], lambda: load_adapter(model, path)


@case("bases_shape-2^31-absent-into-live-model", "ERR-300")
def _bases_shape_31(tmp: Path):
    path = checkpoint_file(tmp, _huge_bases_shape(2**31), save_projection=False)
    model = adapted(save_projection=False)
    return [model], lambda: load_adapter(model, path, "other")


@case("bases_shape-one-axis-too-large", "ERR-300")
def _bases_shape_one_axis(tmp: Path):
    def edit(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        set_meta(metadata, "bases_shape", {"r": 4, "m_max": 16, "M_max": 2**26, "nb_max": 4})

    path = checkpoint_file(tmp, edit, save_projection=False)
    model = plain()
    return [model], lambda: load_adapter(model, path)


@case("very-sparse-m_max-beyond-the-model", "ERR-300")
def _very_sparse_m_max(tmp: Path):
    path = checkpoint_file(tmp, _huge_bases_shape(2**20), save_projection=False, very_sparse=True)
    model = plain()
    return [model], lambda: load_adapter(model, path)


@case("file-rank-above-every-layer", "ERR-301")
def _file_rank(tmp: Path):
    # Block's q_proj is 16x24: a rank above both 24 and the ceiling adds no rank, only basis values
    r = 2**16
    ckpt = build_checkpoint(adapted(save_projection=False))
    meta = metadata_for(ckpt)
    meta["config"] = ckpt.config.model_copy(update={"r": r}).to_json()
    set_meta(meta, "layers", {"q_proj": {"in_features": 16, "out_features": 24, "fan_in_fan_out": False}})
    set_meta(meta, "bases_shape", {"r": r, "m_max": 16, "M_max": 24, "nb_max": 1})
    tensors = {"q_proj.randlora_lambda": np.ones((r, 1), np.float32), "q_proj.randlora_gamma": np.ones((1, 16), np.float32)}
    path = tmp / "adapter.safetensors"
    path.write_bytes(encode(tensors, meta))
    model = plain()
    return [model], lambda: load_adapter(model, path)


@case("config-rank-above-every-layer", "ERR-302")
def _config_rank(tmp: Path):
    model = plain()
    return [model], lambda: get_randlora_model(model, RandLoraConfig(r=2**24, target_modules=["q_proj"]))


# -- paths through existing wrappers ---------------------------------------------------------------


def _with_layers(tmp: Path, layers: dict[str, dict[str, object]], rename: dict[str, str]) -> Path:
    def edit(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        for old, new in rename.items():
            for suffix in (".randlora_lambda", ".randlora_gamma"):
                if old + suffix in tensors:
                    tensors[new + suffix] = tensors.pop(old + suffix)
        set_meta(metadata, "layers", layers)

    return checkpoint_file(tmp, edit)


@case("layer-path-through-a-randlora-wrapper", "ERR-303")
def _through_base_layer(tmp: Path):
    layers = {
        "q_proj.base_layer": {"in_features": 16, "out_features": 24, "fan_in_fan_out": False},
        "o_proj": {"in_features": 24, "out_features": 16, "fan_in_fan_out": False},
    }
    path = _with_layers(tmp, layers, {"q_proj": "q_proj.base_layer"})
    model = adapted()
    return [model], lambda: load_adapter(model, path, "other")


def _saved_file(tmp: Path, saved_path: str) -> Path:
    def edit(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        for name in ("weight", "bias"):
            tensors[f"{saved_path}.{name}"] = tensors.pop(f"norm.{name}")
        extra = json.loads(metadata["extra"])
        extra["modules_to_save"] = {saved_path: ["bias", "weight"]}
        set_meta(metadata, "extra", extra)

    return checkpoint_file(tmp, edit, modules_to_save=["norm"])


@case("saved-module-path-through-its-wrapper", "ERR-303")
def _through_saved_copy(tmp: Path):
    path = _saved_file(tmp, "norm.modules_to_save.default")
    model = adapted(modules_to_save=["norm"])
    return [model], lambda: load_adapter(model, path, "other")


@case("saved-module-path-to-the-original", "ERR-303")
def _through_original(tmp: Path):
    path = _saved_file(tmp, "norm.original_module")
    model = adapted(modules_to_save=["norm"])
    return [model], lambda: load_adapter(model, path, "other")


@case("bias-path-through-a-randlora-wrapper", "ERR-303")
def _bias_through_wrapper(tmp: Path):
    def edit(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        tensors["q_proj.base_layer.bias"] = tensors.pop("q_proj.bias")
        extra = json.loads(metadata["extra"])
        extra["biases"] = sorted(["q_proj.base_layer" if p == "q_proj" else p for p in extra["biases"]])
        set_meta(metadata, "extra", extra)

    path = checkpoint_file(tmp, edit, bias="all")
    model = adapted()
    return [model], lambda: load_adapter(model, path, "other")


@case("explicit-target-inside-a-wrapper", "ERR-308")
def _target_inside(tmp: Path):
    model = adapted()
    return [model], lambda: model._add_adapter("other", RandLoraConfig(r=4), paths=["q_proj.base_layer"])


# -- the inner model of a live adapted model ---------------------------------------------------------


def _live(tmp: Path) -> tuple[RandLoraModel, Path]:
    outer = adapted()
    path = tmp / "adapter.safetensors"
    adapted(r=2).save_adapter(path)
    return outer, path


@case("load-into-the-inner-model", "ERR-304")
def _load_inner(tmp: Path):
    outer, path = _live(tmp)
    return [outer], lambda: load_adapter(outer.get_base_model(), path)


@case("apply-into-the-inner-model", "ERR-304")
def _apply_inner(tmp: Path):
    outer, _ = _live(tmp)
    ckpt = build_checkpoint(adapted(r=2))
    return [outer], lambda: apply_checkpoint(outer.get_base_model(), ckpt)


@case("adapt-the-inner-model", "ERR-304")
def _adapt_inner(tmp: Path):
    outer, _ = _live(tmp)
    return [outer], lambda: get_randlora_model(outer.get_base_model(), RandLoraConfig(r=2, target_modules=["k_proj"]))


@case("wrap-the-inner-model", "ERR-304")
def _wrap_inner(tmp: Path):
    outer, _ = _live(tmp)
    return [outer], lambda: RandLoraModel(outer.get_base_model())


@case("adapt-a-module-holding-an-adapted-model", "ERR-304")
def _adapt_container(tmp: Path):
    outer, _ = _live(tmp)
    container = nn.Sequential(outer, nn.Linear(16, 4))
    return [outer, container], lambda: get_randlora_model(container, RandLoraConfig(r=2, target_modules=["1"]))


@case("adapt-the-inner-model-of-a-saved-copy", "ERR-304")
def _adapt_saved_inner(tmp: Path):
    outer = adapted(modules_to_save=["norm"])
    return [outer], lambda: get_randlora_model(outer.model.norm, RandLoraConfig(r=2, target_modules=r".*"))


# -- finite on disk, infinite in the model ----------------------------------------------------------


def _scaled(key_suffix: str, value: float, dtype: np.dtype) -> Callable[[dict[str, np.ndarray], dict[str, str]], None]:
    def edit(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        key = next(k for k in sorted(tensors) if k.endswith(key_suffix))
        arr = tensors[key].astype(dtype)
        arr.flat[0] = value
        tensors[key] = arr

    return edit


@case("float64-lambda-overflows-float32", "ERR-305")
def _lambda_overflow(tmp: Path):
    path = checkpoint_file(tmp, _scaled(".randlora_lambda", 1e300, np.dtype(np.float64)))
    model = plain()
    return [model], lambda: load_adapter(model, path)


@case("float32-gamma-overflows-float16", "ERR-305")
def _gamma_overflow_half(tmp: Path):
    path = checkpoint_file(tmp, _scaled(".randlora_gamma", 1e6, np.dtype(np.float32)), dtype=torch.float16)
    model = plain(torch.float16)
    return [model], lambda: load_adapter(model, path, autocast_adapter_dtype=False)  # float16 lambda/gamma


@case("float64-bias-overflows-float32", "ERR-305")
def _bias_overflow(tmp: Path):
    path = checkpoint_file(tmp, _scaled(".bias", -1e300, np.dtype(np.float64)), bias="randlora_only")
    model = adapted()
    return [model], lambda: load_adapter(model, path, "other")


@case("float64-saved-parameter-overflows-float32", "ERR-305")
def _saved_overflow(tmp: Path):
    path = checkpoint_file(tmp, _scaled("norm.weight", 1e300, np.dtype(np.float64)), modules_to_save=["norm"])
    model = adapted(modules_to_save=["norm"])
    return [model], lambda: load_adapter(model, path, "other")


# -- shared bases handed in by the user ---------------------------------------------------------------


def _bases(model: RandLoraModel) -> tuple[torch.Tensor, torch.Tensor]:
    bases = model.randlora_bases
    assert bases is not None
    return bases.randlora_A.clone(), bases.randlora_B.clone()


@case("nan-shared-bases", "ERR-306")
def _nan_bases(tmp: Path):
    model = adapted()
    a, b = _bases(model)
    b[0, 0, 0] = float("nan")
    return [model], lambda: model.set_shared_bases(a, b)


@case("float64-shared-bases-overflow-float32", "ERR-306")
def _overflow_bases(tmp: Path):
    model = adapted()
    a, b = _bases(model)
    a64 = a.double()
    a64[0, 0, 0] = 1e300
    return [model], lambda: model.set_shared_bases(a64, b)


@case("shared-bases-not-tensors", "ERR-307")
def _bases_not_tensors(tmp: Path):
    model = adapted()
    a, b = _bases(model)
    return [model], lambda: model.set_shared_bases(a.tolist(), b)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_without_a_trace(name: str, tmp_path: Path) -> None:
    row_id, setup = CASES[name]
    models, call = setup(tmp_path)
    before = [model_state(m) for m in models]
    files = catalogue.tree_state(tmp_path)
    with pytest.raises(Exception) as info:
        call()
    catalogue.check(row_id, info.value)
    assert [model_state(m) for m in models] == before, f"{name}: a model changed"
    assert catalogue.tree_state(tmp_path) == files, f"{name}: files changed"


# -- bombs: the refusal must cost no more than the header ---------------------------------------------

CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_hostile_load import CASES
model_call = CASES[{name!r}][1](__import__("pathlib").Path({tmp!r}))[1]
torch.zeros(1) @ torch.zeros(1)  # warm up before the limit: the first op maps its pools
with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + {budget}, resource.RLIM_INFINITY))
try:
    model_call()
except MemoryError:
    print("MemoryError")
except Exception as exc:
    print(type(exc).__name__)
"""


@pytest.mark.parametrize(
    "name",
    [
        "bases_shape-2^24-absent",
        "bases_shape-2^31-absent-into-live-model",
        "bases_shape-one-axis-too-large",
        "config-rank-above-every-layer",
    ],
)
def test_bombs_are_refused_within_a_small_memory_budget(name: str, tmp_path: Path) -> None:
    budget = 64 * 2**20  # the bombs ask for 256 MiB to 32 GiB
    code = CHILD.format(tests=str(Path(__file__).parent), name=name, tmp=str(tmp_path), budget=budget)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = catalogue.rows()[CASES[name][0]].exception
    assert out.stdout.strip().splitlines()[-1] == expected, out.stdout + out.stderr[-2000:]


def test_larger_stored_bases_are_accepted(tmp_path: Path) -> None:
    """Stored bases cost what the file holds: a larger allocation than the layers need still loads."""
    model = adapted()
    a, b = _bases(model)
    path = tmp_path / "adapter.safetensors"
    ckpt = build_checkpoint(model)
    ckpt.bases = (np.pad(a.numpy(), ((0, 0), (0, 0), (0, 8))), np.pad(b.numpy(), ((0, 8), (0, 0), (0, 0))))
    s = ckpt.bases_shape
    ckpt.bases_shape = BasesShape(s.r, s.m_max + 8, s.M_max + 8, -(-(s.m_max + 8) // s.r))
    ckpt.bases = (ckpt.bases[0], np.pad(ckpt.bases[1], ((0, 0), (0, ckpt.bases_shape.nb_max - s.nb_max), (0, 0))))
    spec_ckpt.save(path, ckpt)
    loaded = load_adapter(plain(), path)
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x))


# -- one Inf/NaN semantics on every path -------------------------------------------------------------


@pytest.mark.parametrize("hook", [False, True])
def test_non_finite_rows_do_not_depend_on_the_path(hook: bool) -> None:
    """A row holding Inf or NaN is NaN throughout on the factored and the dense path, in a batch of 16 or 256."""
    model = adapted()
    layer = model.model.q_proj
    if hook:  # the base layer's own call (external base)
        layer.get_base_layer().register_forward_hook(lambda *args: None)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    x[3, 5], x[7, 1] = float("inf"), float("nan")
    outs = []
    with torch.no_grad():
        for compute in ("factored", "dense", None):
            with compute_override(compute):
                outs += [layer(x), layer(x[:16])]
    for y in outs:
        assert y[3].isnan().all() and y[7].isnan().all()
        assert torch.isfinite(y[[0, 1, 2, 4, 5, 6, 8]]).all()
        assert torch.equal(y[:16].isnan(), outs[0][:16].isnan())
        finite = [0, 1, 2, 4, 5, 6, 8]
        assert check_close(y[finite].numpy(), outs[0][finite].numpy(), "float32")[0]
