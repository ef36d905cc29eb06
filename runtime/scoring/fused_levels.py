"""The concatenated pyramid at per-level cost inside the fused kernel (``kernels/fused.c`` ``sf_levels``;
docs/speed.md, "The fused kernel at per-level cost").

The concatenated, upsampled pyramid costs sum_l C_l multiply-adds per pair of fine cells (176 for
EfficientNet-Lite0, 1792 for WRN50x2). Here only the fine level is multiplied per pair; a coarse level
enters through Nx = Q_l G_l,x^T, its native query cells against its gallery map upsampled along x only
(one BLAS product per gallery image and part of the query; wide levels at native x, the kernel making
the gallery's x taps), and the kernel blends Nx's rows with both sides' y taps and the query's x taps
into the block that starts the fine level's register tiles: about 3 multiply-adds per pair and coarse
level. Selection is sf_search's: each query row keeps :func:`.base.keep` (kappa) candidates by the
expanded distance in place, the distance matrix is never written; the kept candidates that may belong
(:meth:`LevelsSearch.bound`) are re-computed exactly from both sides' native levels
(``sf_exact_levels``), and :func:`.base.merge` decides.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..resample import interp_matrix, taps, upsample_map
from ..threads import compute_threads
from .base import Candidates, GalleryPyramids, TopK

PARTS = 2  # parts of the fine rows per thread: a core held a while by another process leaves less undone


READ, KERNEL, EXACT = (
    "gallery image read and packed (fine panels, coarse levels upsampled along x)",
    "kernel: coarse products (BLAS), blends, fine level and selection (threads)",
    "exact re-computation of the candidates that may belong",
)


# the taps on the fine grid, as _Coarse.taps holds them: sf_level and sf_source both carry them in this order
TAP_FIELDS = [(name, ctypes.c_void_p) for name in ("ya0", "ya1", "xb0", "xb1", "yw0", "yw1", "xw0", "xw1")]


class Level(ctypes.Structure):
    """kernels/fused.c's ``sf_level``: one coarse level's Nx rows and its taps on the fine grid."""

    _fields_ = [
        ("h", ctypes.c_int64),
        ("w", ctypes.c_int64),
        ("row0", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("ld", ctypes.c_int64),
        ("wn", ctypes.c_int64),
        ("nx", ctypes.c_void_p),
        *TAP_FIELDS,
        *[(name, ctypes.c_void_p) for name in ("gbase", "gidx", "gw")],
    ]


# coarse levels of at least this many channels take their products with the gallery at native x, the kernel
# making the x taps (the product w / W the size: WRN50x2 on AVX2 0.37 -> 0.33 s CPU at K = 5; Lite0 on
# AVX-512 K = 5 median 46.7-47.2 -> 40.0-43.4 ms, AVX2 level); tests set it past every level for Gx
NATIVE_X = 1


class Source(ctypes.Structure):
    """kernels/fused.c's ``sf_source``: a native level map and its taps on the fine grid (none at the fine grid)."""

    _fields_ = [
        ("g", ctypes.c_void_p),
        ("h", ctypes.c_int64),
        ("w", ctypes.c_int64),
        ("c", ctypes.c_int64),
        *TAP_FIELDS,
    ]


def declare(lib: ctypes.CDLL) -> None:
    """The argument types of ``sf_levels``, ``sf_exact_levels`` and ``sf_pack_rows`` (kernels/fused.c)."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.sf_levels.argtypes = [i64, i64, i64, i64, i64, p, i64, p, p, i32, p, i64, i32, p, p, p]
    lib.sf_levels.restype = None
    lib.sf_exact_levels.argtypes = [i64, p, p, i64, i32, p, p, p, p]
    lib.sf_exact_levels.restype = None
    lib.sf_pack_rows.argtypes = [p, i64, i64, i64, p, i64, p, p]
    lib.sf_pack_rows.restype = None


class _Coarse:
    """A coarse level of the query: its native rows, its taps along both axes of the fine grid, and how the
    gallery side of its products is made: at native resolution, the kernel making the x taps by lane
    permutations (``groups``; the product w / W of the size), or where a lane group's taps span more
    than a permutation reaches, upsampled along x before the product (Gx, ``x_up``)."""

    def __init__(self, q: np.ndarray, grid: tuple[int, int], wpad: int, vw: int):
        big_h, big_w = grid
        self.h, self.w, self.c = q.shape
        self.q = np.ascontiguousarray(q, np.float32).reshape(self.h * self.w, self.c)
        y0, y1, yw0, yw1 = taps(big_h, self.h)
        x0, x1, xw0, xw1 = taps(big_w, self.w)
        self.taps = [np.ascontiguousarray(a, np.int32) for a in (y0, y1, x0, x1)] + [
            np.ascontiguousarray(a, np.float32) for a in (yw0, yw1, xw0, xw1)
        ]
        self.x_up = np.zeros((wpad, self.w), np.float32)
        self.x_up[:big_w] = interp_matrix(big_w, self.w)
        self.wpad = wpad
        self.groups = _groups(x0, x1, xw0, xw1, big_w, wpad, vw) if self.c >= NATIVE_X and self.w <= 256 else None
        self.wn = self.w if self.groups is not None else wpad  # gallery columns of a product row

    def rows(self, qy0: int, qy1: int) -> tuple[int, int]:
        """The native query rows that fine rows [qy0, qy1) read."""
        return int(self.taps[0][qy0:qy1].min()), int(self.taps[1][qy0:qy1].max()) + 1

    def scratch_rows(self, qy0: int, qy1: int) -> int:
        """Rows of wpad floats the kernel works in for fine rows [qy0, qy1): Nx with the gallery's y taps
        (the native query cells they read), and the block with the query's y taps (w)."""
        r0, r1 = self.rows(qy0, qy1)
        return (r1 - r0 + 1) * self.w

    def gallery_side(self, g: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """(h, C, columns) of a gallery map for the product: the map itself (native x), or upsampled along x
        into ``out``; transposed views, which BLAS reads in place (a copy cost 4 ms an image at WRN50x2)."""
        return (g if self.groups is not None else np.matmul(self.x_up, g, out=out)).transpose(0, 2, 1)

    def level(self, nx: np.ndarray, row0: int) -> Level:
        cells = nx.shape[1]
        tables = [None, None, None] if self.groups is None else [a.ctypes.data for a in self.groups]
        return Level(
            self.h,
            self.w,
            row0,
            cells // self.w,
            cells * self.wn,
            self.wn,
            nx.ctypes.data,
            *[a.ctypes.data for a in self.taps],
            *tables,
        )


def _groups(x0, x1, xw0, xw1, big_w: int, wpad: int, vw: int) -> tuple[np.ndarray, ...] | None:
    """Per group of ``vw`` fine columns: the first native column its taps read, each lane's two taps from
    there, and their weights (zero past the fine width); None where a group's taps span more than ``vw``
    native columns (a lane permutation reaches ``vw``)."""
    groups = wpad // vw
    base = np.zeros(groups, np.int32)
    idx = np.zeros((groups, 2, vw), np.int32)
    weight = np.zeros((groups, 2, vw), np.float32)
    for g in range(groups):
        cols = np.arange(g * vw, min((g + 1) * vw, big_w))
        if not len(cols):
            continue
        base[g] = x0[cols].min()
        idx[g, 0, : len(cols)], idx[g, 1, : len(cols)] = x0[cols] - base[g], x1[cols] - base[g]
        weight[g, 0, : len(cols)], weight[g, 1, : len(cols)] = xw0[cols], xw1[cols]
    if idx.max() >= vw:
        return None
    return base, idx.reshape(-1), weight.reshape(-1)


class LevelsSearch:
    """One query pyramid's search over gallery images by ``sf_levels``, the fine rows split among threads."""

    def __init__(self, lib: ctypes.CDLL, query: list[np.ndarray], grid: tuple[int, int], kappa: int, clock):
        self.lib, self.grid, self.kappa, self.clock = lib, (int(grid[0]), int(grid[1])), kappa, clock
        big_h, big_w = self.grid
        step = int(lib.sf_width())  # whole panels: the kernel takes an odd one at a row's end
        self.wpad = -(-big_w // step) * step
        query = [np.ascontiguousarray(x, np.float32) for x in query]  # sf_exact_levels reads them in place
        self.query = query
        self.fine = [x.shape[:2] == self.grid for x in query]
        self.qf = np.ascontiguousarray(
            np.concatenate([x for x, f in zip(query, self.fine) if f], axis=2).reshape(big_h * big_w, -1)
        )
        self.cf = self.qf.shape[1]
        self.coarse = [_Coarse(x, self.grid, self.wpad, step) for x, f in zip(query, self.fine) if not f]
        # each level's taps on the fine grid for the exact distances (sf_exact_levels), None at the fine grid
        coarse = iter(self.coarse)
        self.taps = [None if f else next(coarse).taps for f in self.fine]
        self.q_sources = self.sources(query)
        if len(self.coarse) > 8:
            raise ValueError(f"the fused kernel takes at most 8 coarse levels, this pyramid has {len(self.coarse)}")
        self.top = Candidates(big_h * big_w, kappa)  # keep(kappa) slots a row, filled in place by the kernel
        threads = max(1, min(compute_threads(), big_h))
        n = min(big_h, PARTS * threads) if threads > 1 else 1
        cuts = [big_h * t // n for t in range(n + 1)]
        self.parts = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        self.scratch = [
            np.empty((big_w + sum(c.scratch_rows(a, b) for c in self.coarse)) * self.wpad, np.float32)
            for a, b in self.parts
        ]
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.pending: list[Future] = []
        # buffers kept for the whole search: per part, each coarse level's Nx (h, its native query cells, wpad);
        # two sets of packed operands (_pack)
        self.nx = [
            [np.empty((c.h, (c.rows(a, b)[1] - c.rows(a, b)[0]) * c.w, c.wn), np.float32) for c in self.coarse]
            for a, b in self.parts
        ]
        self.buffers = [
            (
                np.empty(big_h * self.wpad * self.cf, np.float32),
                np.empty(big_h * self.wpad, np.float32),
                [None if c.groups is not None else np.empty((c.h, self.wpad, c.c), np.float32) for c in self.coarse],
            )
            for _ in range(2)
        ]
        self.turn = 0

    def add(self, levels: list[np.ndarray], norms: np.ndarray, base: int) -> None:
        """Offer one gallery image's cells (indices base..) to every query row's list; returns once the
        kernel has run on the image before it. The next image's packing, on the calling thread, overlaps this
        one's kernel, on the pool's; :meth:`wait` for the last."""
        operands = self._pack(levels, norms)
        self.clock.lap(READ)
        self.wait()  # the lists of a row are the previous image's until its part has run
        self.pending = [self._launch(t, operands, base) for t in range(len(self.parts))]

    def wait(self) -> None:
        """Until the kernel has run on every image offered."""
        for f in self.pending:
            f.result()
        self.pending = []
        self.clock.lap(KERNEL)

    def _pack(self, levels: list[np.ndarray], norms: np.ndarray) -> tuple:
        """One gallery image's operands: fine panels, their squared norms, each coarse level upsampled along x."""
        big_h, big_w = self.grid
        wpad, cf, vw = self.wpad, self.cf, int(self.lib.sf_width())
        levels = [np.asarray(x, np.float32) for x in levels]
        shapes = [x.shape for x in self.query]
        if [x.shape for x in levels] != shapes:
            raise ValueError(f"gallery image has levels {[x.shape for x in levels]}, expected {shapes}")
        fine = [x for x, f in zip(levels, self.fine) if f]
        gf = np.ascontiguousarray(fine[0] if len(fine) == 1 else np.concatenate(fine, axis=2))
        fine_norms = np.ascontiguousarray(norms, np.float32)
        # two sets of buffers, taken in turn: one image packed while the kernel reads the other, and no fresh
        # pages to fault in per image (WRN50x2: 1-2 ms an image)
        self.turn ^= 1
        panels, pnorms, gx_out = self.buffers[self.turn]
        self.lib.sf_pack_rows(
            gf.ctypes.data, big_h, big_w, cf, fine_norms.ctypes.data, wpad // vw, panels.ctypes.data, pnorms.ctypes.data
        )
        gx = [
            c.gallery_side(g, out)
            for c, g, out in zip(self.coarse, (x for x, f in zip(levels, self.fine) if not f), gx_out)
        ]
        return panels, pnorms, gx

    def _launch(self, t: int, operands: tuple, base: int) -> Future:
        """Part t of the fine rows against one image's ``operands``, on the pool (or here, done, without one)."""
        panels, pnorms, gx = operands
        big_h, big_w = self.grid
        top, lib = self.top, self.lib

        def part() -> None:
            qy0, qy1 = self.parts[t]
            descs = []
            for c, g, nx in zip(self.coarse, gx, self.nx[t]):
                r0, _ = c.rows(qy0, qy1)
                np.matmul(c.q[r0 * c.w : r0 * c.w + nx.shape[1]], g, out=nx)  # per y a block read whole
                descs.append(c.level(nx, r0))
            arr = (Level * max(1, len(descs)))(*descs)
            lib.sf_levels(
                qy0, qy1, big_h, big_w, self.wpad, self.qf.ctypes.data, self.cf, panels.ctypes.data,
                pnorms.ctypes.data, len(descs), arr, base, top.approx.shape[1], top.approx.ctypes.data,
                top.index.ctypes.data, self.scratch[t].ctypes.data,
            )  # fmt: skip

        if self.pool is not None:
            return self.pool.submit(part)
        done: Future = Future()
        part()
        done.set_result(None)
        return done

    def close(self) -> None:
        """Wait for the kernel and let the pool go (also after an error: no part left running)."""
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            if self.pool is not None:
                self.pool.shutdown()

    def bound(self, kept: list[np.ndarray], reach: np.ndarray) -> np.ndarray:
        """Per kept candidate, a bound on |kept value - exact expanded distance| (float32, like ``approx``).
        ``kept``: each image's squared norms (float64), ``reach``: each image's :func:`.pyramid.reach`.

        gamma_n (|Ug|^2 + 2 A_i R): n bounds every sum's terms (the coarse products, their y and x blends,
        the fine channels on top, the levels), A_i >= sqrt(sum_l (sum_taps w |q_l|)^2) (the query's taps
        are blended after the products), R >= sqrt(sum_l max |g_l|^2) (Cauchy-Schwarz over the levels)."""
        top, grid = self.top, self.grid
        p = grid[0] * grid[1]
        n = max([c.c for c in self.coarse], default=0) + self.cf + len(self.coarse) + 16
        gamma = n * 2.0**-24 / (1 - n * 2.0**-24) + 2.0**-23
        a_sq = np.einsum("ij,ij->i", self.qf, self.qf, dtype=np.float64)
        for c in self.coarse:
            native = np.sqrt(np.einsum("ij,ij->i", c.q, c.q, dtype=np.float64)).reshape(c.h, c.w)
            a_sq += upsample_map(native.astype(np.float32), *grid).astype(np.float64).ravel() ** 2
        safe = np.where(top.index >= 0, top.index, 0)
        g_sq = np.concatenate(kept)[safe]  # kept: each image's p norms, in image order
        # 1 + 2^-20: the fp32 upsampling of the native norms, a convex blend, rounds them by far less
        error = gamma * (g_sq + 2 * np.sqrt(a_sq)[:, None] * (1 + 2.0**-20) * reach[safe // p])
        return error.astype(np.float32)

    def sources(self, levels: list[np.ndarray]) -> ctypes.Array:
        """``sf_source`` of each level map (float32, C order: the caller keeps them alive)."""
        out = (Source * len(levels))()
        for i, (x, tap) in enumerate(zip(levels, self.taps)):
            h, w, c = x.shape
            out[i] = Source(x.ctypes.data, h, w, c, *([None] * 8 if tap is None else [a.ctypes.data for a in tap]))
        return out

    def exact(self, view: GalleryPyramids, which: np.ndarray) -> np.ndarray:
        """Exact squared distances of the candidates ``which`` (inf elsewhere), each image read once."""
        top, (_, big_w) = self.top, self.grid
        p = self.grid[0] * big_w
        out = np.full(top.index.shape, np.inf, np.float32)
        flat = np.flatnonzero(which)
        order = np.argsort(top.index.ravel()[flat], kind="stable")  # image by image
        flat = flat[order]
        rows = (flat // which.shape[1]).astype(np.int64)
        image, cell = np.divmod(top.index.ravel()[flat], p)
        cuts = np.flatnonzero(np.diff(image)) + 1
        work = np.empty(2 * max(x.shape[2] for x in self.query), np.float64)
        d = np.empty(len(flat), np.float32)
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(flat)]):
            levels = [np.ascontiguousarray(x, np.float32) for x in view[int(image[a])]]
            r, c = rows[a:b], np.ascontiguousarray(cell[a:b])
            self.lib.sf_exact_levels(
                b - a, r.ctypes.data, c.ctypes.data, big_w, len(levels), self.q_sources, self.sources(levels),
                work.ctypes.data, d[a:].ctypes.data,
            )  # fmt: skip
        out.ravel()[flat] = d
        return out

    def result(self, view: GalleryPyramids, kept: list[np.ndarray], reach: np.ndarray) -> TopK:
        """The kappa nearest: the kept candidates that may belong (:meth:`bound`) re-computed exactly
        (:meth:`exact`), then :func:`.base.merge`."""
        top = self.top
        top.exact = self.exact(view, top.may_belong(self.bound(kept, reach)))
        self.clock.lap(EXACT)
        return top.result()
