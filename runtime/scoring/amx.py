"""CPU scorer on Intel AMX (Xeon 4th generation and later): distances screened in bf16 by the tile
unit, then re-computed exactly (docs/speed.md, "The AMX screen").

The screen (:mod:`.amx_screen`, ``kernels/amx_screen.c``) ranks a lower bound of each expanded
distance and keeps the m = :func:`.base.keep` (kappa) = kappa + SPARE smallest per query row (the
candidate policy of every scorer, scoring/base.py). Kept candidates that may belong are
re-computed exactly; a row whose dropped candidates might still belong is searched again in fp32. So
the neighbours are NumpyScorer's, ties to the lower index, whatever the data; the data only decide
how much the screen saves. Where the CPU, the compiler or the kernel is missing, this is NumpyScorer.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Sequence
from functools import cache

import numpy as np

from .. import cpu
from ..resample import interp_matrix, upsample_hwc
from ..threads import blas_single_threaded
from . import ccompile
from .amx_screen import PlainScreen, PyramidScreen, aligned, bf16, factors, parts, ptr, settle_blocks, tiled
from .base import SPARE, Candidates, GalleryPyramids, GalleryRows, TopK, concat_upsampled, smallest
from .numpy import NumpyScorer
from .pyramid import PyramidSlabs, exact_distances

# SPARE (scoring/base.py): candidates kept past kappa; a row is searched again in fp32 when its list ends
# inside the error window
# after PROBE gallery items, a screen that leaves more than GIVE_UP of the rows unsettled is dropped for
# the fp32 path: searching rows again one by one costs more than searching them all (docs/speed.md)
PROBE, GIVE_UP = 4, 0.2
# unsettled plain rows go to a three-product screen when there are this many: it packs the gallery
# again (3 bf16 blocks per row), which fp32 beats on fewer rows (docs/speed.md)
RESCREEN_ROWS = 256
# the screen's two back-ends (kernels/amx_screen.c): its products on AMX tiles, or on AVX512-BF16's
# VDPBF16PS over the same packed operands -> (CPU flags, what lacks them, compiler flags)
BACKENDS = {
    "amx": (
        ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16"),
        "this CPU has no AMX-BF16 tile unit",
        ("-O3", "-DSE_AMX", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16"),
    ),
    "avx512bf16": (
        ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
        "this CPU has no AVX512-BF16",
        ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mprefer-vector-width=512"),
    ),
}
FLAGS = BACKENDS["amx"][2]
# coarse window values in two bf16 parts (16 bits) or one (8 bits: half the coarse products, a wider bound),
# or (0, AVX-512 only) as fp32 taps: each fine column's four native cells read and weighted in fp32, a few
# multiply-adds where the parts took a product per window cell. One part halved the WRN50x2 kernel on uniform
# random features but left 1533 of 3136 rows unsettled on ELPV through WRN50x2 (end to end 6.3 s against 1.3 s)
# (docs/speed.md)
COARSE_PARTS = {"amx": 2, "avx512bf16": 0}
LABELS = {"avx512bf16": "AVX512-BF16 screen: bf16 products, selection (threads)"}  # the kernel's part of the time


@cache
def _kernel(backend: str = "amx") -> tuple[ctypes.CDLL | None, str]:
    """(the compiled screen of ``backend``, '') or (None, why not)."""
    needs, lacking, flags = BACKENDS[backend]
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"{backend} is an x86-64 feature; this is {platform.machine()}"
    if not cpu.has(*needs):
        return None, lacking
    try:
        lib = ccompile.load("amx_screen.c", flags)
    except (RuntimeError, OSError) as exc:
        return None, str(exc)
    if not lib.se_enable():
        return None, "the Linux kernel did not grant AMX state (needs Linux >= 5.16)"
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.se_pack_b.argtypes = [p, i64, i64, i32, i32, p, f32, i32, i32, i32, p, p, p]
    lib.se_pack_b.restype = None
    lib.se_taps.restype = ctypes.c_int
    lib.se_screen.argtypes = [i64, i64, i64, i32, i32, p, p, i64, i32, p, p, p, p, i64, i64, i32, p, p, p]
    lib.se_screen.restype = None
    if not _agrees(lib):
        return None, f"the compiled {backend} screen disagreed with numpy on its first use"
    return lib, ""


def available(backend: str = "amx") -> tuple[bool, str]:
    """Whether the screen's ``backend`` (:data:`BACKENDS`) runs here, and if not, why."""
    lib, why = _kernel(backend)
    return lib is not None, why or f"{backend} screen compiled and checked"


def _agrees(lib) -> bool:
    """One 32 x 32 screen against numpy's product: each row's smallest value within the bound."""
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((32, 40), np.float32), rng.standard_normal((32, 40), np.float32)
    a = tiled(parts(q), 32)
    b, col, sq = aligned((64 * 32,), np.uint16), np.zeros(32, np.float32), np.zeros(32, np.float32)
    lib.se_pack_b(ptr(g), 40, 1, 32, 40, None, -2.0, 32, 64, 1, ptr(b), ptr(col), ptr(sq))
    e = (factors(64)[0] * 2 * np.linalg.norm(q, axis=1)).astype(np.float32)
    vals, idx, thr = (
        np.full((32, 1), np.inf, np.float32),
        np.full((32, 1), -1, np.int64),
        np.full(32, np.inf, np.float32),
    )
    lib.se_screen(
        0,
        32,
        32,
        1,
        32,
        ptr(a),
        ptr(b),
        64,
        0,
        None,
        ptr(sq),
        ptr(col),
        ptr(e),
        0,
        32,
        1,
        ptr(vals),
        ptr(idx),
        ptr(thr),
    )
    norms = np.linalg.norm(g, axis=1)
    lower = (norms**2)[None, :] - 2 * q @ g.T - e[:, None] * norms[None, :]
    slack = 2 * e * norms.max() + 1e-3
    return bool(
        np.allclose(col, norms, rtol=1e-5)
        and np.allclose(sq, norms**2, rtol=1e-5)
        and np.all(np.abs(vals[:, 0] - lower.min(1)) <= slack)
    )


def _weights_exact(slabs: PyramidSlabs) -> bool:
    """Whether the interpolation weights are exact in bf16 (they are for integer scale factors):
    the error bound takes only the left operands as rounded."""
    return all(
        np.array_equal(bf16(w).astype(np.uint32) << 16, w.view(np.uint32))
        for _, _, coarse in slabs.slabs
        for _, _, w in coarse
    )


class AmxScorer(NumpyScorer):
    """NumpyScorer whose searches run the AMX screen; where the screen is not available
    (:func:`available`), it is NumpyScorer. ``backend`` "avx512bf16": the same screen with its products
    on AVX512-BF16 (:data:`BACKENDS`). ``stats``: what the last search did."""

    name = "amx"

    def __init__(self, block_bytes: int = 8 << 20, backend: str = "amx"):
        super().__init__(block_bytes)
        if backend not in BACKENDS:
            raise ValueError(f"unknown screen back-end {backend!r}: {', '.join(BACKENDS)}")
        self.backend = backend
        self.name = "amx" if backend == "amx" else f"{backend} screen"
        self.stats: dict = {}

    def topk(self, query, gallery, kappa):
        lib, _ = _kernel(self.backend)
        blocks = GalleryRows.of(gallery)  # a view: read twice, screen then re-check
        if lib is None or kappa < 1 or np.ndim(query) != 2:
            self.stats = {"path": "fp32"}
            return self._fp32(super().topk, query, blocks, kappa)
        top = self._plain(lib, np.asarray(query, np.float32), blocks, kappa, three=False)
        return self._fp32(super().topk, query, blocks, kappa) if top is None else top

    def _fp32(self, search, *args) -> TopK:
        """The fp32 path (NumpyScorer's ``search``), with this scorer's stats saying why it was taken."""
        why = self.stats
        top = search(*args)
        self.stats = {**self.stats, **why}
        return top

    def _plain(self, lib, q: np.ndarray, blocks: Sequence, kappa: int, three: bool) -> TopK | None:
        """The screen of rows ``q``; rows it cannot settle are screened again with three products, and
        what that cannot settle goes to the fp32 path. None: the first screen gave up."""
        screen = PlainScreen(lib, q, kappa + SPARE, three)
        if not self._screen(screen, _Args(blocks), kappa):
            return None
        if screen.offset < kappa:
            raise ValueError(f"gallery has {screen.offset} features, fewer than kappa = {kappa}")
        again: dict[str, int] = {}

        def rescore(rows: np.ndarray) -> TopK:
            if three or len(rows) < RESCREEN_ROWS:
                return NumpyScorer(self.block_bytes).topk(q[rows], blocks, kappa)
            top = self._plain(lib, q[rows], blocks, kappa, three=True)
            if top is None:  # the three-product screen gave up too
                top = NumpyScorer(self.block_bytes).topk(q[rows], blocks, kappa)
            again.update(rows_rescreened=len(rows), rows_rescored=self.stats.get("rows_rescored", len(rows)))
            return top

        top = settle_blocks(screen, q, blocks, kappa, rescore)
        self._settled(screen, top)
        self.stats.update(again)
        return top

    def topk_pyramid(self, query, images, grid, kappa):
        lib, _ = _kernel(self.backend)
        slabs = PyramidSlabs(query, grid, rows=4)  # on AVX512-BF16 too: 1 and 2 rows per slab ran 5-10% slower
        images = GalleryPyramids.of(images, grid)
        if lib is None or not slabs.c_fine or kappa < 1 or not len(images) or not _weights_exact(slabs):
            self.stats = {"path": "fp32"}
            return self._fp32(super().topk_pyramid, query, images, grid, kappa)
        screen = PyramidScreen(lib, slabs, kappa + SPARE, COARSE_PARTS[self.backend])
        screen.label = LABELS.get(self.backend, screen.label)
        items = _Pyramids(images)  # with the norms the gallery keeps (GalleryView.sqnorms)
        if not self._screen(screen, items, kappa):
            return self._fp32(super().topk_pyramid, query, images, grid, kappa)
        q_up = concat_upsampled(query, grid)
        top = screen.settle(
            kappa,
            lambda idx, which: exact_distances(q_up, images, grid, idx, which),
            lambda rows: _rescore(query, q_up, images, screen.sqnorms, grid, rows, kappa),
        )
        return self._settled(screen, top)

    def _screen(self, screen, items, kappa: int) -> bool:
        """Screen every item (arguments of ``screen.add``); False (and the screen closed) when a probe
        of the first PROBE leaves more than GIVE_UP of the rows unsettled."""
        done = 0
        try:
            with blas_single_threaded():  # our threads split the BLAS work; its own pool would only spin against them
                for j in range(len(items)):
                    screen.add(*items[j])
                    done += 1
                    if done == PROBE and len(items) > 2 * PROBE:
                        share = float(screen.unsettled(kappa).mean())
                        if share > GIVE_UP:  # features too alike for bf16 to tell apart (or a query unlike the gallery)
                            self.stats = {"path": "fp32", "gave_up_after": done, "unsettled_share": share}
                            return False
        finally:
            screen.close()
        return True

    def _settled(self, screen, top: TopK) -> TopK:
        self.stats = {"path": self.name, **screen.stats}
        return top


class _Args(Sequence):
    """Items as argument tuples for ``screen.add``, read lazily."""

    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j):
        return (self.items[j],)


class _Pyramids(_Args):
    """Gallery pyramids (a :class:`.base.GalleryPyramids`) with their kept norms, as arguments of
    PyramidScreen.add (None where the view keeps none: the screen makes them on its own clock)."""

    def __getitem__(self, j):
        levels = self.items[j]
        return levels, self.items.sqnorms(j, levels) if self.items.keeps_norms else None


def _rescore(
    query: list[np.ndarray],
    q_up: np.ndarray,
    images,
    sqnorms: list[np.ndarray],
    grid: tuple[int, int],
    rows: np.ndarray,
    kappa: int,
) -> TopK:
    """Query rows ``rows`` on NumpyScorer's fp32 terms, image by image: the expanded distances of those
    rows only, each level's products taken at the gallery's native resolution and upsampled after."""
    big_h, big_w = grid
    p, n = big_h * big_w, len(rows)
    q_levels = [upsample_hwc(x, *grid).reshape(p, -1)[rows] for x in query]
    top = Candidates(n, kappa)
    for j in range(len(images)):
        levels = [np.asarray(x, np.float32) for x in images[j]]
        d = np.repeat(sqnorms[j][None, :], n, axis=0)
        for q, x in zip(q_levels, levels):
            h, w, c = x.shape
            prod = (q @ x.reshape(h * w, c).T).reshape(n, h, w)
            if (h, w) != (big_h, big_w):
                prod = interp_matrix(big_h, h) @ prod @ interp_matrix(big_w, w).T
            d -= 2 * prod.reshape(n, p)
        cand, val = smallest(d, min(kappa, p))
        top.add(val, cand + j * p)
    top.exact = exact_distances(q_up[rows], images, grid, top.index, top.index >= 0)
    return top.result()
