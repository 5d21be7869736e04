"""Float64 reference of the layer kinds' input maps (SPEC.md 3.10).

Every kind multiplies the ``(O, I)`` view of its (effective) weight with rows built from its input:
a linear layer with the rows of ``x`` itself, a convolution with the patches its kernel window
covers (one set per group), an embedding with the one-hot vector of each index. Each class here
does the three products a layer needs with one weight view ``w`` (the effective weight of
:mod:`randlora_spec.reference_dora`):

- ``forward(w, bias)``: the layer's output;
- ``weight_grad(g)``: ``G = dL/dw``, (O, I), for the output gradient ``g`` (SPEC 3.6's ``g2^T @ x2``);
- ``input_grad(g, w)``: ``dL/dx`` (``None`` for an embedding: its input holds indices).

Sums are correctly rounded (``math.fsum``) as in :mod:`randlora_spec.reference`, so results do not
depend on the machine. The convolution's input gradient is one exact sum per input element over
every product that reaches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from randlora_spec.errors import ShapeError
from randlora_spec.reference import exact_sum, matmul


class LinearInput:
    """A linear layer's input ``x`` (leading axes, then ``I``): the rows are ``x`` itself."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x, np.float64)
        self.x2 = self.x.reshape(-1, self.x.shape[-1])

    def forward(self, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """``x @ w^T + bias``."""
        if self.x.shape[-1] != w.shape[1]:
            raise ShapeError(f"input's last dimension is {self.x.shape[-1]}, the layer expects {w.shape[1]}")
        y = matmul(self.x, w.T)
        return y + np.asarray(bias, np.float64) if bias is not None else y

    def weight_grad(self, g: np.ndarray) -> np.ndarray:
        """``g2^T @ x2``."""
        g2 = np.asarray(g, np.float64).reshape(-1, np.shape(g)[-1])
        return matmul(g2.T, self.x2)

    def input_grad(self, g: np.ndarray, w: np.ndarray) -> np.ndarray:
        """``g @ w``."""
        return matmul(np.asarray(g, np.float64), w)


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution as PyTorch's ``nn.ConvNd`` defines it (zero padding; one value per spatial axis)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    @property
    def in_features(self) -> int:
        """``I = (C_in / groups) * prod(kernel_size)``."""
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The stored weight's shape ``(C_out, C_in / groups, *kernel_size)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def out_spatial(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Output size per spatial axis: ``(L + 2 pad - dil (k - 1) - 1) div stride + 1``."""
        sizes = zip(spatial, self.kernel_size, self.stride, self.padding, self.dilation, strict=True)
        out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in sizes)
        if min(out) < 1:
            raise ShapeError(f"input spatial size {spatial} is too small for the kernel window of {self}")
        return out


def window_index(spatial: tuple[int, ...], geom: ConvGeometry) -> np.ndarray:
    """``(P, K)`` flat input position under kernel offset ``t`` of output position ``p``, ``-1`` in the padding.

    ``P`` runs over output positions and ``K`` over kernel offsets, both row-major, so column
    ``c * K + t`` of a group's patch row matches column ``c * K + t`` of the weight view.
    """
    dims = len(spatial)
    out = geom.out_spatial(spatial)
    flat = np.zeros((*out, *geom.kernel_size), np.int64)
    valid = np.ones(flat.shape, bool)
    for j in range(dims):
        positions = np.arange(out[j])[:, None] * geom.stride[j] - geom.padding[j]
        q = positions + np.arange(geom.kernel_size[j])[None, :] * geom.dilation[j]
        shape = [1] * (2 * dims)
        shape[j], shape[dims + j] = out[j], geom.kernel_size[j]
        qj = q.reshape(shape)
        valid &= (qj >= 0) & (qj < spatial[j])
        flat = flat * spatial[j] + qj
    return np.where(valid, flat, -1).reshape(math.prod(out), math.prod(geom.kernel_size))


class ConvInput:
    """A convolution's input ``x`` ``(N, C_in, *spatial)``: the rows are each group's patches."""

    def __init__(self, x: np.ndarray, geom: ConvGeometry) -> None:
        self.x = np.asarray(x, np.float64)
        self.geom = geom
        if self.x.ndim != 2 + len(geom.kernel_size) or self.x.shape[1] != geom.in_channels:
            raise ShapeError(f"conv input must be (N, {geom.in_channels}, *spatial), got {self.x.shape}")
        self.spatial = tuple(self.x.shape[2:])
        self.out = geom.out_spatial(self.spatial)
        self.index = window_index(self.spatial, geom)
        n, c = self.x.shape[:2]
        padded = np.concatenate([self.x.reshape(n, c, -1), np.zeros((n, c, 1))], axis=2)
        patches = padded[:, :, self.index]  # (N, C, P, K); index -1 reads the appended zero
        per_group = c // geom.groups
        self.rows = [
            patches[:, g * per_group : (g + 1) * per_group].transpose(0, 2, 1, 3).reshape(-1, geom.in_features)
            for g in range(geom.groups)
        ]

    def _out_rows(self, g: np.ndarray) -> np.ndarray:
        """``g`` (N, O, *out) as rows (N * P, O)."""
        g = np.asarray(g, np.float64)
        rows: np.ndarray = g.reshape(g.shape[0], g.shape[1], -1).transpose(0, 2, 1).reshape(-1, g.shape[1])
        return rows

    def _block(self, group: int) -> slice:
        per = self.geom.out_channels // self.geom.groups
        return slice(group * per, (group + 1) * per)

    def forward(self, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """The convolution with kernel view ``w`` (O, I), plus ``bias``: (N, O, *out)."""
        n = self.x.shape[0]
        y = np.concatenate([matmul(rows, w[self._block(g)].T) for g, rows in enumerate(self.rows)], axis=1)
        if bias is not None:
            y = y + np.asarray(bias, np.float64)
        out: np.ndarray = y.reshape(n, -1, w.shape[0]).transpose(0, 2, 1).reshape(n, w.shape[0], *self.out)
        return out

    def weight_grad(self, g: np.ndarray) -> np.ndarray:
        """``G`` (O, I): rows of group ``j`` are ``g_j^T @ patches_j``."""
        g2 = self._out_rows(g)
        return np.concatenate([matmul(g2[:, self._block(j)].T, rows) for j, rows in enumerate(self.rows)], axis=0)

    def input_grad(self, g: np.ndarray, w: np.ndarray) -> np.ndarray:
        """``dL/dx``: per input element, the exact sum of every ``g[n, o, p] * w[o, c * K + t]`` reaching it."""
        g3 = np.asarray(g, np.float64).reshape(g.shape[0], g.shape[1], -1)  # (N, O, P)
        n, c = self.x.shape[:2]
        per_group, k = c // self.geom.groups, self.index.shape[1]
        grad = np.zeros((n, c, math.prod(self.spatial)))
        for q in range(math.prod(self.spatial)):
            p_list, t_list = np.nonzero(self.index == q)
            if p_list.size == 0:
                continue
            for ch in range(c):
                block = self._block(ch // per_group)
                cols = (ch % per_group) * k + t_list
                weights = w[block][:, cols]  # (O/g, L)
                for i in range(n):
                    grad[i, ch, q] = math.fsum((g3[i, block][:, p_list] * weights).ravel())
        return grad.reshape(self.x.shape)


class EmbeddingInput:
    """An embedding's input: integer indices of any shape; the rows are their one-hot vectors."""

    def __init__(self, x: np.ndarray, num_embeddings: int) -> None:
        self.x = np.asarray(x)
        if not np.issubdtype(self.x.dtype, np.integer):
            raise ShapeError(f"embedding input must hold integer indices, got dtype {self.x.dtype}")
        if self.x.size and (self.x.min() < 0 or self.x.max() >= num_embeddings):
            raise ShapeError(f"embedding indices must lie in [0, {num_embeddings})")
        self.flat = self.x.reshape(-1)
        self.num_embeddings = num_embeddings

    def forward(self, w: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """``onehot(x) @ w^T``: column ``x`` of the view, i.e. row ``x`` of the stored table (exact)."""
        y = np.asarray(w, np.float64).T[self.flat]
        if bias is not None:
            y = y + np.asarray(bias, np.float64)
        out: np.ndarray = y.reshape(*self.x.shape, w.shape[0])
        return out

    def weight_grad(self, g: np.ndarray) -> np.ndarray:
        """``G[o, i]``: the exact sum of ``g[n, o]`` over the positions ``n`` holding index ``i``."""
        g2 = np.asarray(g, np.float64).reshape(-1, np.shape(g)[-1])
        grad = np.zeros((g2.shape[1], self.num_embeddings))
        for i in np.unique(self.flat):
            grad[:, i] = exact_sum(g2[self.flat == i], axis=0)
        return grad

    def input_grad(self, g: np.ndarray, w: np.ndarray) -> None:
        """None: indices have no gradient."""
        return None
