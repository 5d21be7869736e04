"""Mixed-adapter batches: one adapter per batch row (PEFT's ``adapter_names``), grouped by adapter.

:meth:`RandLoraModel.forward <randlora_core.model.RandLoraModel.forward>` takes
``adapter_names=[...]`` (one name per sample, :data:`BASE` for the base model alone) and hands the
list to every RandLoRA layer and ``modules_to_save`` wrapper for the call; each computes every
adapter present on the batch (layers share the base output among them) and takes that adapter's
rows, so a row is exactly what a call with that adapter alone gives.
"""

from __future__ import annotations

import torch

BASE = "__base__"
"""The name that selects the base model alone for a row (PEFT's convention)."""


def mixed_groups(per_row: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Row indices of each name, in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(per_row):
        rows.setdefault(name, []).append(i)
    return {name: torch.tensor(idx, dtype=torch.long, device=device) for name, idx in rows.items()}


def scatter_rows(parts: list[torch.Tensor], rows: list[torch.Tensor], batch: int) -> torch.Tensor:
    """The batch whose rows ``rows[k]`` are ``parts[k]`` (differentiable; ``rows`` partition the batch)."""
    if len(parts) == 1:
        return parts[0]
    stacked, index = torch.cat(parts), torch.cat(rows)
    return stacked.new_empty((batch, *stacked.shape[1:])).index_copy(0, index, stacked)
