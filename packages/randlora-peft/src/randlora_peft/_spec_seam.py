"""The one place randlora-peft calls the spec's safetensors and checkpoint-file functions.

Every encode, decode and validation of a file goes through these four functions, so each file a
command reads is parsed by one call and each file it writes is encoded by one call (tests count
the calls). When the spec gains object validation without encoding (``randlora_spec.checkpoint.
validate``) and a header object, only the bodies here change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from randlora_spec import checkpoint as spec_ckpt
from randlora_spec.bases import PORTABLE_RULE
from randlora_spec.checkpoint import AdapterCheckpoint
from randlora_spec.safetensors_io import decode, encode, read_dtypes

WRITING = "<checkpoint being written>"
"""The ``source`` named in messages about a checkpoint that is being written."""


def validate(ckpt: AdapterCheckpoint) -> None:
    """Run every check the spec's reader runs on a file holding ``ckpt``; raises a spec error on a defect."""
    spec_ckpt.to_bytes(ckpt)


def encode_checkpoint(ckpt: AdapterCheckpoint, extra_metadata: Mapping[str, str] | None = None) -> bytes:
    """``ckpt`` in checkpoint format v1, validated, plus ``extra_metadata`` keys (SPEC 6.2 lets readers ignore them).

    Encoded once; the bytes are then checked by the spec's reader, which is what the spec's own
    ``to_bytes`` does.
    """
    tensors = dict(ckpt.tensors)
    if ckpt.bases is not None:
        tensors[spec_ckpt.BASIS_A_KEY], tensors[spec_ckpt.BASIS_B_KEY] = ckpt.bases
    metadata = {**spec_ckpt.metadata_for(ckpt), **(extra_metadata or {})}
    blob = encode(tensors, metadata, bf16=ckpt.bf16_keys)
    spec_ckpt.from_bytes(blob, source=WRITING, supported_basis_rules=(PORTABLE_RULE,))
    return blob


def decode_weights(blob: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, stored dtype codes)`` of a safetensors file (BF16 tensors widened to float32 exactly)."""
    tensors, _ = decode(blob, source)
    return tensors, read_dtypes(blob, source)


def read_checkpoint(blob: bytes, source: str) -> tuple[AdapterCheckpoint, dict[str, str]]:
    """A validated randlora checkpoint (portable rule readable) and its raw ``__metadata__`` map."""
    ckpt = spec_ckpt.from_bytes(blob, source, supported_basis_rules=(PORTABLE_RULE,))
    # The container is valid (from_bytes checked it), so its header is a JSON object.
    length = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8 : 8 + length].decode("utf-8")).get("__metadata__", {})
    return ckpt, dict(metadata)
