"""CPU scorer: distances by BLAS matrix products over bounded blocks, a running top-kappa, and
exact re-computation of the kept distances (the |q|^2 - 2 q.g + |g|^2 expansion loses digits
when neighbours are close, the re-computation does not)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .base import PixelScorer, TopK, concat_upsampled
from .pyramid import PyramidSlabs, exact_distances

# the per-level path pays when its product's contraction (fine channels plus the coarse native
# cells each slab reads) is below this share of the concatenated channels: WRN50x2 (~410 of 1792)
# takes it, the narrow EfficientNet-Lite0 pyramid (~190 of 176) does not; see docs/speed.md
PER_LEVEL_SHARE = 0.5


class NumpyScorer(PixelScorer):
    """Exact top-kappa on the CPU; holds at most ``block_bytes`` of distances at a time."""

    name = "numpy"

    def __init__(self, block_bytes: int = 8 << 20):  # a distance block of ~8 MB: near the cache, big enough for BLAS
        self.block_bytes = int(block_bytes)

    def topk(self, query: np.ndarray, blocks: Iterable[np.ndarray], kappa: int,
             sqnorms: Iterable[np.ndarray] | None = None) -> TopK:
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        q = np.ascontiguousarray(query, np.float32)
        p, dim = q.shape
        left = np.empty((p, dim + 1), np.float32)  # [q | 1] against [-2 g^T ; |g|^2]: one product, no pass
        left[:, :dim], left[:, dim] = q, 1.0
        top = _Top(p, kappa)
        rows_per_step = max(1, self.block_bytes // (4 * max(p, 1)))
        offset = 0
        pairs = ((b, None) for b in blocks) if sqnorms is None else zip(blocks, sqnorms, strict=True)
        for block, norms in pairs:
            if block.ndim != 2 or block.shape[1] != dim:
                raise ValueError(f"gallery block has shape {block.shape}, expected (M, {dim})")
            for s in range(0, block.shape[0], rows_per_step):
                g = np.asarray(block[s : s + rows_per_step], np.float32)  # widen one step only
                _merge(q, left, g, offset + s, top, None if norms is None else norms[s : s + rows_per_step])
            offset += block.shape[0]
        if offset < kappa:
            raise ValueError(f"gallery has {offset} features, fewer than kappa = {kappa}")
        return top.result()

    def topk_pyramid(self, query, images, grid, kappa):
        """Exact concatenated-pyramid distances at per-level cost (docs/speed.md):
        ||concat_l U_l q_l - concat_l U_l g_l||^2 = |Uq|^2 + |Ug|^2 - 2 sum_l U_l Q_l G_l^T U_l^T,
        with U_l the bilinear upsampling of level l: coarse levels' dot products are taken at native
        resolution and interpolated inside one product per slab of gallery rows (:class:`PyramidSlabs`),
        so the P x P distance matrix is never formed. Candidates are ranked by the expanded distance,
        kappa + 1 of them, and re-computed exactly at the end (``images`` is indexed a second time).
        Where ``images`` has ``sqnorms(j, levels)``, the gallery's norms of image j come from there."""
        slabs = PyramidSlabs(query, grid, rows=4)
        if not slabs.c_fine or slabs.contraction >= PER_LEVEL_SHARE * sum(q.shape[2] for q in query):
            return super().topk_pyramid(query, images, grid, kappa)  # narrow pyramids: the plain GEMM wins
        p = slabs.p
        top = _Top(p, kappa)
        kept_norms = getattr(images, "sqnorms", None)  # a gallery keeps them: see spade._DecodedPyramids
        for j in range(len(images)):
            levels = images[j]
            norms = kept_norms(j, levels) if kept_norms else None
            found = [_smallest(d, min(kappa, d.shape[1])) + (start,) for start, d in slabs(levels, norms)]
            top.add(np.concatenate([val for _, val, _ in found], axis=1),
                    np.concatenate([idx + (j * p + start) for idx, _, start in found], axis=1))
        if len(images) * p < kappa:
            raise ValueError(f"gallery has {len(images) * p} features, fewer than kappa = {kappa}")
        top.exact = exact_distances(concat_upsampled(query, grid), images, grid, top.index, top.index >= 0)
        return top.result()


class _Top:
    """Each query's running candidates, kappa + 1 of them, ranked by the expanded distance
    |g|^2 - 2 q.g (which may misorder near-ties: the spare one covers that); their exact distances
    (``exact``, filled by the caller) decide the final kappa, ties to the lower gallery index."""

    def __init__(self, p: int, kappa: int):
        self.kappa = kappa
        self.approx = np.full((p, kappa + 1), np.inf, np.float32)
        self.index = np.full((p, kappa + 1), -1, np.int64)
        self.exact = np.full((p, kappa + 1), np.inf, np.float32)

    def add(self, approx: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge candidates; returns (query, slot) of those that entered (their exact distance unset)."""
        keep = self.approx.shape[1]
        all_a = np.concatenate([self.approx, approx], axis=1)
        order = np.argsort(all_a, axis=1, kind="stable")[:, :keep]  # ties: earlier candidates first
        self.approx = np.take_along_axis(all_a, order, 1)
        self.index = np.take_along_axis(np.concatenate([self.index, index], axis=1), order, 1)
        self.exact = np.take_along_axis(
            np.concatenate([self.exact, np.full(approx.shape, np.inf, np.float32)], axis=1), order, 1)
        return np.nonzero((order >= keep) & (self.index >= 0))

    def result(self) -> TopK:
        order = np.lexsort((self.index, self.exact), axis=1)[:, : self.kappa]
        return TopK(np.take_along_axis(self.exact, order, 1), np.take_along_axis(self.index, order, 1))


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


def _merge(q, left, g, offset, top: _Top, norms=None) -> None:
    """One step: expanded distances of ``g`` (squared norms ``norms``, if known) by one product, the
    kappa smallest per query into ``top``, exact distances for those that entered (``g`` is at hand
    now, not later)."""
    dim = q.shape[1]
    right = np.empty((dim + 1, g.shape[0]), np.float32)
    np.multiply(g.T, np.float32(-2.0), out=right[:dim])
    right[dim] = np.einsum("ij,ij->i", g, g) if norms is None else norms
    d = left @ right  # |g|^2 - 2 q.g orders each row like the squared distance (|q|^2 is constant along it)
    cand, val = _smallest(d, min(top.kappa, g.shape[0]))
    pp, ss = top.add(val, cand + offset)
    diff = q[pp] - g[top.index[pp, ss] - offset]
    top.exact[pp, ss] = np.einsum("nd,nd->n", diff, diff)
