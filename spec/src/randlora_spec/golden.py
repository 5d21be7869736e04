"""Golden test cases: the manifest format and loading (SPEC.md section 8).

A case is data: a kind, a dtype, parameters, input tensors and expected tensors, stored in one
safetensors file per case (``input.*`` and ``expected.*`` keys) and described in ``manifest.json``.
Implementations never see test code, only :class:`GoldenCase` objects handed to their driver.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from randlora_spec.layer_kinds import DORA, LINEAR
from randlora_spec.reference import Adapter
from randlora_spec.reference_dora import ViewAdapter
from randlora_spec.safetensors_io import decode

MANIFEST_NAME = "manifest.json"
GOLDEN_FORMAT = "randlora.golden/1"
CASE_KINDS = ("bases", "forward", "backward", "merge", "checkpoint")


@dataclass(frozen=True)
class GoldenCase:
    """One golden case, with its tensors loaded.

    ``params`` depends on ``kind`` (see SPEC.md section 8): layer cases carry ``in_features``,
    ``out_features``, ``fan_in_fan_out``, ``has_bias``, ``adapters`` ({name: {r, alpha}}) and
    ``active``; bases cases carry ``seed``, ``basis_kind`` and ``bases_shape``; checkpoint cases
    carry ``layers`` and ``basis_rule``. ``files`` holds paths of auxiliary files (a checkpoint).
    """

    id: str
    kind: str
    dtype: str
    params: dict[str, Any]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    exact: bool = False
    files: dict[str, Path] = field(default_factory=dict)

    def adapters(self) -> dict[str, Adapter]:
        """Adapters of a layer case as reference objects (lambda/gamma from ``<name>.lambda``/``.gamma``)."""
        return {
            name: Adapter(spec["r"], spec["alpha"], self.inputs[f"{name}.lambda"], self.inputs[f"{name}.gamma"])
            for name, spec in self.params["adapters"].items()
        }

    def view_adapters(self) -> dict[str, ViewAdapter]:
        """:meth:`adapters` with each DoRA adapter's magnitude (``<name>.magnitude``, SPEC 8.2)."""
        return {
            name: ViewAdapter(adapter, self.inputs.get(f"{name}.magnitude") if self.dora(name) else None)
            for name, adapter in self.adapters().items()
        }

    def dora(self, name: str) -> bool:
        """Whether adapter ``name`` of a layer case uses DoRA (param ``use_dora``, default false)."""
        return bool(self.params["adapters"][name].get("use_dora", False))

    @property
    def layer_kind(self) -> str:
        """The layer kind of a layer case (param ``layer_kind``, default ``linear``)."""
        return str(self.params.get("layer_kind", LINEAR))

    @property
    def features(self) -> frozenset[str]:
        """The layer kinds and variants (``dora``) an implementation needs to run this case (SPEC 8.2).

        Layer cases: their ``layer_kind`` and ``dora`` if an adapter uses it; checkpoint cases: the
        kinds of the recorded layers and ``dora`` if the param ``use_dora`` is set; bases cases: none.
        """
        p = self.params
        if self.kind in ("forward", "backward", "merge"):
            dora = any(spec.get("use_dora", False) for spec in p["adapters"].values())
            return frozenset({self.layer_kind} | ({DORA} if dora else set()))
        if self.kind == "checkpoint":
            kinds = {rec.get("kind", LINEAR) for rec in p["layers"].values()}
            return frozenset(kinds | ({DORA} if p.get("use_dora") else set()))
        return frozenset()


def default_golden_dir() -> Path:
    """The golden directory: ``$RANDLORA_GOLDEN_DIR`` if set, else ``spec/golden`` of a source checkout.

    Raises:
        FileNotFoundError: neither exists (an installed wheel does not carry the fixtures; pass a path).
    """
    env = os.environ.get("RANDLORA_GOLDEN_DIR")
    candidate = Path(env) if env else Path(__file__).resolve().parents[2] / "golden"
    if not (candidate / MANIFEST_NAME).is_file():
        raise FileNotFoundError(
            f"no golden manifest at {candidate}; set RANDLORA_GOLDEN_DIR or pass the directory of a source checkout"
        )
    return candidate


def load_manifest(golden_dir: Path) -> dict[str, Any]:
    """The parsed manifest, checked for the expected format id."""
    manifest: dict[str, Any] = json.loads((golden_dir / MANIFEST_NAME).read_text())
    if manifest.get("format") != GOLDEN_FORMAT:
        raise ValueError(f"{golden_dir / MANIFEST_NAME}: format {manifest.get('format')!r}, expected {GOLDEN_FORMAT!r}")
    return manifest


def load_case(golden_dir: Path, entry: dict[str, Any]) -> GoldenCase:
    """Materialise one manifest entry into a :class:`GoldenCase`."""
    tensors, _ = decode((golden_dir / entry["file"]).read_bytes(), entry["file"])
    inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
    expected = {k.removeprefix("expected."): v for k, v in tensors.items() if k.startswith("expected.")}
    return GoldenCase(
        id=entry["id"],
        kind=entry["kind"],
        dtype=entry["dtype"],
        params=entry["params"],
        inputs=inputs,
        expected=expected,
        exact=entry["tolerance"] == "exact",
        files={k: golden_dir / v for k, v in entry.get("files", {}).items()},
    )


def load_cases(golden_dir: Path | None = None) -> list[GoldenCase]:
    """Every case in the manifest, in manifest order."""
    directory = golden_dir or default_golden_dir()
    return [load_case(directory, entry) for entry in load_manifest(directory)["cases"]]
