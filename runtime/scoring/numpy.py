"""CPU scorer: distances by BLAS matrix products over bounded blocks, a running top-kappa, and
exact re-computation of the kept distances (the |q|^2 - 2 q.g + |g|^2 expansion loses digits
when neighbours are close, the re-computation does not)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .base import PixelScorer, TopK, concat_upsampled
from .pyramid import PyramidSlabs, upsampled_rows

# the per-level path pays when its product's contraction (fine channels plus the coarse native
# cells each slab reads) is below this share of the concatenated channels: WRN50x2 (~410 of 1792)
# takes it, the narrow EfficientNet-Lite0 pyramid (~190 of 176) does not; see docs/speed.md
PER_LEVEL_SHARE = 0.5


class NumpyScorer(PixelScorer):
    """Exact top-kappa on the CPU; holds at most ``block_bytes`` of distances at a time."""

    name = "numpy"

    def __init__(self, block_bytes: int = 32 << 20):
        self.block_bytes = int(block_bytes)

    def topk(self, query: np.ndarray, blocks: Iterable[np.ndarray], kappa: int) -> TopK:
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        q = np.ascontiguousarray(query, np.float32)
        p = q.shape[0]
        best_d = np.full((p, kappa), np.inf, np.float32)
        best_i = np.full((p, kappa), -1, np.int64)
        rows_per_step = max(1, self.block_bytes // (4 * max(p, 1)))
        offset = 0
        for block in blocks:
            if block.ndim != 2 or block.shape[1] != q.shape[1]:
                raise ValueError(f"gallery block has shape {block.shape}, expected (M, {q.shape[1]})")
            for s in range(0, block.shape[0], rows_per_step):
                g = np.asarray(block[s : s + rows_per_step], np.float32)  # widen one step only
                best_d, best_i = _merge(q, g, offset + s, best_d, best_i)
            offset += block.shape[0]
        if offset < kappa:
            raise ValueError(f"gallery has {offset} features, fewer than kappa = {kappa}")
        return TopK(best_d, best_i)

    def topk_pyramid(self, query, images, grid, kappa):
        """Exact concatenated-pyramid distances at per-level cost (docs/speed.md):
        ||concat_l U_l q_l - concat_l U_l g_l||^2 = |Uq|^2 + |Ug|^2 - 2 sum_l U_l Q_l G_l^T U_l^T,
        with U_l the bilinear upsampling of level l: coarse levels' dot products are taken at native
        resolution and interpolated inside one product per slab of gallery rows (:class:`PyramidSlabs`),
        so the P x P distance matrix is never formed. Candidates are ranked by the expanded distance,
        kappa + 1 of them, and re-computed exactly at the end (``images`` is indexed a second time)."""
        slabs = PyramidSlabs(query, grid, rows=4)
        if not slabs.c_fine or slabs.contraction >= PER_LEVEL_SHARE * sum(q.shape[2] for q in query):
            return super().topk_pyramid(query, images, grid, kappa)  # narrow pyramids: the plain GEMM wins
        p = slabs.p
        keep = kappa + 1  # one spare: the expanded distance may misorder near-ties, the exact one decides
        best_d = np.full((p, keep), np.inf, np.float32)
        best_i = np.full((p, keep), -1, np.int64)
        for j in range(len(images)):
            found = [_smallest(d, min(kappa, d.shape[1])) + (start,) for start, d in slabs(images[j])]
            cand_i = np.concatenate([idx + (j * p + start) for idx, _, start in found], axis=1)
            best_d, best_i = _keep(best_d, best_i, np.concatenate([val for _, val, _ in found], axis=1), cand_i)
        if len(images) * p < kappa:
            raise ValueError(f"gallery has {len(images) * p} features, fewer than kappa = {kappa}")
        q_up = concat_upsampled(query, grid)
        exact = np.full((p, keep), np.inf, np.float32)
        owner = best_i // p
        for j in np.unique(owner[best_i >= 0]):
            pp, ss = np.nonzero((owner == j) & (best_i >= 0))
            diff = q_up[pp] - upsampled_rows(images[j], grid, best_i[pp, ss] - j * p)
            exact[pp, ss] = np.einsum("nd,nd->n", diff, diff)
        order = np.lexsort((best_i, exact), axis=1)[:, :kappa]  # exact distance, then lower index
        return TopK(np.take_along_axis(exact, order, 1), np.take_along_axis(best_i, order, 1))


def _keep(best_d, best_i, new_d, new_i):
    """Merge candidate distances into the running top-kappa."""
    kappa = best_d.shape[1]
    all_d = np.concatenate([best_d, new_d], axis=1)
    all_i = np.concatenate([best_i, new_i], axis=1)
    order = np.argsort(all_d, axis=1, kind="stable")[:, :kappa]
    return np.take_along_axis(all_d, order, 1), np.take_along_axis(all_i, order, 1)


def _smallest(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(column indices, values) of the k smallest entries of each row (unordered); may overwrite ``d``."""
    rows = np.arange(d.shape[0])
    if k == 1:
        idx = np.argmin(d, axis=1)
        return idx[:, None], d[rows, idx][:, None]
    if k <= 8:  # a few argmin passes beat argpartition's full reshuffle
        idx = np.empty((d.shape[0], k), np.int64)
        val = np.empty((d.shape[0], k), d.dtype)
        for i in range(k):
            idx[:, i] = np.argmin(d, axis=1)
            val[:, i] = d[rows, idx[:, i]]
            d[rows, idx[:, i]] = np.inf
        return idx, val
    # the k-th value, then everything below it and the lowest-index ties at it: ties resolve the
    # same way as on the GPU kernel and in the argmin passes (lower gallery index first)
    kth = np.partition(d, k - 1, axis=1)[:, k - 1 : k]
    less, eq = d < kth, d == kth
    need = k - less.sum(axis=1, keepdims=True)
    idx = np.nonzero(less | (eq & (np.cumsum(eq, axis=1) <= need)))[1].reshape(d.shape[0], k)
    return idx, np.take_along_axis(d, idx, 1)


def _merge(q, g, offset, best_d, best_i):
    kappa = best_d.shape[1]
    # |g|^2 - 2 q.g orders each row like the squared distance (|q|^2 is constant along a row);
    # scaling the small block by -2 saves a pass over the large product
    d = q @ (g * np.float32(-2.0)).T
    d += np.einsum("ij,ij->i", g, g)[None, :]
    cand, _ = _smallest(d, min(kappa, g.shape[0]))
    # exact distances of the candidates: (P, k, D) is small next to the (P, M) block
    diff = q[:, None, :] - g[cand]
    return _keep(best_d, best_i, np.einsum("pkd,pkd->pk", diff, diff), cand + offset)
