"""The one place randlora-peft calls the spec's safetensors and checkpoint-file functions.

Every encode, decode and validation of a file goes through these four functions, so each file a
command reads is parsed by one call (one header parse) and each file it writes is encoded by one
call (tests count the calls). Validating a checkpoint object (:func:`validate`) encodes nothing.
"""

from __future__ import annotations

import numpy as np

from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PORTABLE_RULE
from randlora_spec.checkpoint import AdapterCheckpoint
from randlora_spec.safetensors_io import SafetensorsBuffer


def validate(ckpt: AdapterCheckpoint) -> None:
    """Run every check the spec's reader runs on a file holding ``ckpt``, without encoding it; raises a spec error."""
    spec_ckpt.validate(ckpt)


def encode_checkpoint(ckpt: AdapterCheckpoint) -> bytes:
    """``ckpt`` in checkpoint format v1: validated as an object, then encoded once."""
    return spec_ckpt.to_bytes(ckpt)


def decode_weights(blob: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, stored dtype codes)`` of a safetensors file (BF16 tensors widened to float32 exactly).

    The header is parsed and validated once, before any tensor is read.
    """
    container = SafetensorsBuffer(blob, source)
    return {name: container.read(name) for name in container.header.tensors}, container.header.dtypes


def read_checkpoint(blob: bytes, source: str) -> AdapterCheckpoint:
    """A validated randlora checkpoint whose bases, when absent, the portable rule regenerates."""
    return spec_ckpt.from_bytes(blob, source, supported_basis_rules=(PORTABLE_RULE,))
