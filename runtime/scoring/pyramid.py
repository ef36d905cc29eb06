"""The concatenated pyramid without upsampling whole feature maps (docs/speed.md): per gallery image,
the norms of its upsampled features and one matrix product per slab of fine-grid rows that yields
the expanded distances |Ug|^2 - 2 <Uq, Ug> of every level at once."""
from __future__ import annotations

import numpy as np

from ..resample import interp_matrix, taps, upsample_hwc


class PyramidSlabs:
    """Expanded distances of one test image's pyramid against gallery images, slab by slab.

    Coarse level l enters through its dot products at native resolution, upsampled on the query
    side only: M_l = (U_l Q_l) G_l^T, (P, h_l, w_l). For a slab of fine gallery rows Y the distances
    are then one product, [q_fine | 1 | M_l[:, y(Y), :] ...] @ [-2 g_fine(Y)^T ; |Ug(Y)|^2 ;
    -2 A_h[Y, y]^T (x) A_w^T ...], where y(Y) are the few native rows the slab's rows interpolate
    from: the interpolation of both gallery axes is folded into the product, and the extra
    contraction (one per native cell read) is small next to the fine channels.
    """

    def __init__(self, query: list[np.ndarray], grid: tuple[int, int], rows: int = 2):
        self.grid = tuple(grid)
        big_h, big_w = grid
        self.p = big_h * big_w
        self.query = [np.asarray(x, np.float32) for x in query]
        self.fine = [x.shape[:2] == self.grid for x in self.query]
        self.c_fine = sum(x.shape[2] for x, f in zip(self.query, self.fine) if f)
        self.slabs = []  # (first row, rows, native rows read per coarse level, right-hand side)
        for y0 in range(0, big_h, rows):
            ys = np.arange(y0, min(y0 + rows, big_h))
            used, blocks = [], []
            for x, f in zip(self.query, self.fine):
                if not f:
                    a_h = interp_matrix(big_h, x.shape[0])[ys]
                    used.append(np.flatnonzero(a_h.any(axis=0)))
                    blocks.append(np.kron(a_h[:, used[-1]].T, interp_matrix(big_w, x.shape[1]).T))
            right = np.zeros((self.c_fine + 1, len(ys) * big_w), np.float32)
            self.slabs.append((y0, len(ys), used, np.concatenate([right, *blocks]) * np.float32(-2.0)))
        self.contraction = max(s[3].shape[0] for s in self.slabs)
        self._left = None

    @property
    def left(self) -> np.ndarray:
        """[q_fine | 1 | room for the coarse columns], made on first use."""
        if self._left is None:
            self._left = np.empty((self.p, self.contraction), np.float32)
            if self.c_fine:
                self._left[:, : self.c_fine] = np.concatenate(
                    [x.reshape(self.p, -1) for x, f in zip(self.query, self.fine) if f], axis=1)
            self._left[:, self.c_fine] = 1.0
        return self._left

    def coarse_products(self, gallery: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """M_l for every coarse level and the squared norms of the upsampled gallery (H * W,)."""
        big_h, big_w = self.grid
        norms = np.zeros((big_h, big_w), np.float32)
        m = []
        for q, g, f in zip(self.query, gallery, self.fine):
            g = np.asarray(g, np.float32)
            if f:
                norms += np.einsum("yxc,yxc->yx", g, g)
                continue
            h, w, c = g.shape
            norms += _x_upsampled_sqnorms(upsample_hwc(g, big_h, w), big_w)  # y upsampled, x expanded
            native = q.reshape(-1, c) @ g.reshape(h * w, c).T  # (n_q, n_g) at native resolution
            m.append(upsample_hwc(native.reshape(q.shape[0], q.shape[1], -1), big_h, big_w).reshape(self.p, h, w))
        return m, norms.ravel()

    def __call__(self, gallery: list[np.ndarray]):
        """Yield (first fine cell, expanded distances (P, cells)) slab by slab for one gallery image."""
        big_w = self.grid[1]
        m, norms = self.coarse_products(gallery)
        g_fine = np.concatenate([np.asarray(x, np.float32) for x, f in zip(gallery, self.fine) if f], axis=2)
        g_fine = g_fine.reshape(self.p, -1)
        c, left = self.c_fine, self.left
        for y0, r, used, right in self.slabs:
            cells = slice(y0 * big_w, (y0 + r) * big_w)
            col = c + 1
            for mi, rows in zip(m, used):
                for y in rows:
                    left[:, col : col + mi.shape[2]] = mi[:, y]
                    col += mi.shape[2]
            np.multiply(g_fine[cells].T, -2.0, out=right[:c])
            right[c] = norms[cells]
            yield cells.start, left[:, :col] @ right


def _x_upsampled_sqnorms(t: np.ndarray, big_w: int) -> np.ndarray:
    """|x-upsampled t|^2 per cell without upsampling: w0^2 |t_j|^2 + w1^2 |t_j+1|^2 + 2 w0 w1 <t_j, t_j+1>."""
    big_h, w, _ = t.shape
    sq = np.einsum("yxc,yxc->yx", t, t)
    cross = np.zeros((big_h, w), np.float32)
    cross[:, :-1] = np.einsum("yxc,yxc->yx", t[:, :-1], t[:, 1:])
    j0, j1, v0, v1 = taps(big_w, w)
    return sq[:, j0] * (v0 * v0) + sq[:, j1] * (v1 * v1) + cross[:, j0] * (2 * v0 * v1)


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
