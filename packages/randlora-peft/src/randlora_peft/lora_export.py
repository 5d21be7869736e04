"""RandLoRA -> LoRA export: a truncated SVD of each layer's delta-W, written as a PEFT LoRA adapter.

PEFT's ``convert_to_lora`` / ``save_as_lora`` do this for a PEFT model; here the source is any
RandLoRA adapter, without its base model: delta-W of a layer depends only on the bases, lambda,
gamma and the scaling (SPEC 3.4), all of which an adapter checkpoint holds or regenerates. For
each layer ``delta_W = U S V^T`` (float32, out x in) is cut to ``k`` singular values, as PEFT
does: ``lora_B = U_k S_k`` (out x k) and ``lora_A = V_k^T`` (k x in), with ``lora_alpha = r``
so the LoRA scaling is 1. The rank is an integer (every layer gets ``k = rank``, or its full rank
when smaller, recorded in ``rank_pattern``), or, as in PEFT, a float in (0, 1]: each layer gets
the smallest ``k`` whose singular values hold that fraction of the energy (sum of ``S^2``).

The report gives, per layer and in total, the captured energy ``sum(S_k^2) / sum(S^2)`` and the
relative Frobenius error ``||delta_W - B A||_F / ||delta_W||_F = sqrt(1 - captured)``.

Differences from PEFT's ``convert_to_lora``: an integer rank above a layer's full rank exports
that layer exactly at its full rank instead of raising, and ``modules_to_save`` copies travel
under the adapter's ``modules_to_save`` names (as PEFT does). Trained biases are refused, as PEFT
refuses them: LoRA has no place for a replaced base bias.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.errors import CheckpointError, ConfigError
from randlora_spec.geometry import LayerGeometry
from randlora_spec.layer_kinds import BASE_FEATURES, check_features

if TYPE_CHECKING:
    from randlora_peft.convert import LayerShape

LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
RANDLORA_FILE = "randlora_adapter.safetensors"
"""The checkpoint file name inside a directory written by ``RandLoraModel.save_pretrained``."""


@dataclass(frozen=True)
class LayerReport:
    """One layer's export: its rank ``k`` and how much of delta-W the rank-``k`` factors hold."""

    path: str
    in_features: int
    out_features: int
    rank: int
    captured_energy: float
    """``sum(S_k^2) / sum(S^2)``; 1 for a zero delta-W."""
    relative_error: float
    """``||delta_W - lora_B lora_A||_F / ||delta_W||_F``; 0 for a zero delta-W."""


@dataclass
class LoraExport:
    """A converted adapter: PEFT's ``adapter_config.json`` content, the tensors (PEFT's keys) and the report."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    layers: list[LayerReport] = field(default_factory=list)
    energy: tuple[float, float] = (0.0, 0.0)
    """``(captured, total)`` sum of squared singular values over every layer."""

    @property
    def captured_energy(self) -> float:
        """Captured fraction of the total energy of all layers' delta-W (1 when every delta-W is zero)."""
        captured, total = self.energy
        return captured / total if total > 0 else 1.0

    @property
    def relative_error(self) -> float:
        """``sqrt(sum_l ||delta_W_l - B_l A_l||^2 / sum_l ||delta_W_l||^2)``, the relative Frobenius error over all layers."""
        return math.sqrt(max(0.0, 1.0 - self.captured_energy))


def _check_rank(rank: object) -> int | float:
    """PEFT's rank argument: an integer >= 1, or an energy fraction in (0, 1]."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ConfigError(f"rank: must be an integer >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ConfigError(f"rank: must be an integer >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ConfigError(f"rank: a float rank is the energy to keep and must lie in (0, 1], got {rank!r}")
    return rank


def _cutoff(s: torch.Tensor, rank: int | float) -> int:
    """How many singular values (sorted, descending) to keep for ``rank``; at least 1, at most all."""
    if isinstance(rank, int):
        return min(rank, s.numel())
    energy = torch.cumsum(s.double() ** 2, 0)
    if float(energy[-1]) == 0.0:
        return 1
    return min(int(torch.searchsorted(energy, rank * energy[-1]).item()) + 1, s.numel())


def lora_factors(delta: torch.Tensor, rank: int | float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(lora_A (k, in), lora_B (out, k), captured, total)`` energies of a truncated SVD of ``delta`` (out, in)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = _cutoff(s, _check_rank(rank))
    squares = s.double() ** 2
    return vh[:k].contiguous(), (u[:, :k] * s[:k]).contiguous(), float(squares[:k].sum()), float(squares.sum())


def delta_weights(ckpt: spec_ckpt.AdapterCheckpoint) -> Iterator[tuple[str, spec_ckpt.LayerRecord, torch.Tensor]]:
    """``(path, record, delta_W)`` for every layer of ``ckpt``, delta-W in (out, in) orientation, float32."""
    from randlora_core.plain import delta_weight
    from randlora_core.state import checkpoint_bases

    a, b = checkpoint_bases(ckpt)
    config = ckpt.config
    for path in sorted(ckpt.layers):
        record = ckpt.layers[path]
        g = LayerGeometry(record.in_features, record.out_features, config.r)
        a_s = a[: g.r, 0, : g.m]
        b_flat = b[: g.M, : g.nb, : g.r].reshape(g.M, g.nb * g.r)
        lam = torch.from_numpy(ckpt.lam(path)).float()
        gamma = torch.from_numpy(ckpt.gamma(path)).float()
        yield path, record, delta_weight(a_s, b_flat, lam, gamma, config.randlora_alpha / config.r, g.in_le_out)


def _report(path: str, record: spec_ckpt.LayerRecord, rank: int, kept: float, energy: float) -> LayerReport:
    share = kept / energy if energy > 0 else 1.0
    return LayerReport(path, record.in_features, record.out_features, rank, share, math.sqrt(max(0.0, 1.0 - share)))


def _lora_config(ckpt: spec_ckpt.AdapterCheckpoint, rank: int | float, ranks: dict[str, int]) -> dict[str, Any]:
    """PEFT's LoRA ``adapter_config.json`` for the exported layers (scaling 1: ``lora_alpha = r``)."""
    default = rank if isinstance(rank, int) else max(ranks.values())
    pattern = {path: k for path, k in ranks.items() if k != default}
    config = ckpt.config
    return {
        "peft_type": "LORA",
        "r": default,
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": any(rec.fan_in_fan_out for rec in ckpt.layers.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        "init_lora_weights": True,
        "inference_mode": True,
        **config.bookkeeping(),
    }


def _source_checkpoint(source: spec_ckpt.AdapterCheckpoint | nn.Module, adapter_name: str | None) -> spec_ckpt.AdapterCheckpoint:
    if isinstance(source, spec_ckpt.AdapterCheckpoint):
        return source
    from randlora_core import RandLoraModel, build_checkpoint

    if isinstance(source, RandLoraModel):
        return build_checkpoint(source, adapter_name)
    raise ConfigError(f"source: expected an AdapterCheckpoint or a randlora_core.RandLoraModel, got {type(source).__name__}")


def convert_to_lora(
    source: spec_ckpt.AdapterCheckpoint | nn.Module, rank: int | float, adapter_name: str | None = None
) -> LoraExport:
    """Convert a RandLoRA adapter to LoRA factors (PEFT's ``convert_to_lora``, for any RandLoRA adapter).

    Args:
        source: an adapter checkpoint (see :func:`read_adapter`) or a ``randlora_core.RandLoraModel``.
        rank: an integer rank, or a float in (0, 1]: the energy each layer keeps (see module docstring).
        adapter_name: which adapter of a model (default: the first active one).

    Raises:
        ConfigError: a bad ``rank``, or an adapter that trains biases.

    """
    rank = _check_rank(rank)
    ckpt = _source_checkpoint(source, adapter_name)
    # The export factors (O, I) updates of linear layers; a conv kernel or a DoRA rescaling would be exported wrong.
    check_features(ckpt.layers, ckpt.config.use_dora, BASE_FEATURES, "<LoRA export>")
    if ckpt.config.bias != "none" or ckpt.biases:
        raise ConfigError(f"bias={ckpt.config.bias!r}: an adapter with trained biases cannot be exported to LoRA (as PEFT)")
    tensors: dict[str, torch.Tensor] = {}
    layers, ranks, captured, total = [], {}, 0.0, 0.0
    for path, record, delta in delta_weights(ckpt):
        lora_a, lora_b, kept, energy = lora_factors(delta, rank)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_a
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_b
        ranks[path] = lora_a.shape[0]
        layers.append(_report(path, record, ranks[path], kept, energy))
        captured, total = captured + kept, total + energy
    for path, names in ckpt.modules_to_save.items():
        for name in names:
            tensors[f"{PEFT_PREFIX}{path}.{name}"] = torch.from_numpy(ckpt.tensors[f"{path}.{name}"].copy())
    return LoraExport(_lora_config(ckpt, rank, ranks), tensors, layers, (captured, total))


def read_adapter(
    src: str | Path, model: nn.Module | None = None, layer_shapes: Mapping[str, LayerShape] | None = None
) -> spec_ckpt.AdapterCheckpoint:
    """A RandLoRA adapter from disk: a checkpoint file, a ``save_pretrained`` directory, or a PEFT RandLoRA directory.

    A PEFT directory is read by :func:`randlora_peft.read_peft_adapter`; PEFT's files record only
    ``min(in, out)`` of each layer, so unless every layer is square pass the base ``model`` (it may
    live on the meta device) or ``layer_shapes`` (``{path: (in, out)}``).
    """
    path = Path(src)
    if path.is_dir() and (path / RANDLORA_FILE).is_file():
        path = path / RANDLORA_FILE
    elif path.is_dir():
        from randlora_peft import read_peft_adapter

        return read_peft_adapter(path, model=model, layer_shapes=layer_shapes)
    from randlora_peft.commands import read_checkpoint_file

    return read_checkpoint_file(path, command="to-lora")[0]


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` as a path, refused when it is a file or already holds a PEFT adapter (unless ``overwrite``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    taken = [name for name in (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE) if (out / name).exists()]
    if taken and not overwrite:
        raise CheckpointError(f"{out}: already holds {', '.join(taken)}; pass overwrite=True (--overwrite) to replace them")
    return out


def write_lora(export: LoraExport, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``export`` as a PEFT LoRA directory (``adapter_config.json``, ``adapter_model.safetensors``).

    The directory is put in place as a whole (:func:`randlora_peft.publish.publish_directory`):
    readers see the old files or the new ones, never a mix, and a failure (a full disk, no
    permission) leaves ``out_dir`` as it was. Other entries of an existing ``out_dir`` are kept.

    Raises:
        CheckpointError: ``out_dir`` is a file, or already holds an adapter and ``overwrite`` is false.

    """
    from safetensors.torch import save as encode_tensors

    from randlora_peft.publish import publish_directory

    out = check_out_dir(out_dir, overwrite)
    files = {
        LORA_WEIGHTS_FILE: encode_tensors(export.tensors, metadata={"format": "pt"}),
        LORA_CONFIG_FILE: (json.dumps(export.config, indent=2, sort_keys=True) + "\n").encode(),
    }
    # check_out_dir refused an adapter already there unless overwrite: the rest of out_dir is carried over
    return publish_directory(files, out, overwrite=True)


def save_as_lora(
    source: spec_ckpt.AdapterCheckpoint | nn.Module | str | Path,
    out_dir: str | Path,
    rank: int | float,
    adapter_name: str | None = None,
    overwrite: bool = False,
    base_model: nn.Module | None = None,
) -> LoraExport:
    """Convert ``source`` (an adapter, a model, or a path for :func:`read_adapter`) and write the PEFT LoRA directory.

    ``base_model`` gives a PEFT directory's layer sizes (see :func:`read_adapter`). Everything is
    converted before anything is written. Returns the export with its report; PEFT loads the
    directory with ``PeftModel.from_pretrained(base_model, out_dir)``.
    """
    rank = _check_rank(rank)
    check_out_dir(out_dir, overwrite)
    if isinstance(source, (str, Path)):
        source = read_adapter(source, model=base_model)
    export = convert_to_lora(source, rank, adapter_name)
    write_lora(export, out_dir, overwrite)
    return export
