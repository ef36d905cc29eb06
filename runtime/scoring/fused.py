"""CPU scorer without a distance matrix: ``kernels/fused.c`` computes expanded distances tile by tile
and keeps each query row's running candidates in place (docs/speed.md, "The fused kernels").

The candidate policy is every scorer's (scoring/base.py): the m = :func:`.base.keep` (kappa) smallest
expanded distances |g|^2 - 2 q.g (fp32) per query row are kept, each candidate's squared distance is
re-computed exactly from its difference while its block is at hand, and :func:`.base.merge` decides
the kappa nearest, ties to the lower index. So the neighbours are NumpyScorer's; what changes is
that the P x M distance block is never written and re-read (for narrow features, 24-176 channels,
that traffic, not the arithmetic, is what NumpyScorer's BLAS path pays).

The kernel is compiled on first use for the best level this CPU has (:data:`LEVELS`: AVX-512,
AVX2+FMA, NEON, portable C), checked against numpy once, and chosen at run time;
``SPADE_EDGE_CPU_LEVEL`` caps the level (e.g. ``avx2`` on an AVX-512 machine measures the AVX2
kernels; ``numpy``: no fused kernel). The concatenated pyramid takes the per-level cost inside the
fused kernel (:mod:`.fused_levels`: the coarse levels are never upsampled to the fine grid), or for wide
pyramids (WRN50x2, PER_LEVEL_SHARE) on AVX512-BF16 the pyramid screen.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np

from .. import cpu
from ..threads import blas_single_threaded, compute_threads
from . import ccompile, fused_levels, pyramid
from .base import GalleryPyramids, GalleryRows, PixelScorer, TopK, keep, merge
from .numpy import NumpyScorer, uses_levels

LEVEL_ENV = "SPADE_EDGE_CPU_LEVEL"
# level -> (CPU flags it needs, compiler flags): VW floats per vector, RB query rows per register tile
# (AVX-512 and NEON have 32 vector registers: 8 rows x 2 panels of accumulators; AVX2 and SSE 16: 4 x 2;
# sf_levels' tiles on AVX2, RBL, 6 x 2: twelve accumulators hide the FMA latency, 7% on WRN50x2's 256 channels)
LEVELS = {
    "avx512bf16": (
        ("avx512f", "avx512vl", "avx512bw", "avx512_bf16", "avx2", "fma"),
        (
            "-DVW=16",
            "-DRB=8",
            "-mavx512f",
            "-mavx512vl",
            "-mavx512bw",
            "-mavx512bf16",
            "-mavx2",
            "-mfma",
            "-mprefer-vector-width=512",
        ),
    ),
    "avx512vnni": (
        ("avx512f", "avx512vl", "avx512bw", "avx512_vnni", "avx2", "fma"),
        (
            "-DVW=16",
            "-DRB=8",
            "-mavx512f",
            "-mavx512vl",
            "-mavx512bw",
            "-mavx512vnni",
            "-mavx2",
            "-mfma",
            "-mprefer-vector-width=512",
        ),
    ),
    "avx512": (
        ("avx512f", "avx512vl", "avx2", "fma"),
        ("-DVW=16", "-DRB=8", "-mavx512f", "-mavx512vl", "-mavx2", "-mfma", "-mprefer-vector-width=512"),
    ),
    "avx2": (("avx2", "fma"), ("-DVW=8", "-DRB=4", "-DRBL=6", "-mavx2", "-mfma")),
    "neon": (("asimd",), ("-DVW=4", "-DRB=8")),
    "portable": ((), ("-DVW=4", "-DRB=4")),
}
# the bf16 screen repays its set-up (operands centred and packed, a second pass over unsettled rows)
# from about this many multiply-adds (query rows x gallery rows x channels): Lite0's fine level (1.2e10)
# and its concatenation take it, its 14 x 14 level (4e8) does not (docs/speed.md)
SCREEN_WORK = 1e9
BATCH_ROWS = 8192  # gallery rows per kernel call, blocks joined up to it (FusedScorer._batches)
ORDER = {"x86_64": ("avx512bf16", "avx512vnni", "avx512", "avx2", "portable"), "aarch64": ("neon", "portable")}


def levels_here() -> tuple[str, ...]:
    """The kernel levels this CPU can run, best first, capped by ``SPADE_EDGE_CPU_LEVEL``."""
    machine = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    order = ORDER.get(machine, ("portable",))
    cap = os.environ.get(LEVEL_ENV, "").strip().lower()
    if cap == "numpy":
        return ()
    if cap and cap != "amx":  # amx: no cap below it (runtime/scoring/__init__.py cpu_scorer)
        if cap not in order:
            raise ValueError(f"{LEVEL_ENV}={cap!r}: this {machine} CPU's levels are amx, {', '.join(order)} or numpy")
        order = order[order.index(cap) :]
    return tuple(lv for lv in order if cpu.has(*LEVELS[lv][0]))


@cache
def kernel(level: str) -> tuple[ctypes.CDLL | None, str]:
    """(the compiled kernel of ``level``, '') or (None, why not)."""
    try:
        lib = ccompile.load("fused.c", ("-O3", *LEVELS[level][1]))
    except (RuntimeError, OSError) as exc:
        return None, str(exc)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.sf_pack.argtypes = [p, i64, i64, i64, p, i64, p, p]
    lib.sf_pack.restype = None
    lib.sf_search.argtypes = [i64, i64, p, i64, p, p, i64, i64, i32, p, p, p]
    lib.sf_search.restype = None
    lib.sf_exact.argtypes = [i64, i64, p, i64, p, i64, i64, i32, p, p]
    lib.sf_exact.restype = None
    lib.sf_width.restype = lib.sf_rows.restype = lib.sf_has_bf16.restype = lib.sf_has_int8.restype = i32
    if lib.sf_has_int8():
        lib.sf_prep_int8.argtypes = [p, i64, i64, p, i64, i64, i64, ctypes.c_double, p, p, p, p, p]
        lib.sf_prep_int8.restype = None
        lib.sf_screen_int8.argtypes = [i64, i64, p, i64, p, p, p, p, p, p, p, i64, i64, i32, p, p, p]
        lib.sf_screen_int8.restype = None
    if lib.sf_has_bf16():
        lib.sf_prep_bf16.argtypes = [p, i64, i64, p, i64, i64, i64, ctypes.c_double, p, p, p]
        lib.sf_prep_bf16.restype = None
        lib.sf_screen_bf16.argtypes = [i64, i64, p, i64, p, p, p, p, i64, i64, i32, p, p, p]
        lib.sf_screen_bf16.restype = None
    fused_levels.declare(lib)
    if not _agrees(lib):
        return None, f"the compiled {level} kernel disagreed with numpy on its first use"
    return lib, ""


def best() -> tuple[str | None, str]:
    """(the best level that compiles and checks here, '') or (None, why none does)."""
    why = []
    for level in levels_here():
        lib, reason = kernel(level)
        if lib is not None:
            return level, ""
        why.append(f"{level}: {reason}")
    return None, "; ".join(why) or f"{LEVEL_ENV}=numpy"


def available() -> tuple[bool, str]:
    """Whether a fused kernel runs here, and at which level or why not (as the AMX module says)."""
    level, why = best()
    return level is not None, (f"fused kernel, level {level}" if level else why)


# flags every C compiler takes for this source: the check that an installed copy compiles anywhere
FLAGS = LEVELS["portable"][1]


def _agrees(lib) -> bool:
    """A small search against numpy's expanded distances: each row's list is numpy's m smallest."""
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((13, 21), np.float32), rng.standard_normal((77, 21), np.float32)
    vals, idx, _ = Fused(lib).search(q, [g], 5)
    d = (g * g).sum(1)[None, :] - 2 * q @ g.T
    want = np.sort(d, axis=1)[:, :5]
    return bool(np.allclose(vals, want, rtol=1e-4, atol=1e-4) and np.all(np.take_along_axis(d, idx, 1) == want))


class Clock:
    """Where a search's time goes, by part (``stats["seconds"]``; bench speed's profile): each
    :meth:`lap` charges the time since the last one to ``part``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now


KERNEL, EXACT, PACK, READ = (
    "kernel: distances and selection (threads)",
    "exact re-computation of the kept candidates (threads)",
    "operands packed (centred, rounded for a screen)",
    "gallery blocks read (decoded; upsampled in concat mode)",
)


class Fused:
    """One level's kernel driven over blocks of gallery rows, the query rows split among threads."""

    def __init__(self, lib: ctypes.CDLL, clock: Clock | None = None):
        self.lib, self.width, self.rows = lib, int(lib.sf_width()), int(lib.sf_rows())
        self.clock = clock or Clock()

    def start(self, q: np.ndarray, m: int) -> None:
        """New lists of m slots for query rows ``q`` (P, D) float32, C order."""
        self.q, self.m = q, m
        p = len(q)
        self.vals = np.full((p, m), np.inf, np.float32)
        self.idx = np.full((p, m), -1, np.int64)
        self.exact = np.full((p, m), np.inf, np.float32)
        threads = max(1, min(compute_threads(), -(-p // (self.rows * 4))))
        # a few parts per thread, taken as threads come free: a core that another process holds a
        # while does not leave the others waiting for its one big part
        n = max(1, min(4 * threads, p // 64)) if threads > 1 else 1
        cuts = [p * t // n // self.rows * self.rows for t in range(n)] + [p]
        self.parts = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None  # ctypes lets go of the GIL

    def add(self, g: np.ndarray, norms: np.ndarray, base: int) -> None:
        """Offer gallery rows ``g`` (n, D) float32 (squared norms ``norms``), indices base.., to every list;
        then re-compute exactly the candidates of this block that are in the lists now."""
        n, d = g.shape
        w = self.width
        npan = -(-n // (2 * w)) * 2  # panels, a multiple of the kernel's two per step
        g = np.ascontiguousarray(g, np.float32)
        norms = np.ascontiguousarray(norms, np.float32)
        panels = np.empty(npan * d * w, np.float32)
        pnorms = np.empty(npan * w, np.float32)
        lib = self.lib
        lib.sf_pack(g.ctypes.data, n, d, d, norms.ctypes.data, npan, panels.ctypes.data, pnorms.ctypes.data)
        self.clock.lap(PACK)
        q = self.q

        def part(r0: int, r1: int) -> None:
            lib.sf_search(
                r0, r1, q.ctypes.data, d, panels.ctypes.data, pnorms.ctypes.data, npan, base, self.m,
                self.vals.ctypes.data, self.idx.ctypes.data, self.exact.ctypes.data,
            )  # fmt: skip

        self.parallel(part)
        self.clock.lap(KERNEL)
        self.recompute(g, base)

    def parallel(self, part) -> None:
        """``part(r0, r1)`` over this search's parts of the query rows, one per thread."""
        if self.pool is None:
            part(*self.parts[0])
        else:
            for f in [self.pool.submit(part, *rows) for rows in self.parts]:
                f.result()

    def panels_parallel(self, fn, npan: int) -> None:
        """``fn(p0, p1)`` over parts of ``npan`` panels, one per thread (a screen's operands)."""
        threads = self.threads
        cuts = [npan * t // threads for t in range(threads + 1)]
        jobs = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        if self.pool is None or len(jobs) == 1:
            for job in jobs:
                fn(*job)
        else:
            for f in [self.pool.submit(fn, *job) for job in jobs]:
                f.result()

    def recompute(self, g: np.ndarray, base: int) -> None:
        """Exact distances of the candidates from rows ``g`` (indices base..) now in the lists: the
        block is at hand now, not later."""
        g = np.ascontiguousarray(g, np.float32)
        q, lib = self.q, self.lib

        def part(r0: int, r1: int) -> None:
            lib.sf_exact(
                r0, r1, q.ctypes.data, q.shape[1], g.ctypes.data, len(g), base, self.m,
                self.idx.ctypes.data, self.exact.ctypes.data,
            )  # fmt: skip

        self.parallel(part)
        self.clock.lap(EXACT)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def search(self, q: np.ndarray, blocks, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expanded distances, indices, exact distances) of each row's m kept candidates, for arrays at hand."""
        self.start(np.ascontiguousarray(q, np.float32), m)
        base = 0
        try:
            for g in blocks:
                g = np.asarray(g, np.float32)
                self.add(g, np.einsum("ij,ij->i", g, g), base)
                base += len(g)
        finally:
            self.close()
        return self.vals, self.idx, self.exact


def _joined(parts: list) -> tuple[int, np.ndarray, np.ndarray | None]:
    base = parts[0][0]
    if len(parts) == 1:
        return parts[0]
    g = np.concatenate([x[1] for x in parts])
    norms = None if parts[0][2] is None else np.concatenate([np.asarray(x[2], np.float32) for x in parts])
    return base, g, norms


class FusedScorer(NumpyScorer):
    """Exact top-kappa by the fused kernel of this CPU's best level (``level``; :func:`best`). Where
    no kernel compiles here it is NumpyScorer. ``stats["path"]``: "fused <level>", or NumpyScorer's
    path where that ran (the per-level-cost pyramid, or no kernel)."""

    def __init__(self, level: str | None = None, block_bytes: int = 8 << 20, screens: bool = True):
        super().__init__(block_bytes)
        self.screens = screens
        self.level = level if level is not None else best()[0]
        self.lib: Any = kernel(self.level)[0] if self.level else None  # None: NumpyScorer
        self.name = f"fused {self.level}" if self.lib is not None else "numpy"

    def topk(self, query, gallery, kappa: int) -> TopK:
        if self.lib is None:
            return super().topk(query, gallery, kappa)
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        view = GalleryRows.of(gallery)
        q = np.ascontiguousarray(query, np.float32)
        # our threads split the work; BLAS (the concatenated mode's upsampling reads) runs on the calling
        # thread: its pool would spin against ours, and on shared cores small products slow down 5-10x
        with blas_single_threaded():
            screen = self.screen_for(q, view)
            if screen is not None:
                top = self._screened(q, view, kappa, screen)
                if top is not None:
                    return top
            return self._fp32(q, view, kappa, self.stats if screen is not None else {})  # the probe's stats: why

    def screen_for(self, q: np.ndarray, view: GalleryRows) -> str | None:
        """The screen that pays for this search (docs/speed.md, "The fused kernels and the screens"):
        bf16 where the kernel has it and the search is big enough to repay the screen's set-up."""
        work = float(len(q)) * float(view.sizes.sum()) * q.shape[1]
        if not self.screens or work < SCREEN_WORK or q.shape[1] < 8:
            return None
        if self.lib.sf_has_bf16():
            return "bf16"
        if self.lib.sf_has_int8() and q.shape[1] <= 1024:  # where VNNI has no BF16 beside it (Ice Lake)
            return "int8"
        return None

    def _blocks(self, view: GalleryRows, dim: int, clock: Clock):
        """(index of the first row, block as float32) for every non-empty block, shapes checked."""
        base = 0
        for j in range(len(view)):
            clock.lap("set-up and merge")  # what the parts below leave between two blocks
            block = view[j]
            if block.ndim != 2 or block.shape[1] != dim:
                raise ValueError(f"gallery block has shape {block.shape}, expected (M, {dim})")
            g = np.asarray(block, np.float32)
            clock.lap(READ)
            if len(g):
                yield j, base, block, g
            base += len(g)

    def _batches(self, view: GalleryRows, dim: int, clock: Clock, norms: bool):
        """(index of the first row, rows, their squared norms or None) of consecutive blocks joined up
        to :data:`BATCH_ROWS`: a coreset's blocks are a few hundred rows, and each kernel call costs a
        round of thread hand-offs."""
        parts: list = []
        for j, base, block, g in self._blocks(view, dim, clock):
            n = None
            if norms:
                n = view.sqnorms(j, block) if view.keeps_norms else np.einsum("ij,ij->i", g, g)
                if len(n) != len(g):
                    raise ValueError(f"gallery block {j} has {len(g)} rows but {len(n)} kept norms")
            if len(g) >= BATCH_ROWS // 2:  # big enough alone: joining would only copy it
                if parts:
                    yield _joined(parts)
                    parts = []
                yield base, g, n
                continue
            parts.append((base, g, n))
            if sum(len(x[1]) for x in parts) >= BATCH_ROWS:
                yield _joined(parts)
                parts = []
        if parts:
            yield _joined(parts)

    def _fp32(self, q: np.ndarray, view: GalleryRows, kappa: int, why: dict, clock: Clock | None = None) -> TopK:
        clock = clock or Clock()
        run = Fused(self.lib, clock)
        run.start(q, keep(kappa))
        total = 0
        try:
            for base, g, norms in self._batches(view, q.shape[1], clock, norms=True):
                run.add(g, norms, base)
                total = base + len(g)
        finally:
            run.close()
        if total < kappa:
            raise ValueError(f"gallery has {total} features, fewer than kappa = {kappa}")
        top = TopK(*merge(run.exact, run.idx, kappa))
        clock.lap("set-up and merge")
        self.stats = {**why, "path": f"fused {self.level}", "seconds": clock.seconds}
        return top

    def _screened(self, q: np.ndarray, view: GalleryRows, kappa: int, screen: str) -> TopK | None:
        """The screened search; rows it cannot settle are searched again on the fp32 kernel. None
        (and ``stats`` saying why) where a probe of the first blocks leaves too many unsettled."""
        from .screens import GIVE_UP, PROBE, ScreenedSearch

        clock = Clock()
        run = ScreenedSearch(self.lib, q, kappa, screen, clock)
        total, done = 0, 0
        try:
            for base, g, _ in self._batches(view, q.shape[1], clock, norms=False):
                run.add(g, base)
                total, done = base + len(g), done + 1
                if done == PROBE and total < view.sizes.sum() / 2:
                    share = float(run.unsettled().mean())
                    if share > GIVE_UP:  # features too alike for the screen to tell apart
                        self.stats = {"screen": screen, "gave_up_after": done, "unsettled_share": share}
                        return None
        finally:
            run.run.close()
        if total < kappa:
            raise ValueError(f"gallery has {total} features, fewer than kappa = {kappa}")
        rows = np.flatnonzero(run.unsettled())
        d, i = run.result()
        clock.lap("set-up and merge")
        if len(rows):
            again = self._fp32(q[rows], view, kappa, {})
            d[rows], i[rows] = again.distances, again.indices
            clock.lap("unsettled rows searched again (fp32 kernel)")
        self.stats = {
            "path": f"fused {self.level}, {screen} screen",
            "rows_unsettled": int(len(rows)),
            "seconds": clock.seconds,
        }
        return TopK(d, i)

    def topk_pyramid(self, query, gallery, grid, kappa):
        """The concatenated pyramid at per-level cost: for wide pyramids (WRN50x2, :func:`.numpy.uses_levels`)
        screened in bf16 where this level has AVX512-BF16 (:meth:`pyramid_screen`); otherwise inside this
        level's fused kernel (:meth:`topk_levels`), where the pyramid has a level at the fine grid. Else the
        upsampled rows through the kernel."""
        if self.lib is None:
            return super().topk_pyramid(query, gallery, grid, kappa)
        if uses_levels(query, grid):
            screen = self.pyramid_screen()
            if screen is not None:
                top = screen.topk_pyramid(query, gallery, grid, kappa)
                self.stats = screen.stats
                return top
        # our threads split the work; BLAS runs on each of them alone (see topk)
        with blas_single_threaded():
            if any(tuple(np.shape(x)[:2]) == tuple(grid) for x in query):
                return self.topk_levels(query, gallery, grid, kappa)
            return PixelScorer.topk_pyramid(self, query, gallery, grid, kappa)

    def topk_levels(self, query, gallery, grid, kappa: int) -> TopK:
        """The concatenated pyramid at per-level cost inside this level's fused kernel (:mod:`.fused_levels`),
        whatever its width; ``query`` needs a level at the fine ``grid``. :meth:`topk_pyramid` takes it for
        every pyramid but a wide one that the bf16 pyramid screen takes."""
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        view = GalleryPyramids.of(gallery, grid)
        p = grid[0] * grid[1]
        if len(view) * p < kappa:
            raise ValueError(f"gallery has {len(view) * p} features, fewer than kappa = {kappa}")
        clock = Clock()
        run = fused_levels.LevelsSearch(self.lib, query, grid, kappa, clock)
        kept, reach = [], np.empty(len(view))
        try:
            for j in range(len(view)):
                levels = [np.asarray(x, np.float32) for x in view[j]]  # decoded once, for the kernel and the bound
                norms = np.asarray(view.sqnorms(j, levels), np.float64)
                run.add(levels, norms, j * p)  # the next image is read and packed while this one's kernel runs
                kept.append(norms)
                reach[j] = pyramid.reach(levels)
            run.wait()
        finally:
            run.close()
        top = run.result(view, kept, reach)
        clock.lap("set-up and merge")
        self.stats = {
            "path": f"fused {self.level} levels",
            "native_x": [c.groups is not None for c in run.coarse],  # coarse levels multiplied at native x
            "seconds": clock.seconds,
        }
        return top

    def pyramid_screen(self) -> PixelScorer | None:
        """The AMX screen's method with its products on AVX512-BF16 (:mod:`.amx`, back-end "avx512bf16")
        for wide pyramids (WRN50x2), where this scorer's level is avx512bf16 and the screen compiles and
        checks here; else None (NumpyScorer's per-level path). Its ``stats["path"]`` says which ran."""
        if not self.screens or self.level != "avx512bf16":
            return None
        from . import amx

        if not amx.available("avx512bf16")[0]:
            return None
        return amx.AmxScorer(self.block_bytes, backend="avx512bf16")

    def __repr__(self) -> str:
        return f"FusedScorer(level={self.level!r})"
