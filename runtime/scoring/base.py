"""The contract every pixel scorer follows: what it is given, what it keeps, how it decides.

**What a scorer is given.** A query (P, D) and a gallery view: :class:`GalleryRows` (per-level
mode: one block of (M_j, D) rows per retrieved image) or :class:`GalleryPyramids` (concatenated
mode: one list of (h_l, w_l, C_l) level maps per retrieved image, compared as if upsampled to the
finest grid and concatenated). A view decodes a block each time it is indexed (a scorer may read a
block twice; the gallery is never all in memory in fp32), hands out each block's squared norms as
the gallery keeps them (:meth:`GalleryView.sqnorms`), and says which grid cell each row is
(:meth:`GalleryView.cells`). The gallery side builds views (``Gallery.level_view``,
``Gallery.pyramid_view``); a plain list of arrays is taken as a view of itself (:meth:`GalleryView.of`).

**Candidate policy.** Every scorer first ranks gallery rows by a cheaper distance than the exact
one (the expansion |g|^2 - 2 q.g in fp32, on the GPU as on the CPU, or a bf16 lower bound of it on
AMX), which can misorder rows whose distances differ by less than its rounding. So each query row
keeps :func:`keep` (kappa) = kappa + :data:`SPARE` candidates by that ranking (:class:`Candidates`;
a batch of rows - a block step, a slab, a tile - offers at least its kappa best, :func:`smallest`),
their squared distances are re-computed exactly from differences, and the kappa smallest exact
distances win, ties to the lower gallery index (:func:`merge`). A true neighbour is lost only if
more than SPARE candidates ranked ahead of it within the cheap form's rounding; the AMX screen also
proves, row by row, that nothing it dropped can belong, and searches a row again where it cannot.

**What a scorer reports.** :class:`TopK` (distances ascending, indices into the concatenation of
the view's blocks), and ``stats``: what the last search did, at least ``{"path": ...}``, the path
of the scorer that produced the result (a scorer that hands a search over says so there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

SPARE = 15  # candidates kept past kappa per query row, ranked by the cheap distance (see the module's policy)


def keep(kappa: int) -> int:
    """Candidates a search keeps per query row before exact re-scoring: kappa + :data:`SPARE`."""
    return kappa + SPARE


@dataclass
class TopK:
    """``distances`` (P, kappa) squared L2, ascending; ``indices`` (P, kappa) into the
    concatenation of all gallery blocks, in the order they were given."""

    distances: np.ndarray
    indices: np.ndarray


# -- the gallery as a scorer reads it ---------------------------------------------------------------


class GalleryView(Sequence):
    """Blocks of gallery rows, one per retrieved image, as a scorer reads them.

    ``read(j)``: block j, decoded anew on every indexing. ``sizes``: rows per block (known without
    decoding). ``norms(j, block)``: block j's squared row norms as the gallery keeps them (made on
    first use and kept); None: made here each time they are asked for. ``cells(j, rows)``: grid
    cells (y, x) of rows of block j; None: rows are the cells of a dense ``grid``, row-major.
    """

    def __init__(
        self,
        read: Callable[[int], object],
        sizes: Sequence[int] | np.ndarray,
        norms: Callable | None = None,
        cells: Callable | None = None,
        grid: tuple[int, int] | None = None,
    ):
        self._read, self._norms, self._cells = read, norms, cells
        self.sizes = np.asarray(sizes, np.int64)
        # (gallery, level name(s), image indices) where a loaded gallery made this view: a scorer that
        # holds that gallery on its device (PixelScorer.attach) reads the images there
        self.source: tuple | None = None
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(f"gallery view has {len(self)} blocks, no block {j}")
        return self._read(int(j) % len(self))

    @property
    def keeps_norms(self) -> bool:
        """Whether :meth:`sqnorms` hands out norms kept beside the gallery (else it makes them)."""
        return self._norms is not None

    def sqnorms(self, j: int, block=None) -> np.ndarray:
        """Squared norms of block j's rows; ``block``: block j, where the caller has it at hand
        (spares a second decoding when the norms are not kept yet)."""
        if self._norms is not None:
            return self._norms(j, block)
        return self.make_sqnorms(self[j] if block is None else block)

    def make_sqnorms(self, block) -> np.ndarray:
        raise NotImplementedError

    def cells(self, j: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid cells (y, x) of rows ``rows`` of block j."""
        if self._cells is not None:
            return self._cells(j, rows)
        if self.grid is None:
            raise ValueError("this gallery view knows no grid: its rows have no cells")
        return np.divmod(np.asarray(rows, np.int64), self.grid[1])

    def starts(self) -> np.ndarray:
        """Index of each block's first row in the concatenation of all blocks, and the total: (len + 1,)."""
        return np.r_[0, np.cumsum(self.sizes)].astype(np.int64)


class GalleryRows(GalleryView):
    """Per-level mode: block j is an (M_j, D) array of gallery rows, in the dtype the gallery stores."""

    @classmethod
    def of(
        cls,
        blocks: Iterable[np.ndarray],
        sqnorms: Sequence[np.ndarray] | None = None,
        grid: tuple[int, int] | None = None,
    ) -> GalleryRows:
        """A view of arrays at hand (an iterator is read once and kept); ``sqnorms``: their kept
        squared row norms, one array per block."""
        if isinstance(blocks, GalleryRows):
            return blocks
        blocks = list(blocks)
        for b in blocks:
            if np.ndim(b) != 2:
                raise ValueError(f"gallery block has shape {np.shape(b)}, expected (M, D)")
        if sqnorms is not None:
            sqnorms = list(sqnorms)
            if len(sqnorms) != len(blocks):
                raise ValueError(f"{len(sqnorms)} arrays of kept norms for {len(blocks)} gallery blocks")
        return cls(
            blocks.__getitem__,
            [len(b) for b in blocks],
            None if sqnorms is None else (lambda j, block=None: sqnorms[j]),
            grid=grid,
        )

    def make_sqnorms(self, block) -> np.ndarray:
        b = np.asarray(block, np.float32)
        return np.einsum("ij,ij->i", b, b)


class GalleryPyramids(GalleryView):
    """Concatenated mode: block j is a list of (h_l, w_l, C_l) level maps, compared as their bilinear
    upsampling to ``grid`` concatenated: grid[0] * grid[1] rows, row r at cell divmod(r, grid[1])."""

    grid: tuple[int, int]  # always known here

    def __init__(self, read: Callable[[int], list], count: int, grid: tuple[int, int], norms: Callable | None = None):
        super().__init__(read, [grid[0] * grid[1]] * count, norms, None, grid)

    @classmethod
    def of(cls, images: Sequence[list[np.ndarray]], grid: tuple[int, int], keep_norms: bool = False) -> GalleryPyramids:
        """A view of level maps at hand; ``keep_norms``: make every image's norms now and keep them,
        as a loaded gallery does once it has made them."""
        if isinstance(images, GalleryPyramids):
            return images
        images = list(images)
        view = cls(images.__getitem__, len(images), grid)
        if not keep_norms:
            return view
        kept = [view.make_sqnorms(g) for g in images]
        return cls(images.__getitem__, len(images), grid, lambda j, block=None: kept[j])

    def make_sqnorms(self, block) -> np.ndarray:
        from .pyramid import upsampled_sqnorms

        return upsampled_sqnorms(block, self.grid)

    def upsampled(self) -> GalleryRows:
        """The same gallery as rows of the upsampled concatenation (the plain search's input), with
        the same kept norms."""
        return GalleryRows(
            lambda j: concat_upsampled(self[j], self.grid),
            self.sizes,
            (lambda j, block=None: self.sqnorms(j)) if self.keeps_norms else None,
            grid=self.grid,
        )


# -- candidates: selection, running lists, the exact decision ---------------------------------------


def smallest(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


def merge(distances, indices, k: int, xp=np):
    """The decision of every scorer: per row, the ``k`` smallest exact ``distances`` (P, n),
    ascending, ties to the lower gallery index; empty slots (index -1) carry +inf and come last.
    ``distances`` and ``indices`` may be lists of (P, n_i) parts, merged side by side; ``xp`` is
    the array module (numpy, or CuPy for arrays on the GPU). Returns (distances, indices)."""
    if isinstance(distances, (list, tuple)):
        distances, indices = xp.concatenate(list(distances), axis=1), xp.concatenate(list(indices), axis=1)
    # by index first, then stably by distance: equal distances stay in index order (CuPy's argsort is
    # always stable and takes no other kind)
    stable = {"kind": "stable"} if xp is np else {}
    by_index = xp.argsort(indices, axis=1, **stable)
    d = xp.take_along_axis(distances, by_index, 1)
    i = xp.take_along_axis(indices, by_index, 1)
    by_distance = xp.argsort(d, axis=1, **stable)[:, :k]
    return xp.take_along_axis(d, by_distance, 1), xp.take_along_axis(i, by_distance, 1)


class Candidates:
    """Each query row's running candidates, :func:`keep` (kappa) of them, ranked by the cheap distance
    (``approx``); their exact distances (``exact``, inf until the scorer fills them in) decide the
    final kappa (:meth:`result`, by :func:`merge`)."""

    def __init__(self, p: int, kappa: int):
        self.kappa = kappa
        n = keep(kappa)
        self.approx = np.full((p, n), np.inf, np.float32)
        self.index = np.full((p, n), -1, np.int64)
        self.exact = np.full((p, n), np.inf, np.float32)

    def add(self, approx: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Merge candidates; returns (query, slot) of those that entered (their exact distance unset).
        Only rows where a candidate beats the list's last are touched (ties: earlier candidates stay)."""
        n = self.approx.shape[1]
        rows = np.flatnonzero((approx < self.approx[:, -1:]).any(axis=1))
        all_a = np.concatenate([self.approx[rows], approx[rows]], axis=1)
        order = np.argsort(all_a, axis=1, kind="stable")[:, :n]
        self.approx[rows] = np.take_along_axis(all_a, order, 1)
        self.index[rows] = np.take_along_axis(np.concatenate([self.index[rows], index[rows]], axis=1), order, 1)
        self.exact[rows] = np.take_along_axis(
            np.concatenate([self.exact[rows], np.full((len(rows), approx.shape[1]), np.inf, np.float32)], axis=1),
            order,
            1,
        )
        r, slot = np.nonzero((order >= n) & (self.index[rows] >= 0))
        return rows[r], slot

    def may_belong(self, error: np.ndarray) -> np.ndarray:
        """The candidates whose exact distance may be among the kappa smallest, given ``error`` (same
        shape as ``approx``), a bound on each one's |cheap - exact| distance: those whose lower bound
        is at most the kappa-th smallest upper bound (as the AMX screen settles). Only these need
        re-computing; the others cannot displace them."""
        real = self.index >= 0
        limit = np.sort(np.where(real, self.approx + error, np.inf), axis=1)[:, self.kappa - 1 : self.kappa]
        return real & (self.approx - error <= limit)

    def result(self) -> TopK:
        return TopK(*merge(self.exact, self.index, self.kappa))


# -- the interface ----------------------------------------------------------------------------------


class PixelScorer(ABC):
    """Exact kappa-nearest-neighbour search of query rows against a gallery view (module docstring:
    the contract). Subclasses implement :meth:`topk`, and may compute :meth:`topk_pyramid` more
    cheaply than by upsampling."""

    name: str = "base"

    def __init__(self):
        self.stats: dict = {}

    @abstractmethod
    def topk(self, query: np.ndarray, gallery: GalleryRows | Iterable[np.ndarray], kappa: int) -> TopK:
        """Search ``query`` (P, D) against the rows of ``gallery`` (a :class:`GalleryRows`, or arrays
        taken as one by :meth:`GalleryRows.of`); return the kappa nearest."""

    def topk_pyramid(
        self,
        query: list[np.ndarray],
        gallery: GalleryPyramids | Sequence[list[np.ndarray]],
        grid: tuple[int, int],
        kappa: int,
    ) -> TopK:
        """The concatenated pyramid: ``query`` is a list of (h_l, w_l, C_l) level maps, ``gallery``
        a :class:`GalleryPyramids` on ``grid`` (or lists of level maps, taken as one). Row indices
        count ``grid`` cells image after image. This default upsamples and concatenates."""
        view = GalleryPyramids.of(gallery, grid)
        return self.topk(concat_upsampled(query, grid), view.upsampled(), kappa)

    def attach(self, gallery) -> None:
        """Hold ``gallery`` (a loaded Gallery) where this scorer computes, once, before searches
        through its views; called at load and on every reload. CPU scorers read it in place: nothing
        to do (the CUDA scorer uploads it to the device)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def concat_upsampled(levels: list[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """(h_l, w_l, C_l) maps -> their bilinear upsampling to ``grid``, concatenated: (H*W, sum C_l)."""
    from ..resample import upsample_hwc

    return np.concatenate([upsample_hwc(x, *grid) for x in levels], axis=2).reshape(grid[0] * grid[1], -1)
