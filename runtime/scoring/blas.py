"""``out = alpha * a @ b + beta * out`` in place, by numpy's own OpenBLAS when it can be reached.

numpy's ``matmul`` cannot accumulate into its output, so adding a second product costs a pass
over the result, and it copies operands that are column windows of a wider array. BLAS sgemm
does neither: ``beta = 1`` accumulates while the block is in cache, and ``lda`` reads a window
in place. numpy wheels ship OpenBLAS with its CBLAS symbols exported (ILP64, named
``scipy_cblas_sgemm64_``); where that library is not found, or fails a check against numpy on
first use, the same call falls back to numpy with identical results.
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import lru_cache

import numpy as np

_ROW_MAJOR, _NO_TRANS = 101, 111
# ILP64 symbol names only: their integer width is known to be 64 bits
_SYMBOLS = ("scipy_cblas_sgemm64_", "cblas_sgemm64_")


@lru_cache(maxsize=1)
def _openblas() -> list[ctypes.CDLL]:
    """The OpenBLAS libraries that numpy's wheel ships (usually one)."""
    paths = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    paths += glob.glob(os.path.join(os.path.dirname(np.__file__), ".dylibs", "*openblas*"))
    libs = []
    for path in paths:
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


@lru_cache(maxsize=1)
def _sgemm():
    """numpy's CBLAS sgemm, checked once against numpy; None where not available."""
    for lib in _openblas():
        for name in _SYMBOLS:
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                i64,
                i64,
                i64,
                ctypes.c_float,
                ptr,
                i64,
                ptr,
                i64,
                ctypes.c_float,
                ptr,
                i64,
            ]
            fn.restype = None
            if _agrees(fn):
                return fn
    return None


def _agrees(fn) -> bool:
    rng = np.random.default_rng(0)
    a, b = rng.random((7, 12), np.float32), rng.random((5, 9), np.float32)
    out = rng.random((7, 9), np.float32)
    want = 2.0 * a[:, 3:8] @ b + out
    _call(fn, a[:, 3:8], b, out, 2.0, 1.0)
    return bool(np.allclose(out, want, rtol=1e-5, atol=1e-5))


def _call(fn, a, b, out, alpha, beta) -> None:
    m, k = a.shape
    fn(
        _ROW_MAJOR,
        _NO_TRANS,
        _NO_TRANS,
        m,
        b.shape[1],
        k,
        alpha,
        a.ctypes.data,
        a.strides[0] // 4,
        b.ctypes.data,
        b.strides[0] // 4,
        beta,
        out.ctypes.data,
        out.strides[0] // 4,
    )


def _blasable(x: np.ndarray) -> bool:
    return x.dtype == np.float32 and x.ndim == 2 and x.strides[1] == 4 and x.strides[0] >= 4 * x.shape[1] > 0


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """``out[:] = alpha * a @ b + beta * out`` for float32 matrices; ``a``, ``b`` and ``out`` may be
    row windows or column windows of larger arrays (unit stride along rows). Returns ``out``."""
    if a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"gemm shapes do not match: {a.shape} @ {b.shape} -> {out.shape}")
    fn = _sgemm()
    if fn is not None and all(_blasable(x) for x in (a, b, out)):
        _call(fn, a, b, out, alpha, beta)
    elif beta == 0.0:
        np.matmul(a, b, out=out)
        if alpha != 1.0:
            out *= np.float32(alpha)
    else:
        out *= np.float32(beta)
        out += np.float32(alpha) * (a @ b)
    return out


def available() -> bool:
    """Whether :func:`gemm` reaches BLAS directly (else it runs through numpy)."""
    return _sgemm() is not None
