"""CPU scorer on Intel AMX (Xeon 4th generation and later): the concatenated pyramid screened in
bf16 by the tile unit, then re-computed exactly (docs/speed.md, "The AMX screen").

The screen forms :class:`.pyramid.PyramidSlabs`' expanded distances |Ug|^2 - 2 <Uq, Ug> with fp32
sums of bf16 products (``kernels/amx_screen.c``): the fine level's operands rounded to bf16 once,
the coarse levels' products in two bf16 parts (16 bits; their weights are exact in bf16). Rounding
moves an expanded distance by at most e_i |g_j| + c_i (query row i, gallery cell j; :meth:`_Screen.add`),
so the kernel ranks the lower bound "expanded - e_i |g_j|" and keeps the m = kappa + SPARE smallest per
row. Kept candidates that may belong are re-computed exactly; a row whose dropped candidates might
still belong is scored again in fp32. The neighbours are NumpyScorer's, ties to the lower index.
"""
from __future__ import annotations

import ctypes
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..resample import interp_matrix, taps, upsample_hwc, upsample_map
from ..threads import compute_threads
from . import ccompile
from .base import TopK, concat_upsampled
from .blas import single_threaded
from .numpy import NumpyScorer, _smallest, _Top
from .pyramid import PyramidSlabs, exact_distances, upsampled_sqnorms

SPARE = 15  # candidates kept past kappa: a row is re-scored in fp32 when its list ends inside the error window
U, F32 = 2.0**-8, 2.0**-24  # unit roundoffs of bf16 and fp32 (round to nearest even)


def _factors(k: int) -> tuple[float, float]:
    """Relative error bounds of a k-term sum of products in fp32, against the sum of the products'
    magnitudes: both operands rounded to bf16 once, and a two-part (hi + lo) left operand with an
    exact right one."""
    gamma = k * F32
    return 2 * U + U * U + gamma, U * U + gamma

NATIVE64 = 256  # coarse levels with at most this many cells take their native products in float64
# after PROBE gallery images, a screen that leaves more than GIVE_UP of the rows unsettled is dropped for
# the fp32 path: re-scoring rows one by one costs more than scoring them all (docs/speed.md)
PROBE, GIVE_UP = 4, 0.2
FLAGS = ("-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16")


class _Window(ctypes.Structure):
    """kernels/amx_screen.c's ``window``: a coarse level's native products and what the slabs read of them."""
    _fields_ = [("m", ctypes.c_void_p), ("lds", ctypes.c_int64), ("cols", ctypes.c_int64), ("at", ctypes.c_void_p),
                ("w", ctypes.c_void_p), ("starts", ctypes.c_void_p), ("k_pad", ctypes.c_int64), ("b", ctypes.c_void_p),
                ("rowmax", ctypes.c_void_p)]


@lru_cache(maxsize=1)
def _kernel() -> tuple[ctypes.CDLL | None, str]:
    """(the compiled screen, '') or (None, why not)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"AMX is an x86-64 feature; this is {platform.machine()}"
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    if not {"amx_tile", "amx_bf16", "avx512f", "avx512_bf16"} <= flags:
        return None, "this CPU has no AMX-BF16 tile unit"
    try:
        lib = ccompile.load("amx_screen.c", FLAGS)
    except (RuntimeError, OSError) as exc:
        return None, str(exc)
    if not lib.se_enable():
        return None, "the Linux kernel did not grant AMX state (needs Linux >= 5.16)"
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.se_pack_b.argtypes = [p, i64, i64, i32, i32, p, f32, i32, i32, p, p]
    lib.se_pack_b.restype = None
    lib.se_screen.argtypes = [i64, i64, i64, i32, i32, p, p, i64, i32, p, p, p, p, i64, i64, i32, p, p, p]
    lib.se_screen.restype = None
    if not _agrees(lib):
        return None, "the compiled AMX screen disagreed with numpy on its first use"
    return lib, ""


def available() -> tuple[bool, str]:
    """Whether the AMX screen runs here, and if not, why."""
    lib, why = _kernel()
    return lib is not None, why or "AMX-BF16 screen compiled and checked"


def _ptr(x: np.ndarray) -> int:
    return x.ctypes.data


def _up(n: int, to: int = 32) -> int:
    return -(-n // to) * to


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even bf16, as uint16 bits (like the kernel)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _aligned(shape, dtype, fill=0) -> np.ndarray:
    """A new array on a 64-byte boundary (numpy gives 16): a tile row that straddles two cache lines
    loads at half speed."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + size].view(dtype).reshape(shape)
    out[...] = fill
    return out


def _tiled(a: np.ndarray) -> np.ndarray:
    """(rows, k) bf16, both multiples of 16 and 32, as contiguous 16 x 32 tiles (the kernel's lda = 0)."""
    r, k = a.shape
    out = _aligned((r // 16, k // 32, 16, 32), np.uint16)
    out[...] = a.reshape(r // 16, 16, k // 32, 32).transpose(0, 2, 1, 3)
    return out


def _agrees(lib) -> bool:
    """One 32 x 32 screen against numpy's product: each row's smallest value within the bound."""
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((32, 40), np.float32), rng.standard_normal((32, 40), np.float32)
    a = np.zeros((32, 64), np.uint16)
    a[:, :40] = _bf16(q)
    a = _tiled(a)
    b, col = _aligned((64 * 32,), np.uint16), np.zeros(32, np.float32)
    lib.se_pack_b(_ptr(g), 40, 1, 32, 40, None, -2.0, 32, 64, _ptr(b), _ptr(col))
    norms = np.einsum("ij,ij->i", g, g)
    e = (_factors(64)[0] * 2 * np.linalg.norm(q, axis=1)).astype(np.float32)
    vals, idx, thr = np.full((32, 1), np.inf, np.float32), np.full((32, 1), -1, np.int64), np.full(32, np.inf, np.float32)
    lib.se_screen(0, 32, 32, 1, 32, _ptr(a), _ptr(b), 64, 0, None, _ptr(norms), _ptr(col), _ptr(e), 0, 32, 1,
                  _ptr(vals), _ptr(idx), _ptr(thr))
    want = norms[None, :] - 2 * q @ g.T
    lower = want - e[:, None] * np.linalg.norm(g, axis=1)[None, :]
    slack = 2 * e[:, None] * np.linalg.norm(g, axis=1).max() + 1e-3
    return bool(np.allclose(col, np.linalg.norm(g, axis=1), rtol=1e-5)
                and np.all(np.abs(vals[:, 0] - lower.min(1)) <= slack[:, 0]))


def _weights_exact(slabs: PyramidSlabs) -> bool:
    """Whether the interpolation weights are exact in bf16 (they are for integer scale factors):
    the error bound takes only the left operands as rounded."""
    return all(np.array_equal(_bf16(w).astype(np.uint32) << 16, w.view(np.uint32))
               for _, _, coarse in slabs.slabs for _, _, w in coarse)


class AmxScorer(NumpyScorer):
    """NumpyScorer whose concatenated-pyramid search runs the AMX screen; where the screen is not
    available (:func:`available`), it is NumpyScorer. ``stats``: what the last search did."""

    name = "amx"

    def __init__(self, block_bytes: int = 8 << 20):
        super().__init__(block_bytes)
        self.stats: dict = {}

    def topk_pyramid(self, query, images, grid, kappa):
        lib, _ = _kernel()
        slabs = PyramidSlabs(query, grid, rows=4)
        if lib is None or not slabs.c_fine or kappa < 1 or not len(images) or not _weights_exact(slabs):
            self.stats = {"path": "fp32"}
            return super().topk_pyramid(query, images, grid, kappa)
        screen = _Screen(lib, slabs, kappa + SPARE)
        kept_norms = getattr(images, "sqnorms", None)  # a gallery keeps them: see spade._DecodedPyramids
        done = 0
        try:
            with single_threaded():  # our threads split the BLAS work; its own pool would only spin against them
                for j in range(len(images)):
                    levels = images[j]
                    screen.add(j, levels, kept_norms(j, levels) if kept_norms else None)
                    done += 1
                    if done == PROBE and len(images) > 2 * PROBE and screen.unsettled(kappa).mean() > GIVE_UP:
                        break  # features too alike for bf16 to tell apart (or a query unlike the gallery)
        finally:
            screen.close()
        if done < len(images):
            self.stats = {"path": "fp32", "gave_up_after": done, "unsettled_share": float(screen.unsettled(kappa).mean())}
            return super().topk_pyramid(query, images, grid, kappa)
        top = screen.result(images, kappa)
        self.stats = {"path": "amx", **screen.stats}
        return top


class _Screen:
    """One test image's screen: its operands in bf16, per slab and segment, and the running lists."""

    def __init__(self, lib, slabs: PyramidSlabs, m: int):
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}  # where the time went, by part (bench speed's profile)
        self.lib, self.slabs, self.m = lib, slabs, m
        big_h, big_w = slabs.grid
        p = self.p = slabs.p
        self.rows = _up(p)
        # centred on the query's mean: distances do not move, products and their rounding shrink
        self.mu = [x.reshape(-1, x.shape[2]).mean(0, dtype=np.float64).astype(np.float32) for x in slabs.query]
        centred = [x - mu for x, mu in zip(slabs.query, self.mu)]
        fine = [i for i, f in enumerate(slabs.fine) if f]
        self.coarse = [i for i, f in enumerate(slabs.fine) if not f]
        c = self.c_fine = slabs.c_fine
        q_fine = np.concatenate([centred[i].reshape(p, -1) for i in fine], axis=1)
        self.mu_fine = np.ascontiguousarray(np.concatenate([self.mu[i] for i in fine]))
        self.k_fine = _up(c)
        a = np.zeros((self.rows, self.k_fine), np.uint16)
        a[:p, :c] = _bf16(q_fine)
        self.a_fine = _tiled(a)
        self.q_norm = np.linalg.norm(q_fine, axis=1).astype(np.float64)
        self.n_pad = _up(slabs.rows * big_w)
        self.cells_per_slab = slabs.rows * big_w
        n_slab = len(slabs.slabs)
        self.b_fine = _aligned((n_slab, self.k_fine * self.n_pad), np.uint16)
        self.norms = _aligned((n_slab, self.n_pad), np.float32, np.inf)
        self.colnorm = _aligned((n_slab, self.n_pad), np.float32, 0.0)
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
            k_pad = int(max(_up(end - start) for start, end, _ in windows))
            b = _aligned((n_slab, 2 * k_pad * self.n_pad), np.uint16)
            for s, (start, end, weights) in enumerate(windows):
                for half in (0, k_pad * self.n_pad):  # hi and lo meet the same weights
                    lib.se_pack_b(_ptr(weights), 1, weights.shape[1], weights.shape[1], end - start, None, 1.0,
                                  self.n_pad, k_pad, _ptr(b[s]) + 2 * int(half), None)
            native = np.ascontiguousarray(centred[i].reshape(h * w, ch))
            self.levels.append({"q": native, "at": np.ascontiguousarray(at, np.int64), "w": np.ascontiguousarray(wt, np.float32),
                                "starts": np.array([start for start, _, _ in windows], np.int64), "k_pad": k_pad, "b": b,
                                "rowmax": np.zeros(self.rows, np.float32),
                                "q_max": float(np.sqrt(np.einsum("ij,ij->i", native, native).max())), "channels": ch,
                                # products of the coarsest levels in float64 (cheap there): their fp32 bound,
                                # channels x 2^-24 x |q| |g|, would otherwise widen every row's window
                                "native": np.float64 if h * w <= NATIVE64 else np.float32})
        self.bf16, self.hi_lo = _factors(self.k_fine + sum(2 * lv["k_pad"] for lv in self.levels))
        self.rowscale = np.zeros(self.rows, np.float32)  # e_i: the fine products' error is at most e_i |g_j|
        self.rowscale[:p] = self.bf16 * 2 * self.q_norm * (1 + 1e-6)
        self.windows = (_Window * max(1, len(self.levels)))()
        for g, lv in enumerate(self.levels):  # the native products (m) come with each gallery image
            self.windows[g] = _Window(None, 0, 0, _ptr(lv["at"]), _ptr(lv["w"]), _ptr(lv["starts"]), lv["k_pad"],
                                      _ptr(lv["b"]), _ptr(lv["rowmax"]))
        self.vals = np.full((self.rows, m), np.inf, np.float32)
        self.idx = np.full((self.rows, m), -1, np.int64)
        self.thr = np.full(self.rows, np.inf, np.float32)
        self.slack = np.zeros(p, np.float64)  # c_i: the error terms that do not depend on the gallery cell
        self.sqnorms, self.cellnorms = [], []  # per gallery image: |Ug|^2, |g_fine - mu|
        threads = max(1, min(compute_threads(), self.rows // 32))
        cuts = [self.rows * t // threads // 32 * 32 for t in range(threads + 1)]
        self.parts = list(zip(cuts[:-1], cuts[1:]))
        self.pool = ThreadPoolExecutor(threads)  # ctypes lets go of the GIL: one part of the rows per core
        self._lap("query operands (bf16 tiles, taps)")

    def _lap(self, part: str) -> None:
        """Charge the time since the last lap to ``part``."""
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now

    def add(self, j: int, levels: list[np.ndarray], sqnorms: np.ndarray | None) -> None:
        """Screen gallery image ``j`` (its level maps and, if kept, its upsampled squared norms)."""
        slabs, lib, p, big_w, c = self.slabs, self.lib, self.p, self.slabs.grid[1], self.c_fine
        self._lap("gallery images decoded")
        g = [np.asarray(x, np.float32) for x in levels]
        g_fine = np.ascontiguousarray(np.concatenate([g[i].reshape(p, -1) for i, f in enumerate(slabs.fine) if f], axis=1))
        centred = [g[i].reshape(-1, g[i].shape[2]) - self.mu[i] for i in self.coarse]
        natives = [np.empty((lv["q"].shape[0], gc.shape[0]), lv["native"]) for lv, gc in zip(self.levels, centred)]
        n_parts = len(self.parts)

        def operands(t: int) -> None:  # part t of the slabs' B and of the native products
            for s in range(t, len(slabs.slabs), n_parts):
                y0, r, _ = slabs.slabs[s]
                lib.se_pack_b(_ptr(g_fine) + 4 * y0 * big_w * c, c, 1, r * big_w, c, _ptr(self.mu_fine), -2.0,
                              self.n_pad, self.k_fine, _ptr(self.b_fine[s]), _ptr(self.colnorm[s]))
            for lv, gc, out in zip(self.levels, centred, natives):
                a, b = len(out) * t // n_parts, len(out) * (t + 1) // n_parts
                np.matmul(lv["q"][a:b].astype(out.dtype), gc.T.astype(out.dtype), out=out[a:b])  # at native resolution

        def screen(r0: int, r1: int) -> None:  # rows [r0, r1) against every slab
            lib.se_screen(r0, r1, p, len(slabs.slabs), self.n_pad, _ptr(self.a_fine), _ptr(self.b_fine), self.k_fine,
                          len(self.levels), self.windows, _ptr(self.norms), _ptr(self.colnorm), _ptr(self.rowscale),
                          j * p, self.cells_per_slab, self.m, _ptr(self.vals), _ptr(self.idx), _ptr(self.thr))

        jobs = [self.pool.submit(operands, t) for t in range(n_parts)]
        self._lap("other (bounds, bookkeeping)")
        n = upsampled_sqnorms(g, slabs.grid) if sqnorms is None else np.asarray(sqnorms, np.float64)
        self.sqnorms.append(n)
        self._lap("gallery norms (a loaded gallery keeps them)")
        # meanwhile: |Ug - mu|^2 = |Ug|^2 - 2 <mu, Ug> + |mu|^2, with <mu, U_l g_l> = U_l <mu_l, g_l>
        dot = np.zeros(slabs.grid, np.float64)
        mu_sq = float(sum(float(mu @ mu) for mu in self.mu))
        for x, mu in zip(g, self.mu):
            dot += upsample_map(x @ mu, *slabs.grid)
        norms = n - 2 * dot.ravel() + mu_sq
        for s, (y0, r, _) in enumerate(slabs.slabs):
            self.norms[s, : r * big_w] = norms[y0 * big_w : (y0 + r) * big_w]
        self._lap("other (bounds, bookkeeping)")
        for f in jobs:
            f.result()
        natives = [np.ascontiguousarray(m, np.float32) for m in natives]
        for g, (lv, m) in enumerate(zip(self.levels, natives)):
            self.windows[g].m, self.windows[g].lds, self.windows[g].cols = _ptr(m), m.shape[1], m.shape[1]
            lv["rowmax"][:] = 0.0
        self._lap("B packing and native products (threads)")
        for f in [self.pool.submit(screen, r0, r1) for r0, r1 in self.parts]:
            f.result()
        self._lap("AMX screen: bf16 tiles, products, selection (threads)")
        self.cellnorms.append(np.concatenate([self.colnorm[s, : r * big_w] for s, (_, r, _) in enumerate(slabs.slabs)]))
        # c_i, per image: the coarse parts' rounding (weights' column sums are 2), the native products' own fp32
        # rounding, the fp32 steps of the norms (y-upsampling, <mu, Ug>, storing) and of the epilogue's sums
        rowmax = sum(2 * lv["rowmax"][:p].astype(np.float64) for lv in self.levels)
        native = sum(2 * lv["channels"] * (F32 if lv["native"] == np.float32 else 2.0**-53) * lv["q_max"]
                     * float(np.sqrt(np.einsum("ij,ij->i", gc, gc).max())) for lv, gc in zip(self.levels, centred))
        big = float(np.sqrt(max(float(n.max()), 0.0))) + np.sqrt(mu_sq)
        sums = 4 * F32 * (big * big + float(np.abs(norms).max()) + 2 * self.q_norm * (float(self.cellnorms[-1].max()) + np.sqrt(mu_sq)) + rowmax)
        coarse = self.hi_lo * rowmax
        np.maximum(self.slack, coarse + native + sums, out=self.slack)
        self._lap("other (bounds, bookkeeping)")

    def close(self) -> None:
        self.pool.shutdown()

    def _bounds(self, kappa: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each row's kept list (lower bounds as float64, ascending; indices), every kept candidate's
        upper bound, and the row's bound on its kappa-th true distance."""
        p = self.p
        order = np.argsort(self.vals[:p], axis=1, kind="stable")
        low = np.take_along_axis(self.vals[:p], order, 1).astype(np.float64) - self.slack[:, None]
        idx = np.take_along_axis(self.idx[:p], order, 1)
        cell = np.where(idx >= 0, idx, 0)
        g_norm = np.stack(self.cellnorms)[cell // p, cell % p] if self.cellnorms else np.zeros(idx.shape)
        high = low + 2 * (self.rowscale[:p, None].astype(np.float64) * g_norm + self.slack[:, None])
        high[idx < 0] = np.inf
        return low, idx, high, np.sort(high, axis=1)[:, kappa - 1]

    def unsettled(self, kappa: int) -> np.ndarray:
        """Rows whose dropped candidates may still belong (their lower bounds are >= the list's largest)."""
        *_, limit = self._bounds(kappa)
        return ~(self.thr[: self.p].astype(np.float64) - self.slack > limit)

    def result(self, images, kappa: int) -> TopK:
        """Exact distances of the kept candidates that may belong; fp32 re-scoring of rows the screen cannot settle."""
        grid = self.slabs.grid
        low, idx, _, limit = self._bounds(kappa)
        which = (low <= limit[:, None]) & (idx >= 0)
        q_up = concat_upsampled(self.slabs.query, grid)
        exact = exact_distances(q_up, images, grid, idx, which)
        pick = np.lexsort((idx, exact), axis=1)[:, :kappa]
        dist, index = np.take_along_axis(exact, pick, 1), np.take_along_axis(idx, pick, 1)
        self._lap("exact re-computation of the candidates")
        unsettled = np.flatnonzero(self.unsettled(kappa))
        if unsettled.size:
            redo = _rescore(self.slabs.query, q_up, images, self.sqnorms, grid, unsettled, kappa)
            dist[unsettled], index[unsettled] = redo.distances, redo.indices
        self._lap("fp32 re-scoring of unsettled rows")
        self.stats = {"candidates": int(which.sum()), "rows_rescored": int(unsettled.size), "seconds": self.seconds}
        return TopK(dist.astype(np.float32), index)


def _rescore(query: list[np.ndarray], q_up: np.ndarray, images, sqnorms: list[np.ndarray], grid: tuple[int, int],
             rows: np.ndarray, kappa: int) -> TopK:
    """Query rows ``rows`` on NumpyScorer's fp32 terms, image by image: the expanded distances of those
    rows only, each level's products taken at the gallery's native resolution and upsampled after."""
    big_h, big_w = grid
    p, n = big_h * big_w, len(rows)
    q_levels = [upsample_hwc(x, *grid).reshape(p, -1)[rows] for x in query]
    top = _Top(n, kappa)
    for j in range(len(images)):
        levels = [np.asarray(x, np.float32) for x in images[j]]
        d = np.repeat(sqnorms[j][None, :], n, axis=0)
        for q, x in zip(q_levels, levels):
            h, w, c = x.shape
            prod = (q @ x.reshape(h * w, c).T).reshape(n, h, w)
            if (h, w) != (big_h, big_w):
                prod = interp_matrix(big_h, h) @ prod @ interp_matrix(big_w, w).T
            d -= 2 * prod.reshape(n, p)
        cand, val = _smallest(d, min(kappa, p))
        top.add(val, cand + j * p)
    top.exact = exact_distances(q_up[rows], images, grid, top.index, top.index >= 0)
    return top.result()
