"""Mixed-adapter batches: one adapter per batch row (PEFT's ``adapter_names``), grouped by adapter.

:meth:`RandLoraModel.forward <randlora_core.model.RandLoraModel.forward>` takes
``adapter_names=[...]`` (one name per sample, :data:`BASE` for the base model alone) and hands the
list to every RandLoRA layer and ``modules_to_save`` wrapper for the call; each computes every
adapter present on the batch (layers share the base output among them) and takes that adapter's
rows, so a row is exactly what a call with that adapter alone gives.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from randlora_spec.errors import ShapeError

if TYPE_CHECKING:
    from randlora_core.layer import RandLoraLinear
    from randlora_core.operands import LayerInput

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


def mixed_forward(layer: RandLoraLinear, call: LayerInput, per_row: list[str]) -> torch.Tensor:
    """Row ``i`` of the batch through adapter ``per_row[i]`` alone (:data:`~randlora_core.mixed.BASE` for none).

    Each adapter runs on the whole batch and its rows are taken: matmul results depend on the
    number of rows (BLAS kernels), so only that makes a row exactly what a single-adapter call
    of the batch gives. The base output is computed once and shared: ``k`` adapters cost one
    base pass and ``k`` adapter passes (``k`` layer passes where the dense path is chosen).
    """
    x = call.x
    if x.dim() < 2 or x.shape[0] != len(per_row):
        raise ShapeError(
            f"layer {layer.layer_name!r}: adapter_names has {len(per_row)} entries for an input of shape "
            f"{tuple(x.shape)}; the layer's input must have the batch as its first axis"
        )
    base_out = layer._base_output(call)
    shared = dataclasses.replace(call, base_out=base_out)
    parts, order = [], []
    for name, rows in mixed_groups(per_row, x.device).items():
        if name in layer.randlora_lambda and name not in layer.merged_adapters:
            out = layer._adapted(shared, [name])
        else:
            out = layer._finish(x, base_out)
        parts.append(out.index_select(0, rows))
        order.append(rows)
    return scatter_rows(parts, order, x.shape[0])
