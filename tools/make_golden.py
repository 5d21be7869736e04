#!/usr/bin/env python3
"""Regenerate the golden fixtures under spec/golden/ from the float64 reference.

Deterministic: every random input comes from a generator seeded by the case id, files are
written with sorted keys, and the reference's reductions are correctly rounded, so a rerun on
any machine produces identical bytes. ``--check`` regenerates into memory and exits 1 when a
committed file differs (or is missing or extra).

Usage: python tools/make_golden.py [--check] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "spec" / "src"))  # run from a checkout without installing anything

try:
    import numpy as np

    from randlora_spec import checkpoint
    from randlora_spec.bases import generate_bases
    from randlora_spec.config import RandLoraConfig
    from randlora_spec.driver import ReferenceDriver
    from randlora_spec.geometry import BasesShape, bases_shape_for_layers
    from randlora_spec.golden import GOLDEN_FORMAT, MANIFEST_NAME, GoldenCase
    from randlora_spec.layer_kinds import ALL_FEATURES, EMBEDDING, LINEAR
    from randlora_spec.safetensors_io import encode
    from randlora_spec.testing.cases import LAYER_KINDS, LayerSpec, checkpoint_inputs, layer_case
    from randlora_spec.testing.kind_cases import CHECKPOINT_KIND_LAYERS, KindSpec, kind_case, kind_checkpoint_inputs
    from randlora_spec.tolerances import tolerance
except ModuleNotFoundError as exc:  # a Python without randlora-spec's dependencies (numpy, pydantic)
    print(
        f"make_golden.py needs the Python module {exc.name!r}: run `nox -s golden`, or `pip install ./spec` first",
        file=sys.stderr,
    )
    raise SystemExit(2) from None

DTYPES = ("float64", "float32")


LAYERS = [
    LayerSpec("in-lt-out", 12, 20, {"default": 4}, notes="in < out: delta_W = s * P"),
    LayerSpec("in-gt-out", 20, 12, {"default": 4}, notes="in > out: delta_W = s * P^T"),
    LayerSpec("square", 16, 16, {"default": 4}, has_bias=False, notes="square layer, no bias"),
    LayerSpec("m-not-div-r", 10, 14, {"default": 4}, notes="m = 10 not divisible by r = 4 (nb = 3)"),
    LayerSpec("r-gt-m", 3, 8, {"default": 5}, notes="r = 5 > m = 3 (nb = 1)"),
    LayerSpec("fan-in-fan-out", 12, 20, {"default": 4}, fan_in_fan_out=True, notes="weight stored (in, out)"),
    LayerSpec("fan-in-fan-out-in-gt-out", 18, 10, {"default": 3}, fan_in_fan_out=True, has_bias=False),
    LayerSpec("input-3d", 12, 20, {"default": 4}, x_shape=(2, 3), notes="3-D input (batch, seq, in)"),
    LayerSpec(
        "sliced-bases",
        12,
        20,
        {"default": 4},
        alloc_extra=(20, 12),
        seed=2**64 - 1,
        notes="bases allocated for a larger model (32 x 32) and sliced; max seed",
    ),
    LayerSpec(
        "two-adapters",
        14,
        9,
        {"first": 3, "second": 3},
        active=("first", "second"),
        alphas={"first": 6.0, "second": 1.5},
        notes="two adapters active at once, summed",
    ),
    LayerSpec(
        "two-adapters-different-r",
        16,
        24,
        {"big": 4, "small": 2},
        active=("big", "small"),
        notes="ranks 4 and 2 share one allocation (r_alloc = 4, nb_alloc = ceil(m / 2))",
    ),
    LayerSpec("one-of-two-active", 12, 20, {"default": 4, "other": 4}, active=("other",), notes="inactive adapter ignored"),
    LayerSpec("sparse-bases", 12, 20, {"default": 4}, seed=7, basis="sparse", notes="ternary bases, s = 3"),
    LayerSpec("very-sparse-bases", 20, 12, {"default": 4}, seed=11, basis="very_sparse", notes="s = sqrt(m_max)"),
]


def _conv(name: str, kind: str, out: int, adapters: dict[str, int], **kw: object) -> KindSpec:
    kw.setdefault("x_shape", (2,))
    dims = len(kw["kernel_size"])  # type: ignore[arg-type]
    for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
        kw.setdefault(key, (default,) * dims)
    return KindSpec(name, kind, out, adapters, **kw)  # type: ignore[arg-type]


KIND_LAYERS = [
    KindSpec("dora-in-lt-out", LINEAR, 20, {"default": 4}, dora=("default",), in_features=12, notes="DoRA, in < out"),
    KindSpec(
        "dora-in-gt-out-fan-in-fan-out",
        LINEAR,
        10,
        {"default": 3},
        dora=("default",),
        in_features=18,
        fan_in_fan_out=True,
        x_shape=(2, 3),
        notes="DoRA on a weight stored (in, out), in > out, 3-D input",
    ),
    KindSpec(
        "dora-mixed-adapters",
        LINEAR,
        9,
        {"plain": 3, "dora": 3, "dora2": 2},
        active=("dora", "plain", "dora2"),
        dora=("dora", "dora2"),
        in_features=14,
        alphas={"dora": 6.0, "dora2": 1.5},
        notes="two DoRA adapters and a plain one active: each DoRA adapter scales the base output by its own factor",
    ),
    _conv(
        "conv2d",
        "conv2d",
        8,
        {"default": 4},
        in_channels=3,
        kernel_size=(3, 3),
        padding=(1, 1),
        spatial=(5, 5),
        notes="3x3 conv, padding 1: I = 27 > O = 8",
    ),
    _conv(
        "conv2d-strided-dilated",
        "conv2d",
        24,
        {"default": 4},
        in_channels=2,
        kernel_size=(3, 2),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        spatial=(6, 7),
        notes="rectangular kernel, stride, padding and dilation: I = 12 < O = 24",
    ),
    _conv(
        "conv2d-groups",
        "conv2d",
        6,
        {"default": 3},
        in_channels=4,
        kernel_size=(2, 2),
        groups=2,
        spatial=(4, 4),
        notes="groups = 2: I = (4 / 2) * 4 = 8, each output channel sees its group's patches",
    ),
    _conv(
        "conv1d",
        "conv1d",
        10,
        {"default": 4},
        in_channels=4,
        kernel_size=(3,),
        padding=(2,),
        spatial=(7,),
        has_bias=False,
        notes="1-D conv without bias",
    ),
    _conv(
        "conv3d",
        "conv3d",
        5,
        {"default": 2},
        in_channels=2,
        kernel_size=(2, 2, 2),
        padding=(0, 1, 0),
        spatial=(3, 3, 3),
        x_shape=(1,),
        notes="3-D conv: I = 16 > O = 5",
    ),
    KindSpec(
        "embedding",
        EMBEDDING,
        12,
        {"default": 4},
        in_features=20,
        padding_idx=3,
        x_shape=(2, 5),
        has_bias=False,
        notes="V = 20 > D = 12; padding_idx 3: its row of the update is zero",
    ),
    KindSpec(
        "embedding-small-vocab",
        EMBEDDING,
        16,
        {"default": 4},
        in_features=6,
        x_shape=(7,),
        has_bias=False,
        notes="V = 6 < D = 16, no padding_idx",
    ),
    _conv(
        "dora-conv2d",
        "conv2d",
        8,
        {"default": 4},
        dora=("default",),
        in_channels=3,
        kernel_size=(3, 3),
        padding=(1, 1),
        spatial=(4, 4),
        notes="DoRA on a conv: one magnitude per output channel",
    ),
    KindSpec(
        "dora-embedding",
        EMBEDDING,
        12,
        {"default": 4},
        dora=("default",),
        in_features=20,
        padding_idx=0,
        x_shape=(2, 5),
        has_bias=False,
        notes="DoRA on an embedding: one magnitude per embedding dimension",
    ),
]

BASES = [
    ("dense-seed0", 0, "dense", [(16, 24)], 4),
    ("dense-seed-max", 2**64 - 1, "dense", [(7, 10)], 3),
    ("dense-seed-large-r8", 123456789012345, "dense", [(33, 40), (40, 12)], 8),
    ("dense-r-gt-m", 42, "dense", [(3, 9)], 5),
    ("sparse-seed0", 0, "sparse", [(16, 24)], 4),
    ("sparse-seed3", 3, "sparse", [(40, 33)], 8),
    ("very-sparse-seed5", 5, "very_sparse", [(16, 24)], 4),
    ("very-sparse-seed9", 9, "very_sparse", [(64, 20)], 6),
]


def checkpoint_cases(out: dict[str, bytes]) -> list[dict]:
    """Checkpoint files with and without bases, plus layer inputs and the outputs they must give."""
    variants = [
        ("with-bases", {"save_projection": True}, False, False),
        ("without-bases", {"save_projection": False}, False, False),
        ("sparse-without-bases", {"save_projection": False, "sparse": True, "projection_prng_key": 99}, False, False),
        (
            "trainable-biases",
            {"save_projection": True, "bias": "randlora_only", "projection_prng_key": 2**40 + 3},
            True,
            False,
        ),
        ("bf16-parameters", {"save_projection": False, "projection_prng_key": 5}, False, True),
    ]
    entries = []
    for name, overrides, biases, bf16 in variants:
        case_id = f"checkpoint-{name}"
        config = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=["q_proj", "o_proj", "c_fc"], **overrides)
        ckpt, inputs = checkpoint_inputs(case_id, config, trained_biases=biases, bf16=bf16)
        ckpt_file = f"checkpoints/{name}.safetensors"
        out[ckpt_file] = checkpoint.to_bytes(ckpt)
        entries.append(
            {
                "id": case_id,
                "kind": "checkpoint",
                "dtype": "float32",
                "params": {
                    "layers": {p: rec.to_json() for p, rec in ckpt.layers.items()},
                    "basis_rule": config.basis_rule,
                    "notes": f"checkpoint {name}: the listed layers, loaded from the file, must map each x to y",
                },
                "inputs": inputs,
                "files": {"checkpoint": ckpt_file},
            }
        )
    kind_variants = [
        ("layer-kinds", {"save_projection": True}),
        ("dora-without-bases", {"save_projection": False, "use_dora": True, "projection_prng_key": 17}),
    ]
    for name, overrides in kind_variants:
        case_id = f"checkpoint-{name}"
        config = RandLoraConfig(r=4, randlora_alpha=8.0, target_modules=sorted(CHECKPOINT_KIND_LAYERS), **overrides)
        ckpt, inputs, params = kind_checkpoint_inputs(case_id, config)
        ckpt_file = f"checkpoints/{name}.safetensors"
        out[ckpt_file] = checkpoint.to_bytes(ckpt, readable_features=ALL_FEATURES)
        params["notes"] = f"checkpoint {name}: conv, embedding and linear layers loaded from the file must map each x to y"
        entries.append(
            {
                "id": case_id,
                "kind": "checkpoint",
                "dtype": "float32",
                "params": params,
                "inputs": inputs,
                "files": {"checkpoint": ckpt_file},
            }
        )
    return entries


def build() -> dict[str, bytes]:
    """Every golden file, by path relative to spec/golden/."""
    out: dict[str, bytes] = {}
    entries: list[dict] = []
    for case_name, seed, kind, shapes, r in BASES:
        shape = bases_shape_for_layers(shapes, r)
        entries.append(
            {
                "id": f"bases-{case_name}",
                "kind": "bases",
                "dtype": "float32",
                "params": {"seed": seed, "basis_kind": kind, "bases_shape": shape.__dict__, "layers": shapes},
                "inputs": {},
            }
        )
    # The slice property as data: the expected values come from a larger allocation, sliced.
    big = BasesShape(r=8, m_max=40, M_max=48, nb_max=5)
    small = BasesShape(r=4, m_max=12, M_max=20, nb_max=3)
    big_a, big_b = generate_bases(1234, big)
    entries.append(
        {
            "id": "bases-slice-property",
            "kind": "bases",
            "dtype": "float32",
            "params": {"seed": 1234, "basis_kind": "dense", "bases_shape": small.__dict__, "sliced_from": big.__dict__},
            "inputs": {},
            "expected": {
                "randlora_A": big_a[: small.r, :, : small.m_max].copy(),
                "randlora_B": big_b[: small.M_max, : small.nb_max, : small.r].copy(),
            },
        }
    )
    for spec in LAYERS:
        for dtype in DTYPES:
            for kind in LAYER_KINDS:
                case = layer_case(spec, kind, dtype)
                entries.append({"id": case.id, "kind": kind, "dtype": dtype, "params": case.params, "inputs": case.inputs})
    for kspec in KIND_LAYERS:
        for dtype in DTYPES:
            for kind in LAYER_KINDS:
                case = kind_case(kspec, kind, dtype)
                entries.append({"id": case.id, "kind": kind, "dtype": dtype, "params": case.params, "inputs": case.inputs})
    entries.extend(checkpoint_cases(out))

    with tempfile.TemporaryDirectory() as scratch:
        manifest_cases = [_finish(entry, out, Path(scratch)) for entry in entries]
    manifest = {
        "format": GOLDEN_FORMAT,
        "generator": "tools/make_golden.py",
        "comparison": "max|actual - expected| <= atol + rtol * max|expected| per output; 'exact' means bit-identical",
        "cases": manifest_cases,
    }
    out[MANIFEST_NAME] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    return out


def _finish(entry: dict, out: dict[str, bytes], scratch: Path) -> dict:
    """Compute a case's expected outputs with the reference, store its file, return its manifest entry."""
    files = {}
    for key, rel in entry.get("files", {}).items():
        files[key] = scratch / rel.replace("/", "_")
        files[key].write_bytes(out[rel])
    case = GoldenCase(
        id=entry["id"],
        kind=entry["kind"],
        dtype=entry["dtype"],
        params=entry["params"],
        inputs=entry["inputs"],
        expected={},
        files=files,
    )
    expected = entry.get("expected") or ReferenceDriver().run(case)
    if entry["kind"] != "bases":
        expected = {k: np.asarray(v, np.float64) for k, v in expected.items()}
    file_name = f"cases/{entry['id']}.safetensors"
    tensors = {f"input.{k}": v for k, v in entry["inputs"].items()}
    tensors.update({f"expected.{k}": v for k, v in expected.items()})
    out[file_name] = encode(tensors, {"case": entry["id"]})
    tol = "exact" if entry["kind"] == "bases" else tolerance(entry["dtype"]).__dict__
    return {
        "id": entry["id"],
        "kind": entry["kind"],
        "dtype": entry["dtype"],
        "params": entry["params"],
        "file": file_name,
        "files": entry.get("files", {}),
        "inputs": sorted(entry["inputs"]),
        "expected": sorted(expected),
        "tolerance": tol,
    }


def main(argv: list[str] | None = None) -> int:
    """Write the fixtures, or with ``--check`` compare them with what is committed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed fixtures differ")
    parser.add_argument("--out", type=Path, default=ROOT / "spec" / "golden", help="golden directory")
    args = parser.parse_args(argv)
    files = build()
    existing = {str(p.relative_to(args.out)) for p in args.out.rglob("*") if p.is_file()} if args.out.exists() else set()
    if args.check:
        stale = sorted(p for p, blob in files.items() if not (args.out / p).is_file() or (args.out / p).read_bytes() != blob)
        extra = sorted(existing - files.keys())
        for p in stale:
            print(f"stale or missing: {p}")
        for p in extra:
            print(f"not produced by the generator: {p}")
        ok = not stale and not extra
        print(f"golden check: {len(files)} files, {'OK' if ok else 'FAILED: run python tools/make_golden.py'}")
        return 0 if ok else 1
    for p in sorted(existing - files.keys()):
        (args.out / p).unlink()
    for p, blob in files.items():
        target = args.out / p
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.read_bytes() != blob:
            target.write_bytes(blob)
    total = sum(len(b) for b in files.values())
    print(f"wrote {len(files)} files ({total / 1e6:.2f} MB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
