"""GPU scorer: cuBLAS dot products (through CuPy) over bounded tiles of each gallery block, the
running top list of kernels/topk.cu on the device, and the candidate policy of every scorer
(scoring/base.py): :func:`.base.keep` candidates per block by the expanded distance, re-computed
exactly (the |q|^2 + |g|^2 - 2 q.g expansion loses digits when neighbours are close; differences
do not), decided by :func:`.base.merge`.

CuPy is imported on first use, never at module import, so that this module imports everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import require
from .base import GalleryRows, PixelScorer, TopK, keep, merge

KERNEL_SOURCE = Path(__file__).parent / "kernels" / "topk.cu"
KERNEL_NAME = "topk_tile"
THREADS = 128  # threads per block, one query row each


class CudaScorer(PixelScorer):
    """Exact top-kappa on an NVIDIA GPU; holds at most about ``tile_bytes`` of dot products (and of
    candidate differences) at a time, besides the query and the current gallery block."""

    name = "cuda"

    def __init__(self, tile_bytes: int = 64 << 20, device_id: int = 0):
        super().__init__()
        self.tile_bytes = int(tile_bytes)
        self.device_id = int(device_id)
        self._cp = None
        self._kernel = None

    def _load(self):
        if self._kernel is None:
            cp = require("cupy", "gpu", "The CUDA pixel scorer")
            # the same .cu is compiled by nvcc in CI and by g++ in the CPU tests: one source
            self._kernel = cp.RawModule(code=KERNEL_SOURCE.read_text()).get_function(KERNEL_NAME)
            self._cp = cp
        return self._cp, self._kernel

    def topk(self, query: np.ndarray, gallery: GalleryRows | Iterable[np.ndarray], kappa: int) -> TopK:
        # the view's kept norms are not used: on the device they are a reduction next to each tile's product
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        cp = require("cupy", "gpu", "The CUDA pixel scorer")
        # CuPy's current device is per thread: make ours current in whichever thread scores
        with cp.cuda.Device(self.device_id):
            top = self._topk(query, GalleryRows.of(gallery), kappa)
        self.stats = {"path": "cuda"}
        return top

    def _topk(self, query: np.ndarray, blocks: GalleryRows, kappa: int) -> TopK:
        cp, kernel = self._load()
        # fp32 on the device: the kernel reads fp32 dot products, and fp16 GEMM outputs would lose
        # exactly the digits that rank close neighbours
        q = cp.asarray(np.ascontiguousarray(query, np.float32))
        p, dim = q.shape
        qn = (q * q).sum(axis=1)
        best_d = cp.full((p, kappa), cp.inf, dtype=cp.float32)
        best_i = cp.full((p, kappa), -1, dtype=cp.int64)
        n_keep = keep(kappa)  # each block's candidates by the expanded distance, before exact re-scoring
        cols = max(1, self.tile_bytes // (4 * max(p, 1)))  # gallery rows per tile
        grid = (p + THREADS - 1) // THREADS
        offset = 0
        for block in blocks:
            if block.ndim != 2 or block.shape[1] != dim:
                raise ValueError(f"gallery block has shape {block.shape}, expected (M, {dim})")
            m = block.shape[0]
            if p and m:
                g = cp.asarray(block)  # uploaded as stored: int8/fp16 cross the bus at their own size
                cand_d = cp.full((p, n_keep), cp.inf, dtype=cp.float32)
                cand_i = cp.full((p, n_keep), -1, dtype=cp.int64)
                for s in range(0, m, cols):
                    gt = g[s : s + cols].astype(cp.float32)  # widened one tile at a time
                    gn = (gt * gt).sum(axis=1)
                    # (w, P) = the transpose of the (P, w) tile: at each gallery column the threads
                    # of a warp (consecutive query rows) then read consecutive addresses
                    dots_t = cp.ascontiguousarray(cp.matmul(gt, q.T))
                    stride_m, stride_p = (st // 4 for st in dots_t.strides)
                    # scalars as numpy types of the kernel's C types (a Python int would be passed
                    # as long long whatever the parameter is)
                    kernel(
                        (grid,),
                        (THREADS,),
                        (
                            dots_t,
                            np.int64(stride_p),
                            np.int64(stride_m),
                            qn,
                            gn,
                            np.int32(p),
                            np.int32(gt.shape[0]),
                            np.int64(offset + s),
                            cand_d,
                            cand_i,
                            np.int32(n_keep),
                        ),
                    )
                cand_d = self._exact(cp, q, g, cand_i, offset)
                best_d, best_i = merge([best_d, cand_d], [best_i, cand_i], kappa, xp=cp)
            offset += m
        if offset < kappa:
            raise ValueError(f"gallery has {offset} features, fewer than kappa = {kappa}")
        return TopK(cp.asnumpy(best_d), cp.asnumpy(best_i))

    def _exact(self, cp, q, g, cand_i, offset: int):
        """Squared distances of the candidates ``cand_i`` (global indices, -1 = none) of block ``g``
        computed from the differences, in slabs of query rows of about ``tile_bytes``."""
        p, kappa = cand_i.shape
        valid = cand_i >= 0
        local = cand_i - offset
        local[~valid] = 0  # a block shorter than kappa leaves empty slots; any row will do for them
        out = cp.empty((p, kappa), dtype=cp.float32)
        rows = max(1, self.tile_bytes // (4 * kappa * q.shape[1]))
        for a in range(0, p, rows):
            diff = q[a : a + rows, None, :] - g[local[a : a + rows]].astype(cp.float32)  # (rows, kappa, D)
            out[a : a + rows] = (diff * diff).sum(axis=2)
        out[~valid] = cp.inf
        return out
