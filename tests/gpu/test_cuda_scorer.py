"""CudaScorer on a real GPU: neighbours equal a float64 search on every path (per level and the
concatenated pyramid, fp32/fp16/int8 galleries, attached and uploaded, CuPy's RawModule and pycuda's
SourceModule; the fine level's product fused with the selection on the tensor cores, asserted taken,
and every product through memory), the screen's rescoring, launches per image at the WRN50x2 shape. Skipped, with the
reason reported, where CuPy or a CUDA device is missing (DESIGN.md section 4); the same logic runs
without a GPU in tests/runtime/test_cuda_screen.py (stand-ins and the CPU shim)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from spade_edge.runtime.codec import LevelCodec
from spade_edge.runtime.gallery import Gallery, LevelStore
from spade_edge.runtime.scoring.cuda import CudaScorer

from ..runtime.test_cuda_kernel import reference, tie_data
from ..runtime.test_cuda_screen import PYRAMIDS, brute, near_tie_rows, pyramid_gallery, stored, up64
from ..scorer_contract import check_close_neighbours_keep_their_digits, check_near_ties_are_decided_exactly

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


def _loaders() -> list:
    pycuda = pytest.param(
        "pycuda",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("pycuda") is None, reason="pycuda is not installed: its loader is not checked"
        ),
    )
    return ["cupy", pycuda]


@pytest.mark.parametrize("loader", _loaders())
@pytest.mark.parametrize("kappa", [1, 3, 10])
@pytest.mark.parametrize(("dim", "fused"), [(12, False), (24, True), (48, False)])
def test_ties_go_to_the_lower_index(loader, kappa, dim, fused):
    q, g = tie_data(kappa, dim=dim)
    blocks = [g[:150], g[150:155].astype(np.float16), g[155:].astype(np.int8)]
    scorer = CudaScorer(loader=loader, fused=fused)
    top = scorer.topk(q, blocks, kappa)
    assert scorer.stats["fused"] is fused
    want = reference(q, g, kappa)
    np.testing.assert_array_equal(top.indices, want.indices)
    np.testing.assert_array_equal(top.distances, want.distances)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loader", _loaders())
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("kappa", [1, 5, 50])
def test_per_level_equals_float64_search(loader, precision, kappa, fused):
    rng = np.random.default_rng(kappa)
    n, rows, dim = 30, 196, 96
    g64 = np.concatenate([near_tie_rows(rng, n * rows // 2, dim), rng.normal(size=(n * rows // 2, dim))])
    g64 = g64[rng.permutation(len(g64))]
    data, scale, dec = stored(g64, precision)
    levels = {"l": LevelStore(data.reshape(n, 14, 14, dim), (14, 14), LevelCodec(scale=scale))}
    gallery = Gallery([f"i{j}" for j in range(n)], np.zeros((n, 2), np.float32), levels, {})
    q = (dec[rng.integers(0, len(dec), 900)] + rng.normal(size=(900, dim)) * 0.05).astype(np.float32)
    scorer = CudaScorer(loader=loader, fused=fused)
    scorer.attach(gallery)
    images = rng.permutation(n)[:20]
    top = scorer.topk(q, gallery.level_view("l", images), kappa)
    assert scorer.stats["uploaded_gallery"] is False
    assert scorer.stats["path"] == ("cuda fused fp16 screen" if fused else "cuda fp16 screen")
    g_sel = np.concatenate([dec.reshape(n, rows, dim)[j] for j in images])
    idx, dist, _ = brute(q.astype(np.float64), g_sel, kappa)
    np.testing.assert_array_equal(top.indices, idx)
    np.testing.assert_array_equal(top.distances, dist.astype(np.float32))


@pytest.mark.parametrize(("shapes", "grid", "path"), PYRAMIDS)
@pytest.mark.parametrize("loader", _loaders())
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_pyramid_equals_float64_search(loader, precision, shapes, grid, path):
    GRID = grid  # noqa: N806 (per case)
    rng = np.random.default_rng(len(precision))
    gallery, decoded = pyramid_gallery(rng, 7, precision, shapes)
    names = list(decoded)
    images = [4, 1, 6, 3, 0]
    query = [(decoded[n][1] + rng.integers(-1, 2, decoded[n][1].shape) / 16).astype(np.float32) for n in names]
    scorer = CudaScorer(loader=loader)
    scorer.attach(gallery)
    top = scorer.topk_pyramid(query, gallery.pyramid_view(names, images, GRID), GRID, 5)
    assert scorer.stats["path"] == path
    q64 = np.concatenate([up64(x, GRID) for x in query], axis=1)
    g64 = np.concatenate([np.concatenate([up64(decoded[n][j], GRID) for n in names], axis=1) for j in images])
    idx, dist, _ = brute(q64, g64, 5)
    np.testing.assert_array_equal(top.indices, idx)
    np.testing.assert_array_equal(top.distances, dist.astype(np.float32))


@pytest.mark.parametrize("fused", [True, False])
def test_rows_the_screen_cannot_settle_are_searched_again(fused):
    scorer = CudaScorer(fused=fused)
    check_near_ties_are_decided_exactly(scorer)
    assert scorer.stats["rescored_rows"] == 3 and scorer.stats["fused"] is fused


def test_close_neighbours_keep_their_digits():
    check_close_neighbours_keep_their_digits(CudaScorer())


@pytest.mark.parametrize("fused", [True, False])
def test_wrn50x2_concat_shape_launches_and_exact_rows(fused):
    """WRN50x2 layers 1-3 at 224 px (56/28/14 grids, 256/512/1024 channels), K = 8 retrieved of 12,
    fp16 gallery attached: within 20 launches per image (fused: no GEMM for layer1, 6 launches), and
    the neighbours of sampled rows equal a float64 search of the upsampled concatenation."""
    rng = np.random.default_rng(0)
    shapes = [(56, 56, 256), (28, 28, 512), (14, 14, 1024)]
    grid = (56, 56)
    n = 12
    levels = {
        f"layer{i + 1}": LevelStore(np.abs(rng.normal(size=(n, h, w, c))).astype(np.float16), (h, w))
        for i, (h, w, c) in enumerate(shapes)
    }
    gallery = Gallery([f"i{j}" for j in range(n)], np.zeros((n, 2), np.float32), levels, {})
    names = list(levels)
    images = [3, 7, 0, 11, 5, 2, 9, 4]
    base = {nm: levels[nm].data[7].astype(np.float32) for nm in names}
    query = [base[nm] + np.abs(rng.normal(size=base[nm].shape)).astype(np.float32) * 0.3 for nm in names]
    scorer = CudaScorer(fused=fused)
    scorer.attach(gallery)
    top = scorer.topk_pyramid(query, gallery.pyramid_view(names, images, grid), grid, 50)
    top = scorer.topk_pyramid(query, gallery.pyramid_view(names, images, grid), grid, 50)  # norms kept now
    assert scorer.stats["launches"] <= 20, scorer.stats
    assert scorer.stats["fused"] is fused and scorer.stats["launches"] == (6 if fused else 7), scorer.stats
    rows = rng.choice(grid[0] * grid[1], 12, replace=False)
    q64 = np.concatenate([up64(x, grid) for x in query], axis=1)[rows]
    g64 = np.concatenate([np.concatenate([up64(levels[nm].data[j], grid) for nm in names], axis=1) for j in images])
    for i, r in enumerate(rows):  # row by row: all pairs at once would be gigabytes
        idx, dist, _ = brute(q64[i : i + 1], g64, 50)
        np.testing.assert_array_equal(top.indices[r], idx[0])
        np.testing.assert_array_equal(top.distances[r], dist[0].astype(np.float32))


@pytest.mark.parametrize("b_cols", [False, True])
@pytest.mark.parametrize("col_store", [False, True])
def test_the_shims_wmma_test_kernel_agrees_on_the_gpu(b_cols, col_store):
    """tests/runtime/test_cuda_kernel.py's wmma GEMM kernel (which checks the shim's emulation against
    numpy) on the real tensor cores: small integers give numpy's values exactly, so the layouts and
    leading dimensions the shim emulates are the hardware's; random fp16 stay within the bound's
    accumulation term (the hardware's order and truncation, not the shim's)."""
    import cupy

    from spade_edge.runtime.scoring.cuda import U_ACC, cuda_include_dir

    from ..runtime.test_cuda_kernel import WMMA_KERNELS

    include = cuda_include_dir(cupy)
    if include is None:
        pytest.skip("no CUDA toolkit include folder with <mma.h> for NVRTC")
    fn = cupy.RawModule(code=WMMA_KERNELS, options=("-std=c++17", f"-I{include}")).get_function("wmma_gemm")
    rng = np.random.default_rng(7)

    def run(a, b, c):
        m, k = a.shape
        n = b.shape[1]
        bb = b.T.copy() if b_cols else b
        out = cupy.full((m, n), np.nan, dtype=cupy.float32)
        args = (cupy.asarray(a.view(np.uint16)), cupy.asarray(bb.view(np.uint16)), cupy.asarray(c), out)
        fn((n // 16, m // 16), (32,), (*args, np.int32(m), np.int32(n), np.int32(k), np.int32(b_cols),
                                        np.int32(col_store)))  # fmt: skip
        return cupy.asnumpy(out)

    a = rng.integers(-8, 9, (48, 64)).astype(np.float16)
    b = rng.integers(-8, 9, (64, 32)).astype(np.float16)
    c = rng.integers(-100, 100, (48, 32)).astype(np.float32)
    np.testing.assert_array_equal(run(a, b, c), a.astype(np.float32) @ b.astype(np.float32) + c)
    a = (rng.normal(size=(32, 256)) * 2.0 ** rng.integers(-8, 8, (32, 256))).astype(np.float16)
    b = (rng.normal(size=(256, 16)) * 2.0 ** rng.integers(-8, 8, (256, 16))).astype(np.float16)
    c = np.zeros((32, 16), np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    err = np.abs(run(a, b, c) - a64 @ b64)
    assert np.all(err <= 256 * U_ACC / (1 - 256 * U_ACC) * (np.abs(a64) @ np.abs(b64)))
