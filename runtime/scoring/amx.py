"""CPU scorer on Intel AMX (Xeon 4th generation and later): the concatenated pyramid screened in
bf16 by the tile unit, then re-computed exactly (docs/speed.md, "The AMX screen").

The screen forms :class:`.pyramid.PyramidSlabs`' expanded distances |Ug|^2 - 2 <Uq, Ug> from bf16
operands with fp32 sums (``kernels/amx_screen.c``) and keeps the m = kappa + SPARE smallest of each
query row. Rounding to bf16 moves an expanded distance by at most eps_i, a bound per query row made
from norms (:meth:`_Screen.add`). Every kept candidate within 2 eps_i of the row's kappa-th smallest
is re-computed exactly; a row whose dropped candidates were not all beyond that window is scored
again on the fp32 path. The neighbours are therefore exactly NumpyScorer's, ties to the lower index.
"""
from __future__ import annotations

import ctypes
import platform
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

SPARE = 15  # candidates kept past kappa: rows whose list ends within the error window are re-scored in fp32
# |bf16(a) bf16(b) - a b| <= (2u + u^2) |a b| with u = 2^-8, plus fp32 sums of < 2^10 terms: below 1.01 * 2^-7
BF16 = 1.01 * 2.0**-7
FP32 = 2.0**-24
FLAGS = ("-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16")


class _Segment(ctypes.Structure):
    _fields_ = [("a", ctypes.c_void_p), ("lda", ctypes.c_int64), ("b", ctypes.c_void_p), ("k_pad", ctypes.c_int64)]


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
    lib.se_pack_b.argtypes = [p, i64, i64, i32, i32, p, f32, i32, i32, p]
    lib.se_pack_b.restype = f32
    lib.se_upsample_tiles.argtypes = [p, i64, i64, p, p, i64, i64, i32, p, i64, i64, p, p]
    lib.se_upsample_tiles.restype = None
    lib.se_screen.argtypes = [i64, i64, i32, i32, p, i32, p, i64, i64, i32, p, p, p]
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
    raw = np.empty(int(np.prod(shape)) * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start : start + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
    out[...] = fill
    return out


def _tiled(a: np.ndarray) -> np.ndarray:
    """(rows, k) bf16, both multiples of 16 and 32, as contiguous 16 x 32 tiles (the kernel's lda = 0)."""
    r, k = a.shape
    out = _aligned((r // 16, k // 32, 16, 32), np.uint16)
    out[...] = a.reshape(r // 16, 16, k // 32, 32).transpose(0, 2, 1, 3)
    return out


def _agrees(lib) -> bool:
    """One 32 x 32 screen against numpy's product: the smallest expanded distance of each row within the bound."""
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((32, 40), np.float32), rng.standard_normal((32, 40), np.float32)
    a = np.zeros((32, 64), np.uint16)
    a[:, :40] = _bf16(q)
    b = np.zeros((32, 32, 2), np.uint16)
    worst = lib.se_pack_b(_ptr(g), 40, 1, 32, 40, None, -2.0, 32, 64, _ptr(b))
    norms = np.einsum("ij,ij->i", g, g)
    segs = (_Segment * 1)(_Segment(_ptr(a), 64, _ptr(b), 64))  # row-major A here, tiled in the scorer
    vals, idx, thr = np.full((32, 1), np.inf, np.float32), np.full((32, 1), -1, np.int64), np.full(32, np.inf, np.float32)
    lib.se_screen(0, 32, 1, 1, segs, 32, _ptr(norms), 0, 32, 1, _ptr(vals), _ptr(idx), _ptr(thr))
    want = norms[None, :] - 2 * q @ g.T
    eps = BF16 * 2 * np.linalg.norm(q, axis=1) * np.sqrt(worst)
    return bool(np.all(np.abs(vals[:, 0] - want.min(1)) <= eps + 1e-4) and np.all(want[np.arange(32), idx[:, 0]] <= want.min(1) + 2 * eps))


def _weights_exact(slabs: PyramidSlabs) -> bool:
    """Whether the interpolation weights are exact in bf16 (they are for integer scale factors):
    the error bound assumes only the products' left operands are rounded."""
    return all(np.array_equal(_bf16(w).astype(np.uint32) << 16, w.view(np.uint32))
               for _, _, coarse in slabs.slabs for _, _, w in coarse)


class AmxScorer(NumpyScorer):
    """NumpyScorer whose concatenated-pyramid search runs the AMX screen; where the screen is not
    available (:func:`available`), it is NumpyScorer."""

    name = "amx"

    def topk_pyramid(self, query, images, grid, kappa):
        lib, _ = _kernel()
        slabs = PyramidSlabs(query, grid, rows=4)
        if lib is None or not slabs.c_fine or kappa < 1 or not _weights_exact(slabs):
            return super().topk_pyramid(query, images, grid, kappa)
        screen = _Screen(lib, slabs, kappa + SPARE)
        kept_norms = getattr(images, "sqnorms", None)  # a gallery keeps them: see spade._DecodedPyramids
        with single_threaded():  # our threads split the BLAS work; its own pool would only spin against them
            for j in range(len(images)):
                levels = images[j]
                screen.add(j, levels, kept_norms(j, levels) if kept_norms else None)
        screen.close()
        top = screen.result(images, kappa)
        self.stats = screen.stats
        return top


class _Screen:
    """One test image's screen: its operands in bf16, per slab and segment, and the running lists."""

    def __init__(self, lib, slabs: PyramidSlabs, m: int):
        self.lib, self.slabs, self.m = lib, slabs, m
        big_h, big_w = slabs.grid
        p = self.p = slabs.p
        self.rows = _up(p)
        self.mu = [x.reshape(-1, x.shape[2]).mean(0, dtype=np.float64).astype(np.float32) for x in slabs.query]
        centred = [x - mu for x, mu in zip(slabs.query, self.mu)]  # distances do not move; the products shrink
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
        # coarse levels: the query at native resolution, the four taps of each fine cell, and per slab the
        # window of native gallery cells it reads, k_pad wide, with its interpolation weights packed as B
        self.levels = []
        for li, i in enumerate(self.coarse):
            h, w, ch = centred[i].shape
            i0, i1, u0, u1 = taps(big_h, h)
            j0, j1, v0, v1 = taps(big_w, w)
            yy, xx = np.divmod(np.arange(p), big_w)
            at = np.stack([i0[yy] * w + j0[xx], i0[yy] * w + j1[xx], i1[yy] * w + j0[xx], i1[yy] * w + j1[xx]], 1)
            wt = np.stack([u0[yy] * v0[xx], u0[yy] * v1[xx], u1[yy] * v0[xx], u1[yy] * v1[xx]], 1)
            windows = [coarse[li] for _, _, coarse in slabs.slabs]
            k_pad = max(_up(end - start) for start, end, _ in windows)
            b = _aligned((n_slab, k_pad * self.n_pad), np.uint16)
            for s, (start, end, weights) in enumerate(windows):
                self.lib.se_pack_b(_ptr(weights), 1, weights.shape[1], weights.shape[1], end - start, None, 1.0,
                                   self.n_pad, k_pad, _ptr(b[s]))
            native = np.ascontiguousarray(centred[i].reshape(h * w, ch))
            self.levels.append({"q": native, "at": np.ascontiguousarray(at, np.int64), "w": np.ascontiguousarray(wt, np.float32),
                                "starts": np.array([start for start, _, _ in windows], np.int64), "k_pad": k_pad, "b": b,
                                "a": _aligned((n_slab, self.rows * k_pad), np.uint16), "rowmax": np.zeros(self.rows, np.float32),
                                "q_max": float(np.sqrt(np.einsum("ij,ij->i", native, native).max())), "channels": ch})
        n_seg = 1 + len(self.coarse)
        self.segs = (_Segment * (n_slab * n_seg))()
        for s in range(n_slab):
            self.segs[s * n_seg] = _Segment(_ptr(self.a_fine), 0, _ptr(self.b_fine[s]), self.k_fine)
            for g, lv in enumerate(self.levels):
                self.segs[s * n_seg + 1 + g] = _Segment(_ptr(lv["a"][s]), 0, _ptr(lv["b"][s]), lv["k_pad"])
        self.n_seg = n_seg
        self.vals = np.full((self.rows, m), np.inf, np.float32)
        self.idx = np.full((self.rows, m), -1, np.int64)
        self.thr = np.full(self.rows, np.inf, np.float32)
        self.eps = np.zeros(p, np.float64)
        self.sqnorms = []  # each gallery image's |Ug|^2, for rows re-scored at the end
        threads = max(1, min(compute_threads(), self.rows // 32))
        cuts = [self.rows * t // threads // 32 * 32 for t in range(threads + 1)]
        self.parts = list(zip(cuts[:-1], cuts[1:]))
        self.pool = ThreadPoolExecutor(threads)  # ctypes lets go of the GIL: one part of the rows per core

    def add(self, j: int, levels: list[np.ndarray], sqnorms: np.ndarray | None) -> None:
        """Screen gallery image ``j`` (its level maps and, if kept, its upsampled squared norms)."""
        slabs, lib, p, big_w, c = self.slabs, self.lib, self.p, self.slabs.grid[1], self.c_fine
        g = [np.asarray(x, np.float32) for x in levels]
        g_fine = np.ascontiguousarray(np.concatenate([g[i].reshape(p, -1) for i, f in enumerate(slabs.fine) if f], axis=1))
        centred = [g[i].reshape(-1, g[i].shape[2]) - self.mu[i] for i in self.coarse]
        natives = [np.empty((lv["q"].shape[0], gc.shape[0]), np.float32) for lv, gc in zip(self.levels, centred)]
        worst = np.zeros(len(slabs.slabs))
        n_parts = len(self.parts)

        def operands(t: int) -> None:  # part t of the slabs' B and of the native products
            for s in range(t, len(slabs.slabs), n_parts):
                y0, r, _ = slabs.slabs[s]
                worst[s] = lib.se_pack_b(_ptr(g_fine) + 4 * y0 * big_w * c, c, 1, r * big_w, c, _ptr(self.mu_fine), -2.0,
                                         self.n_pad, self.k_fine, _ptr(self.b_fine[s]))
            for lv, gc, out in zip(self.levels, centred, natives):
                a, b = len(out) * t // n_parts, len(out) * (t + 1) // n_parts
                np.matmul(lv["q"][a:b], gc.T, out=out[a:b])  # the coarse level's products at native resolution

        def screen(r0: int, r1: int) -> None:  # rows [r0, r1) against every slab
            for lv, m in zip(self.levels, natives):
                lib.se_upsample_tiles(_ptr(m), m.shape[1], m.shape[1], _ptr(lv["at"]), _ptr(lv["w"]), r0, min(r1, p),
                                      len(lv["starts"]), _ptr(lv["starts"]), lv["k_pad"], self.rows, _ptr(lv["a"]), _ptr(lv["rowmax"]))
            lib.se_screen(r0, r1, len(slabs.slabs), self.n_seg, self.segs, self.n_pad, _ptr(self.norms), j * p,
                          self.cells_per_slab, self.m, _ptr(self.vals), _ptr(self.idx), _ptr(self.thr))

        jobs = [self.pool.submit(operands, t) for t in range(n_parts)]
        # meanwhile: |Ug - mu|^2 = |Ug|^2 - 2 <mu, Ug> + |mu|^2, with <mu, U_l g_l> = U_l <mu_l, g_l>
        n = upsampled_sqnorms(g, slabs.grid) if sqnorms is None else np.asarray(sqnorms, np.float32)
        self.sqnorms.append(n)
        dot = np.zeros(slabs.grid, np.float32)
        mu_sq = float(sum(float(mu @ mu) for mu in self.mu))
        for x, mu in zip(g, self.mu):
            dot += upsample_map(x @ mu, *slabs.grid)
        norms = n - 2 * dot.ravel() + np.float32(mu_sq)
        for s, (y0, r, _) in enumerate(slabs.slabs):
            self.norms[s, : r * big_w] = norms[y0 * big_w : (y0 + r) * big_w]
        slop = 2.0**-20 * float(np.max((np.sqrt(np.maximum(n, 0)) + np.sqrt(mu_sq)) ** 2))  # fp32 sums of the norms
        fp32_term = sum(2 * FP32 * lv["channels"] * lv["q_max"] * float(np.sqrt(np.einsum("ij,ij->i", gc, gc).max()))
                        for lv, gc in zip(self.levels, centred))  # the native products' own rounding
        for f in jobs:
            f.result()
        for f in [self.pool.submit(screen, r0, r1) for r0, r1 in self.parts]:
            f.result()
        eps = 2 * self.q_norm * np.sqrt(worst.max())  # fine: |q_i| |-2 g_j|
        for lv in self.levels:
            eps += 2 * lv["rowmax"][:p]  # coarse: max |M_l row| times the weights' column sum, 2
        np.maximum(self.eps, BF16 * eps + fp32_term + slop, out=self.eps)

    def close(self) -> None:
        self.pool.shutdown()

    def result(self, images, kappa: int) -> TopK:
        """Exact distances of the candidates that may belong; fp32 re-scoring of rows that the screen cannot settle."""
        p, grid = self.p, self.slabs.grid
        order = np.argsort(self.vals[:p], axis=1, kind="stable")
        vals = np.take_along_axis(self.vals[:p], order, 1).astype(np.float64)
        idx = np.take_along_axis(self.idx[:p], order, 1)
        limit = vals[:, kappa - 1] + 2 * self.eps
        which = (vals <= limit[:, None]) & (idx >= 0)
        q_up = concat_upsampled(self.slabs.query, grid)
        exact = exact_distances(q_up, images, grid, idx, which)
        pick = np.lexsort((idx, exact), axis=1)[:, :kappa]
        dist, index = np.take_along_axis(exact, pick, 1), np.take_along_axis(idx, pick, 1)
        # a dropped candidate's expanded distance is >= the list's largest (thr): it cannot belong if thr > limit
        unsettled = np.flatnonzero(~(self.thr[:p].astype(np.float64) > limit))
        self.stats = {"candidates": int(which.sum()), "rows_rescored": int(unsettled.size)}
        if unsettled.size:
            redo = _rescore(self.slabs.query, q_up, images, self.sqnorms, grid, unsettled, kappa)
            dist[unsettled], index[unsettled] = redo.distances, redo.indices
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
