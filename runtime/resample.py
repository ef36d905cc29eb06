"""Bilinear resampling and Gaussian smoothing in plain numpy.

Bilinear upsampling is a fixed linear map per axis, so it is written as a matrix: the same matrix
resamples feature maps (concatenated pyramid) and score maps, and matches
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D bilinear weights, half-pixel centres (align_corners=False)."""
    m = np.zeros((n_out, n_in), np.float32)
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, None)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1 - w1)
    np.add.at(m, (rows, i1), w1)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows of :func:`interp_matrix` as two taps: (i0, i1, w0, w1), out = w0 x[i0] + w1 x[i1]."""
    m = interp_matrix(n_out, n_in)
    rows = np.arange(n_out)
    i0 = np.argmax(m > 0, axis=1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w0 = m[rows, i0].copy()
    w1 = np.where(i1 != i0, m[rows, i1], 0.0).astype(np.float32)
    return i0, i1, w0, w1


def upsample_map(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D map."""
    return interp_matrix(height, x.shape[0]) @ x.astype(np.float32) @ interp_matrix(width, x.shape[1]).T


def upsample_hwc(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a channels-last feature map (h, w, C) -> (height, width, C)."""
    x = np.asarray(x, np.float32)
    if x.shape[:2] == (height, width):
        return x
    # one product per axis: BLAS beats two-tap gathers several times over (docs/speed.md)
    h, w, c = x.shape
    t = (interp_matrix(height, h) @ x.reshape(h, w * c)).reshape(height, w, c)
    return np.matmul(interp_matrix(width, w), t)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian filter; same result as ``scipy.ndimage.gaussian_filter(x, sigma)``
    (mode 'reflect', truncate 4)."""
    if sigma <= 0:
        return x.astype(np.float32)
    k = gaussian_kernel(sigma)
    r = len(k) // 2
    out = x.astype(np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        # scipy 'reflect' is numpy 'symmetric'; tile for kernels wider than the image
        pad = (
            np.pad(out, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="symmetric")
            if r <= n
            else _pad_symmetric_wide(out, r, axis)
        )
        win = np.lib.stride_tricks.sliding_window_view(pad, len(k), axis=axis)
        out = win @ k
    return out


def _pad_symmetric_wide(x: np.ndarray, r: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    idx = np.arange(-r, n + r)
    period = 2 * n
    idx = np.mod(idx, period)
    idx = np.where(idx >= n, period - 1 - idx, idx)
    return np.take(x, idx, axis=axis)
