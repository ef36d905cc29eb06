"""CudaScorer on a real GPU against NumpyScorer on the CPU. Skipped, with the reason reported,
where CuPy or a CUDA device is missing (DESIGN.md section 4); the kernel's logic and the glue are
also checked without a GPU by tests/runtime/test_cuda_kernel.py."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime.scoring import NumpyScorer
from spade_edge.runtime.scoring.cuda import CudaScorer

from ..scorer_contract import check_close_neighbours_keep_their_digits

pytestmark = pytest.mark.gpu


def _no_gpu_reason() -> str | None:
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); pip install 'spade-edge[gpu]'"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver, among others
        return f"no usable CUDA device: {type(exc).__name__}: {exc}"
    return None if count else "CUDA reports no device"


@pytest.fixture(scope="module", autouse=True)
def gpu():
    reason = _no_gpu_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("kappa", [1, 3, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_cuda_scorer_matches_numpy_scorer(kappa, dtype):
    rng = np.random.default_rng(kappa)
    q = rng.normal(size=(1000, 48)).astype(np.float32)  # P not a multiple of the 128-thread block
    scale = 20 if dtype == np.int8 else 1  # int8 galleries hold small integers
    g = (rng.normal(size=(2345, 48)) * scale).astype(dtype)
    blocks = [g[:1000], g[1000:1001], g[1001:]]  # uneven blocks, one of a single row
    gpu = CudaScorer(tile_bytes=4 * len(q) * 300).topk(q, blocks, kappa)  # several tiles per block
    cpu = NumpyScorer().topk(q, blocks, kappa)
    np.testing.assert_array_equal(gpu.indices, cpu.indices)
    np.testing.assert_allclose(gpu.distances, cpu.distances, rtol=1e-4)


def test_cuda_scorer_breaks_ties_by_lower_index():
    rng = np.random.default_rng(0)
    q = rng.integers(-4, 5, (300, 12)).astype(np.float32)
    distinct = rng.integers(-4, 5, (150, 12)).astype(np.float32)
    g = distinct[rng.integers(0, len(distinct), 457)]
    d = ((q[:, None, :].astype(np.float64) - g[None]) ** 2).sum(-1)
    ref = np.argsort(d, axis=1, kind="stable")[:, :10]
    top = CudaScorer(tile_bytes=4 * len(q) * 100).topk(q, [g[:230], g[230:]], 10)
    np.testing.assert_array_equal(top.indices, ref)
    np.testing.assert_array_equal(top.distances, np.take_along_axis(d, ref, 1).astype(np.float32))


def test_cuda_scorer_keeps_digits_of_close_neighbours():
    check_close_neighbours_keep_their_digits(CudaScorer())
