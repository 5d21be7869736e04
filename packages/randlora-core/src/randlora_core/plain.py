"""RandLoRA's adapter math as plain torch operations (SPEC.md 3.2-3.5), written to be read.

Notation as in the spec: a layer with ``I`` inputs and ``O`` outputs has ``m = min(I, O)``,
``M = max(I, O)``, ``nb = ceil(m / r)``; ``a_s = A[:r, 0, :m]`` is (r, m) and ``b_flat`` (M, nb*r) is
``B[:M, :nb, :r]`` flattened over its last two axes. Then

    S_flat[k*nb + b, j] = lambda[k, b] * a_s[k, j] * gamma[b, j]         (r*nb, m)
    P = b_flat @ S_flat                                                   (M, m)
    delta_W = s * P  if I <= O  else  s * P^T                             (O, I)

Layers merge with :func:`delta_weight`. :func:`adapter_output` evaluates ``x @ delta_W^T`` factored
with autograd through these plain ops: it is the oracle the layer engine
(:mod:`randlora_core.engine`) is tested against, and no layer calls it.
"""

from __future__ import annotations

import torch


def scaled_basis(a_s: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``S_flat`` (r*nb, m): ``S_flat[k*nb + b, j] = lam[k, b] * a_s[k, j] * gamma[b, j]``."""
    r, m = a_s.shape
    return (lam[:, :, None] * a_s[:, None, :] * gamma[None, :, :]).reshape(r * lam.shape[1], m)


def delta_weight(
    a_s: torch.Tensor, b_flat: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, scaling: float, in_le_out: bool
) -> torch.Tensor:
    """``delta_W`` in (out, in) orientation: ``s * P`` if ``in_le_out`` else ``s * P^T``, with ``P = b_flat @ S_flat``."""
    p = (b_flat @ scaled_basis(a_s, lam, gamma)) * scaling
    return p if in_le_out else p.T


def adapter_output(
    x: torch.Tensor,
    a_s: torch.Tensor,
    b_flat: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    scaling: float,
    in_le_out: bool,
) -> torch.Tensor:
    """``x @ delta_W^T`` evaluated factored, ``x -> r*nb -> out``, with autograd through plain ops."""
    s = scaled_basis(a_s, lam, gamma)
    return ((x @ s.T) @ b_flat.T if in_le_out else (x @ b_flat) @ s) * scaling
