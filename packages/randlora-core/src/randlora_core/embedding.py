"""RandLoRA on ``nn.Embedding`` (SPEC.md 3.10).

A table ``(V, D)`` is seen as the ``(O, I)`` matrix ``W^T``: ``I = V`` (num_embeddings),
``O = D`` (embedding_dim), and the update of the stored table is ``delta_W^T``, with the row of
``padding_idx`` zero so the padding embedding stays the base's. Each index picks a row, so an
adapter's output is a row of its update: the factored path gathers rows of one factor and
multiplies by the other (``I > O``: ``s * B_flat[x] @ S_flat``; ``I <= O``:
``s * S_flat[:, x]^T @ B_flat^T``), never building the vocabulary-sized update; ``compute="dense"``
looks the indices up in ``W + update`` instead. Dropout does not apply (the input holds indices);
``max_norm`` is refused, because it rewrites looked-up rows of the weight during the forward.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from randlora_core.compute import resolve_compute
from randlora_core.layer import RandLoraLinear
from randlora_core.operands import LayerInput
from randlora_core.plain import scaled_basis
from randlora_core.registry import _register_builtin
from randlora_spec.errors import DtypeError, TargetModuleError
from randlora_spec.layer_kinds import EMBEDDING, LayerRecord


class RandLoraEmbedding(RandLoraLinear):
    """RandLoRA wrapper around ``nn.Embedding`` (see the module docstring).

    Args:
        base_layer: the embedding to adapt (held, changed only by merging).
        fan_in_fan_out: ignored: a table is always stored ``(in, out)``.

    Raises:
        TargetModuleError: the embedding has ``max_norm`` set.

    """

    layer_kind = EMBEDDING
    applies_dropout = False

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = True) -> None:
        if getattr(base_layer, "max_norm", None) is not None:
            raise TargetModuleError(
                f"nn.Embedding with max_norm={base_layer.max_norm} cannot be adapted: it renormalises looked-up rows of "
                "its weight in place during the forward, which RandLoRA's merge and factored path cannot reproduce"
            )
        super().__init__(base_layer, fan_in_fan_out=True)

    def get_base_layer(self) -> nn.Embedding:
        """The wrapped embedding."""
        return cast(nn.Embedding, self.base_layer)  # registered for nn.Embedding

    def _features(self, base_layer: nn.Module) -> tuple[int, int]:
        table = cast(nn.Embedding, base_layer)
        return int(table.num_embeddings), int(table.embedding_dim)

    @property
    def padding_idx(self) -> int | None:
        """The base's padding index (non-negative), or ``None``."""
        return self.get_base_layer().padding_idx

    def delta_view(self, adapter_name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """delta-W ``(O, I)`` with the padding column zero (SPEC 3.10)."""
        delta = super().delta_view(adapter_name, dtype, device)
        pad = self.padding_idx
        if pad is None:
            return delta
        keep = torch.ones(delta.shape[1], dtype=delta.dtype, device=delta.device)
        keep[pad] = 0
        return delta * keep

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Look ``x`` up in ``weight`` (a table ``(V, D)``).

        Without ``padding_idx``: the update's padding row is already zero (:meth:`delta_view`), and
        under DoRA the rescaled padding row does carry a gradient to the magnitude (SPEC 3.11).
        """
        out = nn.functional.embedding(x, weight)
        return out + bias if bias is not None else out

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise DtypeError(f"layer {self.layer_name!r} (nn.Embedding) needs an integer index tensor, got {got}")

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y  # the output has the table's dtype: the input holds indices

    def layer_record(self) -> LayerRecord:
        """The record of SPEC 6.2 (an embedding is stored (in, out))."""
        return LayerRecord(self.in_features, self.out_features, True, EMBEDDING)

    def _plain_adapted(self, call: LayerInput, names: list[str]) -> torch.Tensor:
        """``base(x)`` plus each adapter's rows: gathered factored, or from ``W + update`` with ``compute="dense"``."""
        x = call.x
        weight = self.get_base_layer().weight
        dtype = self._compute_dtype(names, weight.device)
        if resolve_compute(self._requested_compute(names)) == "dense" and call.plain:
            views = [self.delta_view(n, dtype, weight.device) for n in names]
            table = weight.to(dtype) + self._view_to_storage(sum(views[1:], views[0]))
            return self._apply_weight(x, table, None).to(weight.dtype)
        base = self._base_output(call)
        rows = [self._rows(x, n, dtype) for n in names]
        extra = sum(rows[1:], rows[0])
        return base + extra.to(base.dtype)

    def _rows(self, x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Adapter ``name``'s output for indices ``x``: the rows of its update, by a gather of one factor."""
        op = self.adapter_call(name, dtype, x.device)
        s = scaled_basis(op.a_s, op.lam, op.gamma)  # (K, m)
        if self.in_features > self.out_features:
            rows = nn.functional.embedding(x, op.b_flat) @ s  # B_flat (V, K): one row per index
        else:
            rows = nn.functional.embedding(x, s.T) @ op.b_flat.T  # S_flat^T (V, K)
        rows = rows * op.scaling
        pad = self.padding_idx
        return rows if pad is None else rows * (x != pad).unsqueeze(-1).to(rows.dtype)

    def extra_repr(self) -> str:
        """Sizes and adapter names."""
        return f"num_embeddings={self.in_features}, embedding_dim={self.out_features}, adapters={list(self.r)}"


_register_builtin(nn.Embedding, RandLoraEmbedding)
