"""Writing an :class:`~randlora_spec.checkpoint.AdapterCheckpoint` as a directory PEFT loads.

A short pipeline: the checkpoint's bases at PEFT's allocation -> PEFT's config and tensors
(:func:`peft_files`) -> the three files' bytes (:func:`peft_directory_files`) -> the directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from randlora_peft import _spec_seam as seam
from randlora_peft.layout import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, peft_keys
from randlora_peft.limits import check_bases_budget
from randlora_peft.publish import publish_directory
from randlora_peft.sidecar import SIDECAR_NAME, sidecar_bytes
from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PORTABLE_RULE, TAG_A, TAG_B, BasesShape, bases_shape_for_layers, basis_kind
from randlora_spec.checkpoint import AdapterCheckpoint
from randlora_spec.config import BOOKKEEPING_FIELDS, RandLoraConfig
from randlora_spec.errors import BasisRuleError, ConfigError


def peft_bases_shape(ckpt: AdapterCheckpoint) -> BasesShape:
    """The allocation PEFT makes for the checkpoint's layers (``_find_dim`` over the targeted layers)."""
    return bases_shape_for_layers([(rec.in_features, rec.out_features) for rec in ckpt.layers.values()], ckpt.config.r)


def checkpoint_bases(ckpt: AdapterCheckpoint) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's bases at its recorded allocation: stored, or regenerated with the portable rule."""
    if ckpt.bases is not None:
        return ckpt.bases
    if ckpt.config.basis_rule != PORTABLE_RULE:
        raise BasisRuleError(
            f"the checkpoint stores no bases and its basis_rule {ckpt.config.basis_rule!r} cannot be regenerated here"
        )
    from randlora_core import generate_bases

    cfg = ckpt.config
    a, b = generate_bases(cfg.projection_prng_key, ckpt.bases_shape, basis_kind(cfg.sparse, cfg.very_sparse))
    return a.numpy(), b.numpy()


def _peft_window(ckpt: AdapterCheckpoint, want: BasesShape, source: str) -> tuple[np.ndarray, np.ndarray]:
    """The bases at PEFT's allocation ``want``: a window of the stored ones, or generated for that window only.

    The portable rule gives each value from its coordinates (with the recorded allocation's
    ``m_max`` for the sparsity of ``very_sparse``), so the recorded allocation, which may be far
    larger, is never generated; the window itself is generated only within the budget of
    :mod:`randlora_peft.limits` (the layer sizes are claims of the file).
    """
    if ckpt.bases is not None:
        a, b = ckpt.bases
        return a[: want.r, :, : want.m_max], b[: want.M_max, : want.nb_max, : want.r]
    cfg = ckpt.config
    if cfg.basis_rule != PORTABLE_RULE:
        raise BasisRuleError(f"the checkpoint stores no bases and its basis_rule {cfg.basis_rule!r} cannot be regenerated here")
    from randlora_core.bases import generate_basis

    check_bases_budget(
        want, "writing the bases PEFT needs for these layers", source, sum(t.nbytes for t in ckpt.tensors.values())
    )
    kind = basis_kind(cfg.sparse, cfg.very_sparse)
    m_max = ckpt.bases_shape.m_max
    a_window = generate_basis(cfg.projection_prng_key, TAG_A, want.a_shape, kind, m_max)
    b_window = generate_basis(cfg.projection_prng_key, TAG_B, want.b_shape, kind, m_max)
    return a_window.numpy(), b_window.numpy()


def _with_bookkeeping(ckpt: AdapterCheckpoint, peft_info: Mapping[str, Any] | None) -> RandLoraConfig:
    """``ckpt``'s config with the bookkeeping fields ``peft_info`` sets (checked by the config schema)."""
    info = dict(peft_info or {})
    unknown = sorted(set(info) - set(BOOKKEEPING_FIELDS))
    if unknown:
        raise ConfigError(f"peft_info: unknown keys {unknown}; allowed: {list(BOOKKEEPING_FIELDS)}")
    if not info:
        return ckpt.config
    return RandLoraConfig.parse({**ckpt.config.model_dump(mode="json"), **info})


def _peft_config(ckpt: AdapterCheckpoint, peft_info: Mapping[str, Any] | None) -> dict[str, Any]:
    data = _with_bookkeeping(ckpt, peft_info).to_peft_dict()
    data["target_modules"] = sorted(ckpt.layers)
    data["layers_to_transform"] = None
    data["layers_pattern"] = None
    data["save_projection"] = True
    data["modules_to_save"] = sorted(ckpt.modules_to_save) or None
    data["fan_in_fan_out"] = all(rec.fan_in_fan_out for rec in ckpt.layers.values())
    return data


def peft_files(
    ckpt: AdapterCheckpoint, *, per_layer_bases: bool = False, peft_info: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json content, adapter_model.safetensors tensors)`` of ``ckpt`` in PEFT's layout.

    PEFT's config always gets ``save_projection=True`` and the bases are written once, under
    ``base_model.randlora_A`` / ``base_model.randlora_B``, as PEFT's allocation for these layers (a
    window of the checkpoint's). PEFT (0.21) loads them into the one buffer pair every layer shares,
    so the per-layer copies it writes itself are redundant; it then warns about the absent copies
    ("Found missing adapter keys"), which is harmless. ``per_layer_bases=True`` writes the copies
    too, as PEFT does, for byte-for-byte familiarity at PEFT's file size.

    PEFT's bookkeeping (``task_type``, ``base_model_name_or_path``, ``revision``, ``auto_mapping``)
    comes from the checkpoint's config; ``peft_info`` sets or overrides it (e.g.
    ``{"task_type": "CAUSAL_LM"}`` so ``PeftModel.from_pretrained`` builds a ``PeftModelForCausalLM``).

    ``target_modules`` becomes the explicit list of adapted module paths, so that PEFT adapts the
    same layers and sizes its bases identically whatever targeting options (``exclude_modules``,
    ``layers_to_transform``) produced the original selection.
    """
    return _peft_files(ckpt, per_layer_bases, peft_info, "<checkpoint>")


def _peft_files(
    ckpt: AdapterCheckpoint, per_layer_bases: bool, peft_info: Mapping[str, Any] | None, source: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    data = _peft_config(ckpt, peft_info)
    a, b = _peft_window(ckpt, peft_bases_shape(ckpt), source)
    arrays = {**ckpt.tensors, spec_ckpt.BASIS_A_KEY: a, spec_ckpt.BASIS_B_KEY: b}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for peft_key, key in peft_keys(ckpt, per_layer_bases).items():
        t = torch.from_numpy(np.ascontiguousarray(arrays[key]))
        t = t.to(torch.bfloat16) if key in ckpt.bf16_keys else t
        tensors[peft_key] = t.clone() if key in seen else t  # safetensors refuses tensors that share memory
        seen.add(key)
    return data, tensors


def peft_directory_files(
    ckpt: AdapterCheckpoint,
    *,
    per_layer_bases: bool = False,
    peft_info: Mapping[str, Any] | None = None,
    source: str = "<checkpoint>",
) -> dict[str, bytes]:
    """File name -> bytes of the PEFT directory for ``ckpt`` (PEFT's two files and our sidecar); not validated here.

    ``source`` names where ``ckpt`` came from in messages.
    """
    from safetensors.torch import save as st_save

    data, tensors = _peft_files(ckpt, per_layer_bases, peft_info, source)
    return {
        PEFT_WEIGHTS_NAME: st_save(tensors, metadata={"format": "pt"}),
        PEFT_CONFIG_NAME: (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
        SIDECAR_NAME: sidecar_bytes(ckpt),
    }


def write_peft_adapter(
    ckpt: AdapterCheckpoint, out_dir: str | Path, *, per_layer_bases: bool = False, peft_info: Mapping[str, Any] | None = None
) -> Path:
    """Write ``ckpt`` as a PEFT adapter directory (see :func:`peft_files`); returns the directory.

    The checkpoint is validated first. The directory is replaced as a whole, atomically (see
    :mod:`randlora_peft.publish`): readers and a crash see the old directory or the new one,
    never a mix; other entries of an existing directory are kept. Besides PEFT's two files,
    ``randlora_layers.json`` records the layer shapes (PEFT's files lack them) so the directory
    converts back without the base model, and restores the portable rule when the bases follow it.
    """
    seam.validate(ckpt)
    return publish_directory(peft_directory_files(ckpt, per_layer_bases=per_layer_bases, peft_info=peft_info), out_dir)
