"""The screens behind :class:`.amx.AmxScorer`: bf16 operands for ``kernels/amx_screen.c``, the
running lists it fills, and the bounds that settle which candidates may belong (docs/speed.md,
"The AMX screen").

Each screened value is the lower bound ``expanded - e_i |g_j|`` of an expanded distance |g|^2 - 2 q.g
(query row i, gallery row or cell j): the fine operands are rounded to bf16 once, so the products
move by at most e_i |g_j|, e_i = BF16 * 2 |q_i|; the rest of the error, c_i, does not depend on j
(coarse operands in two bf16 parts or as fp32 taps, fp32 sums). Everything is centred on the query's mean first:
distances do not move, products and their rounding shrink.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..resample import taps, upsample_map
from ..threads import compute_threads
from .base import TopK
from .pyramid import PyramidSlabs, upsampled_sqnorms

U, F32 = 2.0**-8, 2.0**-24  # unit roundoffs of bf16 and fp32 (round to nearest even)
NATIVE64 = 256  # coarse levels with at most this many cells take their native products in float64


def factors(k: int) -> tuple[float, float, float]:
    """Relative error bounds of a k-term sum of products in fp32, against the sum of the products'
    magnitudes: both operands rounded to bf16 once; a two-part (hi + lo) left operand with an exact
    right one; both operands in two parts, three products (hi hi + hi lo + lo hi)."""
    gamma = k * F32
    return 2 * U + U * U + gamma, U * U + gamma, 4 * U * U + 1.01 * gamma


def up(n: int, to: int = 32) -> int:
    return -(-n // to) * to


def ptr(x: np.ndarray) -> int:
    return x.ctypes.data


def bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even bf16, as uint16 bits (like the kernel)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def aligned(shape, dtype, fill=0) -> np.ndarray:
    """A new array on a 64-byte boundary (numpy gives 16): a tile row that straddles two cache lines
    loads at half speed."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + size].view(dtype).reshape(shape)
    out[...] = fill
    return out


def parts(rows: np.ndarray, three: bool = False) -> np.ndarray:
    """(p, k) float32 rows as the kernel's A operand, bf16 bits with k padded to 32: the rows rounded
    once, or (``three``) their hi, hi and lo parts side by side (to meet B's hi, lo, hi)."""
    p, k = rows.shape
    hi = np.zeros((p, up(k)), np.uint16)
    hi[:, :k] = bf16(rows)
    if not three:
        return hi
    lo = np.zeros_like(hi)
    lo[:, :k] = bf16(rows - (hi[:, :k].astype(np.uint32) << 16).view(np.float32))
    return np.concatenate([hi, hi, lo], axis=1)


def tiled(bits: np.ndarray, n_rows: int) -> np.ndarray:
    """(p, k) bf16 bits, k a multiple of 32, as A tiles: n_rows (a multiple of 32, zero past p) by k,
    each 16 x 32 tile contiguous."""
    p, k = bits.shape
    a = np.zeros((n_rows, k), np.uint16)
    a[:p] = bits
    out = aligned((n_rows // 16, k // 32, 16, 32), np.uint16)
    out[...] = a.reshape(n_rows // 16, 16, k // 32, 32).transpose(0, 2, 1, 3)
    return out


class Window(ctypes.Structure):
    """kernels/amx_screen.c's ``window``: a coarse level's native products and what the slabs read of them."""

    _fields_ = [
        ("m", ctypes.c_void_p),
        ("lds", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("at", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("starts", ctypes.c_void_p),
        ("k_pad", ctypes.c_int64),
        ("b", ctypes.c_void_p),
        ("rowmax", ctypes.c_void_p),
        ("parts", ctypes.c_int64),
        ("runs", ctypes.c_void_p),
        ("run_at", ctypes.c_void_p),
        ("tap_cell", ctypes.c_void_p),
        ("tap_w", ctypes.c_void_p),
    ]


GAP = 1  # runs of pairs closer than this many zero pairs are read as one (a run's start costs about a pair)


def tile_runs(weights: np.ndarray, n_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The runs of window pairs (cells 2k, 2k + 1) that each 16-column B tile of one slab reads: ``weights``
    (window cells, slab columns) is B before packing. (runs as [k0, k1) pairs, each tile's first run and,
    last, the end): pairs outside a tile's runs are zero in all its columns, so the kernel skips them
    without changing a sum (docs/speed.md)."""
    cells, cols = weights.shape
    nz = np.zeros((up(cells, 2), n_pad), bool)
    nz[:cells, :cols] = weights != 0
    used = np.asarray(nz.reshape(-1, 2, n_pad // 16, 16).any(axis=(1, 3)))  # (pairs, tiles)
    runs: list[int] = []
    at = [0]
    for t in range(n_pad // 16):
        k = np.flatnonzero(used[:, t])
        if k.size:
            cut = np.flatnonzero(np.diff(k) > GAP + 1)  # a gap of more than GAP zero pairs starts a new run
            for a, b in zip(np.r_[k[0], k[cut + 1]], np.r_[k[cut], k[-1]]):
                runs += [int(a), int(b) + 1]
        at.append(len(runs) // 2)
    return np.array(runs, np.int32).reshape(-1, 2), np.array(at, np.int64)


def column_taps(weights: np.ndarray, n_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The coarse window of one slab as taps (the AVX-512 kernel's parts = 0): ``weights`` (window cells, slab
    columns) has at most four nonzero cells a column (bilinear). Per column of the n_pad: four window cells and
    their weights, (n_pad, 4) each; weight 0 and cell 0 past a column's taps."""
    cells, cols = weights.shape
    col, cell = np.nonzero(weights.T)  # by column, then cell
    count = np.bincount(col, minlength=n_pad)
    if count.size and count.max() > 4:
        raise ValueError(f"a column reads {count.max()} native cells: not bilinear taps")
    tap = np.arange(col.size) - (np.cumsum(count) - count)[col]  # the rank of each cell in its column
    at, wt = np.zeros((n_pad, 4), np.int32), np.zeros((n_pad, 4), np.float32)
    at[col, tap], wt[col, tap] = cell, weights[cell, col]
    return at, wt


class Screen:
    """A screen's running lists (m per query row), their bounds, and the threads that fill them.
    Subclasses make the operands of each gallery item and call :meth:`_run`; ``label`` names the
    kernel's part of the time (the back-end's)."""

    label = "AMX screen: bf16 tiles, products, selection (threads)"

    def __init__(self, lib, p: int, m: int, q_fine: np.ndarray, three: bool = False):
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}  # where the time went, by part (bench speed's profile)
        self.lib, self.p, self.m, self.three = lib, p, m, three
        self.rows = up(p)
        bits = parts(q_fine, three)
        self.k_fine = bits.shape[1]
        self.a_fine = tiled(bits, self.rows)
        self.q_norm = np.linalg.norm(q_fine, axis=1).astype(np.float64)
        self.vals = np.full((self.rows, m), np.inf, np.float32)
        self.idx = np.full((self.rows, m), -1, np.int64)
        self.thr = np.full(self.rows, np.inf, np.float32)
        self.slack = np.zeros(p, np.float64)  # c_i: the error terms that do not depend on the gallery cell
        self.gnorms: list[np.ndarray] = []  # |g_j - mu| (fine part) of every gallery row so far, in index order
        threads = max(1, min(compute_threads(), self.rows // 32))
        cuts = [self.rows * t // threads // 32 * 32 for t in range(threads + 1)]
        self.parts = list(zip(cuts[:-1], cuts[1:]))
        self.pool = ThreadPoolExecutor(threads)  # ctypes lets go of the GIL: one part of the rows per core

    def set_error_scale(self, k: int) -> None:
        """The bound factors for a contraction of k and, from them, e_i per row."""
        once, self.hi_lo, three = factors(k)
        self.rowscale = np.zeros(self.rows, np.float32)  # e_i: the fine products' error is at most e_i |g_j|
        self.rowscale[: self.p] = (three if self.three else once) * 2 * self.q_norm * (1 + 1e-6)

    def lap(self, part: str) -> None:
        """Charge the time since the last lap to ``part``."""
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now

    def _parallel(self, fn: Callable, jobs) -> None:
        for f in [self.pool.submit(fn, *job) for job in jobs]:
            f.result()

    def _run(
        self,
        n_slab: int,
        n_pad: int,
        b_fine: np.ndarray,
        norms: np.ndarray,
        colnorm: np.ndarray,
        base: int,
        per_slab: int,
        windows=None,
        n_win: int = 0,
    ) -> None:
        """The kernel over every part of the rows (see se_screen in kernels/amx_screen.c)."""
        lib = self.lib

        def part(r0: int, r1: int) -> None:
            lib.se_screen(
                r0,
                r1,
                self.p,
                n_slab,
                n_pad,
                ptr(self.a_fine),
                ptr(b_fine),
                self.k_fine,
                n_win,
                windows,
                ptr(norms),
                ptr(colnorm),
                ptr(self.rowscale),
                base,
                per_slab,
                self.m,
                ptr(self.vals),
                ptr(self.idx),
                ptr(self.thr),
            )

        self._parallel(part, self.parts)

    def close(self) -> None:
        self.pool.shutdown()

    def bounds(self, kappa: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each row's kept list (lower bounds as float64, ascending; indices), every kept candidate's
        upper bound, and the row's bound on its kappa-th true expanded distance."""
        p = self.p
        order = np.argsort(self.vals[:p], axis=1, kind="stable")
        low = np.take_along_axis(self.vals[:p], order, 1).astype(np.float64) - self.slack[:, None]
        idx = np.take_along_axis(self.idx[:p], order, 1)
        g_norm = np.concatenate(self.gnorms)[np.where(idx >= 0, idx, 0)] if self.gnorms else np.zeros(idx.shape)
        high = low + 2 * (self.rowscale[:p, None].astype(np.float64) * g_norm + self.slack[:, None])
        high[idx < 0] = np.inf
        return low, idx, high, np.sort(high, axis=1)[:, kappa - 1]

    def unsettled(self, kappa: int, limit: np.ndarray | None = None) -> np.ndarray:
        """Rows whose dropped candidates may still belong (their lower bounds are >= the list's
        largest); ``limit``: :meth:`bounds`' last value, where the caller has it."""
        if limit is None:
            *_, limit = self.bounds(kappa)
        return ~(self.thr[: self.p].astype(np.float64) - self.slack > limit)

    def settle(self, kappa: int, exact: Callable, rescore: Callable) -> TopK:
        """The kappa nearest: ``exact(idx, which)`` gives the distances of the kept candidates that may
        belong (inf elsewhere), ``rescore(rows)`` a TopK for the rows the screen cannot settle."""
        low, idx, _, limit = self.bounds(kappa)
        which = (low <= limit[:, None]) & (idx >= 0)
        dist = exact(idx, which)
        pick = np.lexsort((idx, dist), axis=1)[:, :kappa]
        dist, index = np.take_along_axis(dist, pick, 1), np.take_along_axis(idx, pick, 1)
        self.lap("exact re-computation of the candidates")
        unsettled = np.flatnonzero(self.unsettled(kappa, limit))
        if unsettled.size:
            redo = rescore(unsettled)
            dist[unsettled], index[unsettled] = redo.distances, redo.indices
        self.lap("unsettled rows searched again")
        self.stats = {"candidates": int(which.sum()), "rows_rescored": int(unsettled.size), "seconds": self.seconds}
        return TopK(dist.astype(np.float32), index)


class PlainScreen(Screen):
    """Query rows (P, D) against blocks of gallery rows (M_b, D), in slabs of N_PAD gallery rows;
    ``three``: both sides in two bf16 parts, three products (a bound some 80x tighter, 3x the work)."""

    N_PAD = 256

    def __init__(self, lib, query: np.ndarray, m: int, three: bool = False):
        q = np.asarray(query, np.float32)
        self.mu = q.mean(0, dtype=np.float64).astype(np.float32)
        super().__init__(lib, len(q), m, q - self.mu, three)
        self.dim = q.shape[1]
        self.set_error_scale(self.k_fine)
        self.offset = 0

    def add(self, block: np.ndarray) -> None:
        """Screen the next block of gallery rows (indices continue from the previous block)."""
        self.lap("gallery decoded")
        g = np.ascontiguousarray(block, np.float32)
        if g.ndim != 2 or g.shape[1] != self.dim:
            raise ValueError(f"gallery block has shape {g.shape}, expected (M, {self.dim})")
        n_pad, k, n = self.N_PAD, up(self.dim), len(g)
        if n == 0:
            return
        n_slab = max(1, -(-n // n_pad))
        b = aligned((n_slab, self.k_fine * n_pad), np.uint16)
        norms = aligned((n_slab, n_pad), np.float32, np.inf)
        colnorm, colsq = aligned((n_slab, n_pad), np.float32, 0.0), np.zeros((n_slab, n_pad), np.float32)
        self.lap("other (bounds, bookkeeping)")

        def pack(t: int) -> None:
            for s in range(t, n_slab, len(self.parts)):
                rows = min(n_pad, n - s * n_pad)
                self.lib.se_pack_b(
                    ptr(g) + 4 * s * n_pad * self.dim,
                    self.dim,
                    1,
                    rows,
                    self.dim,
                    ptr(self.mu),
                    -2.0,
                    n_pad,
                    k,
                    3 if self.three else 1,
                    ptr(b[s]),
                    ptr(colnorm[s]),
                    ptr(colsq[s]),
                )

        self._parallel(pack, [(t,) for t in range(len(self.parts))])
        valid = np.arange(n_slab * n_pad) < n
        norms.ravel()[valid] = colsq.ravel()[valid]  # |g - mu|^2, summed in float64
        self.lap("B packing (threads)")
        self._run(n_slab, n_pad, b, norms, colnorm, self.offset, n_pad)
        self.lap(self.label)
        self.gnorms.append(colnorm.ravel()[valid])
        # c_i: fp32 roundings of the norms and of the epilogue's sums
        np.maximum(
            self.slack,
            4 * F32 * (float(norms.ravel()[valid].max()) + 2 * self.q_norm * float(colnorm.max())),
            out=self.slack,
        )
        self.offset += n
        self.lap("other (bounds, bookkeeping)")


class PyramidScreen(Screen):
    """One test image's concatenated pyramid against gallery pyramids, slab by slab of
    :class:`.pyramid.PyramidSlabs`: the fine level as one segment, each coarse level's native
    products read through a window per slab in two bf16 parts (the kernel's ``window``), or in one
    (``coarse_parts`` = 1: half the coarse products, their rounding, 2^-8 of each row's largest window
    value, in the bound), or (0, the AVX-512 kernel's) as fp32 taps: each fine column's four native
    cells times their bilinear weights, the fine sums starting from them (a few fp32 roundings of the
    coarse part in the bound)."""

    def __init__(self, lib, slabs: PyramidSlabs, m: int, coarse_parts: int = 2):
        if coarse_parts not in (0, 1, 2) or (coarse_parts == 0 and not lib.se_taps()):
            raise ValueError(f"coarse_parts is 0 (AVX-512 only), 1 or 2, got {coarse_parts}")
        self.coarse_parts = coarse_parts
        big_h, big_w = slabs.grid
        p = slabs.p
        self.slabs = slabs
        self.mu = [x.reshape(-1, x.shape[2]).mean(0, dtype=np.float64).astype(np.float32) for x in slabs.query]
        centred = [x - mu for x, mu in zip(slabs.query, self.mu)]
        fine = [i for i, f in enumerate(slabs.fine) if f]
        self.coarse = [i for i, f in enumerate(slabs.fine) if not f]
        self.c_fine = slabs.c_fine
        super().__init__(lib, p, m, np.concatenate([centred[i].reshape(p, -1) for i in fine], axis=1))
        self.mu_fine = np.ascontiguousarray(np.concatenate([self.mu[i] for i in fine]))
        self.n_pad = up(slabs.rows * big_w)
        self.per_slab = slabs.rows * big_w
        n_slab = len(slabs.slabs)
        self.b_fine = aligned((n_slab, self.k_fine * self.n_pad), np.uint16)
        self.norms = aligned((n_slab, self.n_pad), np.float32, np.inf)
        self.colnorm = aligned((n_slab, self.n_pad), np.float32, 0.0)
        # coarse levels: the query at native resolution, the four taps of each fine cell, and per slab the
        # window of native gallery cells it reads (k_pad wide, hi and lo parts), its weights packed twice as B
        self.levels = []
        yy, xx = np.divmod(np.arange(p), big_w)
        for li, i in enumerate(self.coarse):
            h, w, ch = centred[i].shape
            i0, i1, u0, u1 = taps(big_h, h)
            j0, j1, v0, v1 = taps(big_w, w)
            at = np.stack([i0[yy] * w + j0[xx], i0[yy] * w + j1[xx], i1[yy] * w + j0[xx], i1[yy] * w + j1[xx]], 1)
            wt = np.stack([u0[yy] * v0[xx], u0[yy] * v1[xx], u1[yy] * v0[xx], u1[yy] * v1[xx]], 1)
            windows = [coarse[li] for _, _, coarse in slabs.slabs]
            k_pad = int(max(up(end - start) for start, end, _ in windows))
            b = aligned((n_slab, max(1, coarse_parts * k_pad * self.n_pad)), np.uint16)
            # per slab and B tile, the runs of pairs its columns read (se_screen's run_at[s * n_pad / 16 + t]), or
            # (taps) each column's four cells and weights
            runs, run_at = [np.zeros((0, 2), np.int32)], [np.zeros(1, np.int64)]
            tap = [np.zeros(0, np.int32), np.zeros(0, np.float32)]
            if coarse_parts:
                for _, _, weights in windows:
                    r, a = tile_runs(weights, self.n_pad)
                    run_at.append(a[1:] + run_at[-1][-1])
                    runs.append(r)
            else:
                tap = [np.concatenate(x) for x in zip(*(column_taps(weights, self.n_pad) for _, _, weights in windows))]
            for s, (start, end, weights) in enumerate(windows):
                for half in range(
                    0, coarse_parts * k_pad * self.n_pad, k_pad * self.n_pad
                ):  # hi and lo: the same weights
                    lib.se_pack_b(
                        ptr(weights),
                        1,
                        weights.shape[1],
                        weights.shape[1],
                        end - start,
                        None,
                        1.0,
                        self.n_pad,
                        k_pad,
                        1,
                        ptr(b[s]) + 2 * int(half),
                        None,
                        None,
                    )
            native = np.ascontiguousarray(centred[i].reshape(h * w, ch))
            # products of the coarsest levels in float64 (cheap there): their fp32 bound, channels x 2^-24
            # x |q| |g|, would otherwise widen every row's window
            dtype = np.float64 if h * w <= NATIVE64 else np.float32
            self.levels.append(
                {
                    "q": native.astype(dtype),
                    "q_mu": (native.astype(np.float64) @ self.mu[i]).astype(dtype),
                    "q_max": float(np.sqrt(np.einsum("ij,ij->i", native, native).max())),
                    "native": dtype,
                    "channels": ch,
                    "mu_norm": float(np.linalg.norm(self.mu[i])),
                    "at": np.ascontiguousarray(at, np.int64),
                    "w": np.ascontiguousarray(wt, np.float32),
                    "starts": np.array([start for start, _, _ in windows], np.int64),
                    "runs": np.ascontiguousarray(np.concatenate(runs), np.int32),
                    "run_at": np.concatenate(run_at),
                    "tap": tap,
                    "k_pad": k_pad,
                    "b": b,
                    "rowmax": np.zeros(self.rows, np.float32),
                    # taps: the largest |q - mu| of each fine row's taps (its values' Cauchy-Schwarz bound, in add)
                    "q_taps": np.linalg.norm(native.astype(np.float64), axis=1)[at].max(axis=1),
                }
            )
        # the terms of the bf16 sums (taps: the fine segment's; the taps' fp32 products are bounded apart, in add)
        self.terms = self.k_fine + sum(coarse_parts * lv["k_pad"] for lv in self.levels)
        self.set_error_scale(self.terms)
        self.windows = (Window * max(1, len(self.levels)))()
        for g, lv in enumerate(self.levels):  # the native products (m) come with each gallery image
            self.windows[g] = Window(
                None,
                0,
                0,
                ptr(lv["at"]),
                ptr(lv["w"]),
                ptr(lv["starts"]),
                lv["k_pad"],
                ptr(lv["b"]),
                ptr(lv["rowmax"]),
                coarse_parts,
                ptr(lv["runs"]),
                ptr(lv["run_at"]),
                *(ptr(x) for x in lv["tap"]),
            )
        self.sqnorms: list[np.ndarray] = []  # per gallery image: |Ug|^2
        self.images = 0
        self.lap("query operands (bf16 tiles, taps)")

    def add(self, levels: list[np.ndarray], sqnorms: np.ndarray | None) -> None:
        """Screen the next gallery image (its level maps and, if kept, its upsampled squared norms)."""
        slabs, lib, p, big_w, c = self.slabs, self.lib, self.p, self.slabs.grid[1], self.c_fine
        self.lap("gallery decoded")
        g = [np.asarray(x, np.float32) for x in levels]
        fine = [g[i].reshape(p, -1) for i, f in enumerate(slabs.fine) if f]
        g_fine = np.ascontiguousarray(fine[0] if len(fine) == 1 else np.concatenate(fine, axis=1))
        flat = [g[i].reshape(-1, g[i].shape[2]) for i in self.coarse]
        natives = [np.empty((lv["q"].shape[0], x.shape[0]), lv["native"]) for lv, x in zip(self.levels, flat)]
        n_parts = len(self.parts)

        def operands(t: int) -> None:  # part t of the slabs' B and of the native products
            for s in range(t, len(slabs.slabs), n_parts):
                y0, r, _ = slabs.slabs[s]
                lib.se_pack_b(
                    ptr(g_fine) + 4 * y0 * big_w * c,
                    c,
                    1,
                    r * big_w,
                    c,
                    ptr(self.mu_fine),
                    -2.0,
                    self.n_pad,
                    self.k_fine,
                    1,
                    ptr(self.b_fine[s]),
                    ptr(self.colnorm[s]),
                    None,
                )
            for lv, x, out in zip(self.levels, flat, natives):
                a, b = len(out) * t // n_parts, len(out) * (t + 1) // n_parts
                # at native resolution: (q - mu) . (g - mu) = (q - mu) . g - (q - mu) . mu
                np.matmul(lv["q"][a:b], x.T if out.dtype == np.float32 else x.T.astype(out.dtype), out=out[a:b])
                out[a:b] -= lv["q_mu"][a:b, None]

        jobs = [self.pool.submit(operands, t) for t in range(n_parts)]
        self.lap("other (bounds, bookkeeping)")
        n = upsampled_sqnorms(g, slabs.grid) if sqnorms is None else np.asarray(sqnorms, np.float64)
        self.sqnorms.append(n)
        self.lap("gallery norms (a loaded gallery keeps them)")
        # meanwhile: |Ug - mu|^2 = |Ug|^2 - 2 <mu, Ug> + |mu|^2, with <mu, U_l g_l> = U_l <mu_l, g_l>
        dot = np.zeros(slabs.grid, np.float64)
        mu_sq = float(sum(float(mu @ mu) for mu in self.mu))
        for x, mu in zip(g, self.mu):
            dot += upsample_map(x @ mu, *slabs.grid)
        norms = n - 2 * dot.ravel() + mu_sq
        for s, (y0, r, _) in enumerate(slabs.slabs):
            self.norms[s, : r * big_w] = norms[y0 * big_w : (y0 + r) * big_w]
        self.lap("other (bounds, bookkeeping)")
        for f in jobs:
            f.result()
        natives = [np.ascontiguousarray(m, np.float32) for m in natives]
        for g_, (lv, m) in enumerate(zip(self.levels, natives)):
            self.windows[g_].m, self.windows[g_].lds, self.windows[g_].cols = ptr(m), m.shape[1], m.shape[1]
            lv["rowmax"][:] = 0.0
        self.lap("B packing and native products (threads)")
        self._run(
            len(slabs.slabs),
            self.n_pad,
            self.b_fine,
            self.norms,
            self.colnorm,
            self.images * p,
            self.per_slab,
            self.windows,
            len(self.levels),
        )
        self.lap(self.label)
        self.gnorms.append(np.concatenate([self.colnorm[s, : r * big_w] for s, (_, r, _) in enumerate(slabs.slabs)]))
        # c_i, per image: the coarse parts' rounding (hi alone is off by 2^-8 of its value, hi + lo by 2^-16; taps:
        # fp32 steps), the native products' own rounding, the fp32 steps of the
        # norms (y-upsampling, <mu, Ug>, storing) and of the epilogue's sums
        # the native products' own rounding, per level (the weights of a column sum to 2 in magnitude)
        g_top = [float(np.sqrt(np.einsum("ij,ij->i", x, x).max())) for x in flat]
        native = [
            2 * lv["channels"] * (F32 if lv["native"] == np.float32 else 2.0**-53) * lv["q_max"] * (lv["mu_norm"] + top)
            + 4 * F32 * lv["q_max"] * lv["mu_norm"]
            for lv, top in zip(self.levels, g_top)
        ]
        # spread: the largest coarse part of a value, sum over levels of |weights| (2 a column) x the row's largest
        # window value (taps: |native product| <= |q - mu| |g - mu| + its rounding, Cauchy-Schwarz)
        parts, n_levels = self.coarse_parts, len(self.levels)
        if parts:
            spread = sum(2 * lv["rowmax"][:p].astype(np.float64) for lv in self.levels)
        else:
            spread = sum(
                2 * (lv["q_taps"] * (top + lv["mu_norm"]) * (1 + 1e-6) + err)
                for lv, top, err in zip(self.levels, g_top, native)
            )
        g_max = float(self.gnorms[-1].max())
        if parts == 2:
            coarse = self.hi_lo * spread
        elif parts == 1:
            coarse = (U + self.hi_lo) * spread
        else:  # taps: each window value within 5 fp32 roundings (native to fp32, 4 products) of its taps' mean;
            # 4 fp32 multiply-adds per level make the coarse part (partial sums <= spread); the fine sums start
            # from it, so each of their k_fine roundings may also be 2^-24 of it
            coarse = F32 * (5.1 + 4.1 * n_levels + 1.01 * self.k_fine) * spread
        big = float(np.sqrt(max(float(n.max()), 0.0))) + np.sqrt(mu_sq)
        sums = 4 * F32 * (big * big + float(np.abs(norms).max()) + spread + 2 * self.q_norm * (g_max + np.sqrt(mu_sq)))
        # subnormals: TDPBF16PS and VDPBF16PS take bf16 inputs below 2^-126 as zero and flush such products
        # and sums, each term then off by under 2^-126 (1 + |a| + |b|) (|b| <= 2 |g - mu| fine, weights <= 1)
        flush = (self.terms + 4 * n_levels) * 2.0**-125 * (1 + self.q_norm.max(initial=0.0) + 2 * g_max + spread)
        np.maximum(self.slack, coarse + sum(native) + sums + flush, out=self.slack)
        self.images += 1
        self.lap("other (bounds, bookkeeping)")


def settle_blocks(
    screen: Screen, query: np.ndarray, blocks: Sequence[np.ndarray], kappa: int, rescore: Callable
) -> TopK:
    """:meth:`Screen.settle` for plain rows: candidates re-computed from their blocks, unsettled rows
    searched again by ``rescore(rows)``."""
    starts = np.cumsum([0] + [len(b) for b in blocks])
    q = np.asarray(query, np.float32)

    def exact(idx: np.ndarray, which: np.ndarray) -> np.ndarray:
        out = np.full(idx.shape, np.inf, np.float32)
        owner = np.where(which, np.searchsorted(starts, idx, side="right") - 1, -1)
        for b in np.unique(owner[owner >= 0]):
            pp, ss = np.nonzero(owner == b)
            diff = q[pp] - np.asarray(blocks[b], np.float32)[idx[pp, ss] - starts[b]]
            out[pp, ss] = np.einsum("nd,nd->n", diff, diff)
        return out

    return screen.settle(kappa, exact, rescore)
