"""CPU scorer: distances by BLAS matrix products over bounded blocks, candidates kept and decided
as every scorer does (scoring/base.py: :func:`.base.keep` of them by the expanded distance, exact
re-computation, :func:`.base.merge`): the |q|^2 - 2 q.g + |g|^2 expansion loses digits when
neighbours are close, the re-computation does not."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .base import (
    Candidates,
    GalleryPyramids,
    GalleryRows,
    PixelScorer,
    TopK,
    concat_upsampled,
    smallest,
)
from .pyramid import PyramidSlabs, contraction, exact_distances, upsampled_sqnorms
from .pyramid import reach as pyramid_reach

# the per-level path pays when its product's contraction (fine channels plus the coarse native
# cells each slab reads) is below this share of the concatenated channels: WRN50x2 (~410 of 1792)
# takes it, the narrow EfficientNet-Lite0 pyramid (~190 of 176) does not; see docs/speed.md
PER_LEVEL_SHARE = 0.5


class NumpyScorer(PixelScorer):
    """Exact top-kappa on the CPU; holds at most ``block_bytes`` of distances at a time.
    ``stats["path"]``: "fp32" (one product over upsampled rows) or "fp32 levels" (the concatenated
    pyramid at per-level cost)."""

    name = "numpy"

    def __init__(self, block_bytes: int = 8 << 20):  # a distance block of ~8 MB: near the cache, big enough for BLAS
        super().__init__()
        self.block_bytes = int(block_bytes)

    def topk(self, query: np.ndarray, gallery: GalleryRows | Iterable[np.ndarray], kappa: int) -> TopK:
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        view = GalleryRows.of(gallery)
        q = np.ascontiguousarray(query, np.float32)
        p, dim = q.shape
        left = np.empty((p, dim + 1), np.float32)  # [q | 1] against [-2 g^T ; |g|^2]: one product, no pass
        left[:, :dim], left[:, dim] = q, 1.0
        top = Candidates(p, kappa)
        rows_per_step = max(1, self.block_bytes // (4 * max(p, 1)))
        offset = 0
        for j in range(len(view)):
            block = view[j]
            if block.ndim != 2 or block.shape[1] != dim:
                raise ValueError(f"gallery block has shape {block.shape}, expected (M, {dim})")
            norms = view.sqnorms(j, block) if view.keeps_norms else None
            if norms is not None and len(norms) != len(block):
                raise ValueError(f"gallery block {j} has {len(block)} rows but {len(norms)} kept norms")
            for s in range(0, block.shape[0], rows_per_step):
                g = np.asarray(block[s : s + rows_per_step], np.float32)  # widen one step only
                _merge(q, left, g, offset + s, top, None if norms is None else norms[s : s + rows_per_step])
            offset += block.shape[0]
        if offset < kappa:
            raise ValueError(f"gallery has {offset} features, fewer than kappa = {kappa}")
        self.stats = {"path": "fp32"}
        return top.result()

    def topk_pyramid(self, query, gallery, grid, kappa):
        """Exact concatenated-pyramid distances at per-level cost (docs/speed.md):
        ||concat_l U_l q_l - concat_l U_l g_l||^2 = |Uq|^2 + |Ug|^2 - 2 sum_l U_l Q_l G_l^T U_l^T,
        with U_l the bilinear upsampling of level l: coarse levels' dot products are taken at native
        resolution and interpolated inside one product per slab of gallery rows (:class:`PyramidSlabs`),
        so the P x P distance matrix is never formed. Candidates are ranked by the expanded distance
        and re-computed exactly at the end (the view is indexed a second time); the gallery's norms
        of image j come from the view (:meth:`.base.GalleryView.sqnorms`)."""
        view = GalleryPyramids.of(gallery, grid)
        slabs = PyramidSlabs(query, grid, rows=4)
        if not uses_levels(query, grid, slabs):
            return super().topk_pyramid(query, view, grid, kappa)  # narrow pyramids: the plain GEMM wins
        p = slabs.p
        top = Candidates(p, kappa)
        kept, reach = [], np.empty(len(view))
        for j in range(len(view)):
            levels = view[j]
            norms = view.sqnorms(j, levels)
            found = [smallest(d, min(kappa, d.shape[1])) + (start,) for start, d in slabs(levels, norms)]
            top.add(
                np.concatenate([val for _, val, _ in found], axis=1),
                np.concatenate([idx + (j * p + start) for idx, _, start in found], axis=1),
            )
            kept.append(np.asarray(norms, np.float64))
            reach[j] = pyramid_reach([np.asarray(x, np.float32) for x in levels])
        if len(view) * p < kappa:
            raise ValueError(f"gallery has {len(view) * p} features, fewer than kappa = {kappa}")
        # re-compute exactly the candidates that may belong: the expanded distance's rounding is at most
        # gamma_n (|Ug|^2 + 2 |Uq| R), n the terms of its longest sum, R >= every |g_l| tap it reads
        n = max(x.shape[2] for x in query) + slabs.contraction + 4
        gamma = n * 2.0**-24 / (1 - n * 2.0**-24) + 2.0**-23
        safe = np.where(top.index >= 0, top.index, 0)
        image, cell = np.divmod(safe, p)
        g_sq = np.stack(kept).reshape(-1)[image * p + cell]
        error = gamma * (g_sq + 2 * np.sqrt(upsampled_sqnorms(query, grid))[:, None] * reach[image])
        top.exact = exact_distances(concat_upsampled(query, grid), view, grid, top.index, top.may_belong(error))
        self.stats = {"path": "fp32 levels"}
        return top.result()


def uses_levels(query: list[np.ndarray], grid: tuple[int, int], slabs: PyramidSlabs | None = None) -> bool:
    """Whether the concatenated pyramid of ``query`` (level maps) on ``grid`` takes the per-level-cost
    path (PER_LEVEL_SHARE) rather than the plain search of upsampled rows."""
    if slabs is None:  # the width alone: no slab weights made for a search that may not use them
        query = [np.asarray(q) for q in query]
        c_fine = sum(q.shape[2] for q in query if tuple(q.shape[:2]) == tuple(grid))
        return bool(c_fine) and contraction(query, grid, 4) < PER_LEVEL_SHARE * sum(q.shape[2] for q in query)
    return bool(slabs.c_fine) and slabs.contraction < PER_LEVEL_SHARE * sum(q.shape[2] for q in query)


def _merge(q, left, g, offset, top: Candidates, norms=None) -> None:
    """One step: expanded distances of ``g`` (squared norms ``norms``, if known) by one product, the
    kappa smallest per query into ``top``, exact distances for those that entered (``g`` is at hand
    now, not later)."""
    dim = q.shape[1]
    right = np.empty((dim + 1, g.shape[0]), np.float32)
    np.multiply(g.T, np.float32(-2.0), out=right[:dim])
    right[dim] = np.einsum("ij,ij->i", g, g) if norms is None else norms
    d = left @ right  # |g|^2 - 2 q.g orders each row like the squared distance (|q|^2 is constant along it)
    cand, val = smallest(d, min(top.kappa, g.shape[0]))
    pp, ss = top.add(val, cand + offset)
    diff = q[pp] - g[top.index[pp, ss] - offset]
    top.exact[pp, ss] = np.einsum("nd,nd->n", diff, diff)
