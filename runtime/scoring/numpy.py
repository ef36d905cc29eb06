"""CPU scorer: distances by BLAS matrix products over bounded blocks, a running top-kappa, and
exact re-computation of the kept distances (the |q|^2 - 2 q.g + |g|^2 expansion loses digits
when neighbours are close, the re-computation does not)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..resample import interp_matrix, taps
from .base import PixelScorer, TopK, concat_upsampled

# a coarse level's interpolated dot products cost about as much as a GEMM with this many channels
# (memory-bound passes over a grid x grid matrix): Lite0 (24 + 2 x 64 > 0.8 x 176) stays on the plain
# product, WRN50x2 (256 + 2 x 64 < 0.8 x 1792) takes the per-level path; see docs/speed.md
INTERP_CHANNELS = 64


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
        ||concat_l U_l q_l - concat_l U_l g_l||^2 = |Uq|^2 + |Ug|^2 - 2 sum_l (U_l Q_l) G_l^T U_l^T,
        with U_l the bilinear upsampling of level l. Gallery-side upsampling of the coarse levels'
        dot products runs along rows of the fine grid, a few rows at a time, so the P x P distance
        matrix is never formed (each slab stays in cache)."""
        big_h, big_w = grid
        fine = [q.shape[:2] == tuple(grid) for q in query]
        d_all = sum(q.shape[2] for q in query)
        c_fine = sum(q.shape[2] for q, f in zip(query, fine) if f)
        if not c_fine or c_fine + INTERP_CHANNELS * (len(query) - sum(fine)) >= 0.8 * d_all:
            return super().topk_pyramid(query, images, grid, kappa)  # narrow pyramids: the plain GEMM wins
        p = big_h * big_w
        q_up = concat_upsampled(query, grid)  # (P, D): norms and exact distances of the candidates
        q_fine = np.ascontiguousarray(np.concatenate([q.reshape(p, -1) for q, f in zip(query, fine) if f], axis=1))
        q_coarse = [(i, np.ascontiguousarray(q_up[:, _channel_slice(query, i)])) for i, f in enumerate(fine) if not f]
        rows = max(1, min(big_h, (2 << 20) // (4 * p * big_w)))  # fine-grid rows per slab: ~2 MB, stays in cache
        best_d = np.full((p, kappa), np.inf, np.float32)
        best_i = np.full((p, kappa), -1, np.int64)
        tmp = np.empty((p, big_w), np.float32)
        offset = 0
        for g in images:
            g_up = concat_upsampled(g, grid)
            b = np.einsum("ij,ij->i", g_up, g_up).reshape(big_h, big_w)
            g_fine = np.concatenate([g[i] for i, f in enumerate(fine) if f], axis=2).reshape(p, -1)
            # coarse level l: T[p, y, X] = sum_x <(U q)_p, g_(y,x)> A_w[X, x]; rows y -> Y in the slabs below
            coarse = []
            for i, qc in q_coarse:
                h, w, c = g[i].shape
                t = ((qc @ g[i].reshape(h * w, c).T).reshape(p * h, w) @ interp_matrix(big_w, w).T).reshape(p, h, big_w)
                coarse.append((t, taps(big_h, h)))
            cand_d = np.full((p, kappa), np.inf, np.float32)
            cand_i = np.full((p, kappa), -1, np.int64)
            for y0 in range(0, big_h, rows):
                y1 = min(y0 + rows, big_h)
                slab = q_fine @ g_fine[y0 * big_w : y1 * big_w].T  # (P, r * W): the fine levels
                slab3 = slab.reshape(p, y1 - y0, big_w)
                for t, (i0, i1, w0, w1) in coarse:
                    for r, y in enumerate(range(y0, y1)):  # two source rows per fine row
                        slab3[:, r] += np.multiply(t[:, i0[y]], w0[y], out=tmp)
                        if w1[y]:
                            slab3[:, r] += np.multiply(t[:, i1[y]], w1[y], out=tmp)
                slab *= -2.0
                slab += b[y0:y1].reshape(1, -1)
                idx, val = _smallest(slab, min(kappa, slab.shape[1]))
                cand_d, cand_i = _keep(cand_d, cand_i, val, idx + y0 * big_w)
            diff = q_up[:, None, :] - g_up[cand_i]  # exact distances of this image's candidates
            best_d, best_i = _keep(best_d, best_i, np.einsum("pkd,pkd->pk", diff, diff), cand_i + offset)
            offset += p
        return TopK(best_d, best_i)


def _channel_slice(levels, i) -> slice:
    start = sum(x.shape[2] for x in levels[:i])
    return slice(start, start + levels[i].shape[2])


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
