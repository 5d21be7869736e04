"""The choice between the two compute paths of SPEC.md 2.1 (``compute = "auto"``).

*factored*: two thin products per adapter (``x -> r*nb -> O``) added to the base output.
*dense*: ``delta_W`` built once per call and folded into the base matmul; under ``jax.checkpoint``
it is rebuilt in the backward pass instead of being kept, so saved memory does not grow.

The rule compares multiply-add counts of a training step (forward and backward, the frozen base
matmul excluded since both paths pay it). With ``n`` tokens, ``R = r*nb`` per adapter:

- factored: ``3 * n * R * (I + O)`` (forward, ``grad_x`` and the ``r*nb`` intermediate's gradient);
- dense: ``3 * M * R * m`` (build ``P``, rebuild it, ``B_flat^T @ dL/dP``) plus ``n * I * O`` for
  ``G = g^T x``, which the factored path never forms.

Shapes are static under ``jax.jit``, so the choice is made once per traced shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from randlora_spec.bases import num_bases

Path = Literal["factored", "dense"]
MODES = ("auto", "factored", "dense")


def factored_cost(tokens: int, in_features: int, out_features: int, ranks: Sequence[int]) -> int:
    """Multiply-adds of a factored training step over the adapters of ``ranks``."""
    m = min(in_features, out_features)
    return sum(3 * tokens * r * num_bases(m, r) * (in_features + out_features) for r in ranks)


def dense_cost(tokens: int, in_features: int, out_features: int, ranks: Sequence[int]) -> int:
    """Multiply-adds of a dense training step over the adapters of ``ranks``."""
    m, big_m = min(in_features, out_features), max(in_features, out_features)
    build = sum(3 * big_m * r * num_bases(m, r) * m for r in ranks)
    return build + tokens * in_features * out_features


def choose_path(mode: str, tokens: int, in_features: int, out_features: int, ranks: Sequence[int], dense_possible: bool) -> Path:
    """The path to evaluate a layer call with.

    Args:
        mode: the config's ``compute`` (``auto``, ``factored`` or ``dense``).
        tokens: rows of the input once its leading axes are merged.
        in_features: ``I`` of the layer.
        out_features: ``O`` of the layer.
        ranks: the rank of every adapter the call adds.
        dense_possible: False when the dense path does not apply (active dropout, a base layer
            whose own forward cannot be replaced by ``x @ K``); the factored path is then used.

    """
    if not dense_possible or mode == "factored" or not ranks:
        return "factored"
    if mode == "dense":
        return "dense"
    dense = dense_cost(tokens, in_features, out_features, ranks)
    return "dense" if dense < factored_cost(tokens, in_features, out_features, ranks) else "factored"
