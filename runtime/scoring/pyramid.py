"""The concatenated pyramid without upsampling whole feature maps (docs/speed.md): per gallery image,
the norms of its upsampled features and, per slab of fine-grid rows, products accumulated in place
that yield the expanded distances |Ug|^2 - 2 <Uq, Ug> of every level."""

from __future__ import annotations

import numpy as np

from ..resample import interp_matrix, taps, upsample_hwc
from .blas import gemm


class PyramidSlabs:
    """Expanded distances of one test image's pyramid against gallery images, slab by slab.

    Coarse level l enters through its dot products at native resolution, upsampled on the query
    side only: M_l = (U_l Q_l) G_l^T, (P, h_l * w_l). For a slab of fine gallery rows Y the distances
    are [q_fine | 1] @ [-2 g_fine(Y)^T ; |Ug(Y)|^2], plus, per coarse level, M_l[:, y(Y)] @
    (-2 A_h[Y, y]^T (x) A_w^T), where y(Y) are the few native rows the slab's rows interpolate from:
    the interpolation of both gallery axes is folded into a product whose contraction (one per
    native cell read) is small next to the fine channels. The coarse products accumulate into the
    slab in place (:func:`.blas.gemm`), reading M_l's rows y(Y) as a window: nothing is copied.
    """

    def __init__(self, query: list[np.ndarray], grid: tuple[int, int], rows: int = 4):
        big_h, big_w = grid
        self.grid = (big_h, big_w)
        self.p = big_h * big_w
        self.query = [np.asarray(x, np.float32) for x in query]
        self.fine = [x.shape[:2] == self.grid for x in self.query]
        self.c_fine = sum(x.shape[2] for x, f in zip(self.query, self.fine) if f)
        self.slabs = []  # (first row, rows, [(first native cell, end, weights) per coarse level])
        for y0 in range(0, big_h, rows):
            ys = np.arange(y0, min(y0 + rows, big_h))
            coarse = []
            for x, f in zip(self.query, self.fine):
                if not f:
                    a_h = interp_matrix(big_h, x.shape[0])[ys]
                    used = np.flatnonzero(a_h.any(axis=0))  # contiguous: bilinear taps are neighbours
                    w = x.shape[1]
                    weights = np.kron(a_h[:, used].T, interp_matrix(big_w, w).T) * np.float32(-2.0)
                    coarse.append((used[0] * w, (used[-1] + 1) * w, np.ascontiguousarray(weights, np.float32)))
            self.slabs.append((y0, len(ys), coarse))
        self.contraction = self.c_fine + 1 + max(sum(e - s for s, e, _ in c) for _, _, c in self.slabs)
        self.rows = rows
        self._left: np.ndarray | None = None

    def _buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[q_fine | 1], the right-hand side and the slab, made on first use (a caller may only
        have wanted ``contraction``)."""
        if self._left is None:
            width = self.rows * self.grid[1]
            self._left = np.empty((self.p, self.c_fine + 1), np.float32)
            if self.c_fine:
                self._left[:, : self.c_fine] = np.concatenate(
                    [x.reshape(self.p, -1) for x, f in zip(self.query, self.fine) if f], axis=1
                )
            self._left[:, self.c_fine] = 1.0
            self._right = np.empty((self.c_fine + 1, width), np.float32)
            self._out = np.empty((self.p, width), np.float32)
        return self._left, self._right, self._out

    def coarse_products(self, gallery: list[np.ndarray]) -> list[np.ndarray]:
        """M_l = (U_l Q_l) G_l^T, (P, h_l * w_l), for every coarse level."""
        big_h, big_w = self.grid
        m = []
        for q, g, f in zip(self.query, gallery, self.fine):
            if f:
                continue
            h, w, c = g.shape
            native = q.reshape(-1, c) @ np.asarray(g, np.float32).reshape(h * w, c).T  # (n_q, n_g), native
            m.append(upsample_hwc(native.reshape(q.shape[0], q.shape[1], -1), big_h, big_w).reshape(self.p, h * w))
        return m

    def __call__(self, gallery: list[np.ndarray], sqnorms: np.ndarray | None = None):
        """Yield (first fine cell, expanded distances (P, cells)) slab by slab for one gallery image.
        ``sqnorms``: :func:`upsampled_sqnorms` of ``gallery`` where the caller keeps them; the
        distances are a buffer that the next slab overwrites."""
        big_w = self.grid[1]
        m = self.coarse_products(gallery)
        norms = upsampled_sqnorms(gallery, self.grid) if sqnorms is None else sqnorms
        fine = [np.asarray(x, np.float32) for x, f in zip(gallery, self.fine) if f]
        g_fine = (fine[0] if len(fine) == 1 else np.concatenate(fine, axis=2)).reshape(self.p, -1)
        c = self.c_fine
        left, right_buf, out_buf = self._buffers()
        for y0, r, coarse in self.slabs:
            cells = slice(y0 * big_w, (y0 + r) * big_w)
            right, out = right_buf[:, : r * big_w], out_buf[:, : r * big_w]
            np.multiply(g_fine[cells].T, -2.0, out=right[:c])
            right[c] = norms[cells]
            gemm(left, right, out)
            for mi, (start, end, weights) in zip(m, coarse):
                gemm(mi[:, start:end], weights, out, beta=1.0)
            yield cells.start, out


def contraction(query: list[np.ndarray], grid: tuple[int, int], rows: int = 4) -> int:
    """``PyramidSlabs(query, grid, rows).contraction`` without making the slabs' weights (the choice of
    path asks only this; the slabs' Kronecker weights cost milliseconds on a 5-image search)."""
    big_h = grid[0]
    c_fine = sum(x.shape[2] for x in query if tuple(x.shape[:2]) == tuple(grid))
    coarse = [(interp_matrix(big_h, x.shape[0]), x.shape[1]) for x in query if tuple(x.shape[:2]) != tuple(grid)]
    widest = 0
    for y0 in range(0, big_h, rows):
        total = 0
        for a_h, w in coarse:
            used = np.flatnonzero(a_h[y0 : y0 + rows].any(axis=0))
            total += (used[-1] + 1 - used[0]) * w
        widest = max(widest, total)
    return c_fine + 1 + widest


def upsampled_sqnorms(levels: list[np.ndarray], grid: tuple[int, int]) -> np.ndarray:
    """|concatenated, upsampled pyramid|^2 per fine cell, (H * W,) float64, without upsampling: coarse
    levels are upsampled along y only, the x interpolation is expanded (:func:`_x_upsampled_sqnorms`).
    Sums run in float64: a gallery keeps these norms, and the expanded distances of near neighbours
    differ by far less than an fp32 sum of a thousand squares can be off."""
    big_h, big_w = grid
    norms = np.zeros((big_h, big_w), np.float64)
    for g in levels:
        g = np.asarray(g, np.float32)
        if g.shape[:2] == (big_h, big_w):
            norms += np.einsum("yxc,yxc->yx", g, g, dtype=np.float64)
        else:
            norms += _x_upsampled_sqnorms(upsample_hwc(g, big_h, g.shape[1]), big_w)
    return norms.ravel()


def _x_upsampled_sqnorms(t: np.ndarray, big_w: int) -> np.ndarray:
    """|x-upsampled t|^2 per cell without upsampling: w0^2 |t_j|^2 + w1^2 |t_j+1|^2 + 2 w0 w1 <t_j, t_j+1>."""
    big_h, w, _ = t.shape
    sq = np.einsum("yxc,yxc->yx", t, t, dtype=np.float64)
    cross = np.zeros((big_h, w), np.float64)
    cross[:, :-1] = np.einsum("yxc,yxc->yx", t[:, :-1], t[:, 1:], dtype=np.float64)
    j0, j1, v0, v1 = taps(big_w, w)
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    return sq[:, j0] * (v0 * v0) + sq[:, j1] * (v1 * v1) + cross[:, j0] * (2 * v0 * v1)


def reach(levels: list[np.ndarray]) -> float:
    """sqrt(sum_l max_cell |g_l|^2): at least the norm of any upsampled, concatenated row of ``levels`` (its
    taps are convex combinations), the gallery's factor in the expanded distance's rounding bound."""
    return float(
        np.sqrt(sum(float(np.einsum("ijc,ijc->ij", x, x, dtype=np.float64).max()) for x in map(np.asarray, levels)))
    )


def upsampled_rows(levels: list[np.ndarray], grid: tuple[int, int], cells: np.ndarray) -> np.ndarray:
    """Rows ``cells`` (flat fine-grid indices) of the concatenated, upsampled pyramid: (len, D)."""
    big_h, big_w = grid
    y, x = np.divmod(np.asarray(cells), big_w)
    parts = []
    for g in levels:
        g = np.asarray(g, np.float32)
        h, w, _ = g.shape
        flat = g.reshape(h * w, -1)
        if (h, w) == (big_h, big_w):
            parts.append(flat.take(y * w + x, axis=0))
            continue
        i0, i1, u0, u1 = (a[y] for a in taps(big_h, h))
        j0, j1, v0, v1 = (a[x] for a in taps(big_w, w))
        row = flat.take(i0 * w + j0, axis=0) * (u0 * v0)[:, None]
        for i, j, weight in ((i0, j1, u0 * v1), (i1, j0, u1 * v0), (i1, j1, u1 * v1)):
            row += flat.take(i * w + j, axis=0) * weight[:, None]
        parts.append(row)
    return np.concatenate(parts, axis=1)


def exact_distances(
    q_up: np.ndarray, images, grid: tuple[int, int], index: np.ndarray, which: np.ndarray
) -> np.ndarray:
    """Squared distances, computed directly, of the candidates ``index[which]`` (flat cells, image
    after image) to the query rows ``q_up`` (P, D) of the same row; inf where not ``which``. Each
    image with a candidate is indexed once."""
    p = grid[0] * grid[1]
    out = np.full(index.shape, np.inf, np.float32)
    owner = np.where(which, index // p, -1)
    for j in np.unique(owner[owner >= 0]):
        pp, ss = np.nonzero(owner == j)
        diff = q_up[pp] - upsampled_rows(images[j], grid, index[pp, ss] - j * p)
        out[pp, ss] = np.einsum("nd,nd->n", diff, diff)
    return out
