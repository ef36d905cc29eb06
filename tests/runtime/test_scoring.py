import numpy as np
import pytest

from spade_edge.runtime.scoring import NumpyScorer, blas
from spade_edge.runtime.scoring.base import (
    SPARE,
    Candidates,
    GalleryPyramids,
    GalleryRows,
    keep,
    merge,
)
from spade_edge.runtime.scoring.pyramid import (
    PyramidSlabs,
    exact_distances,
    upsampled_rows,
    upsampled_sqnorms,
)

from ..scorer_contract import (
    check_close_neighbours_keep_their_digits,
    check_near_ties_are_decided_exactly,
    check_reads_the_gallery_view,
    check_rejects_bad_arguments,
)
from .test_cuda_kernel import cupy_stand_in  # noqa: F401  (the fixture: CuPy as numpy, the kernel by the shim)


def brute_force(q, g, kappa):
    d = ((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :kappa]
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize("kappa", [1, 3, 8, 10])
@pytest.mark.parametrize("block_bytes", [1 << 10, 1 << 24])
def test_topk_matches_brute_force(kappa, block_bytes):
    rng = np.random.default_rng(kappa)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    g = rng.normal(size=(333, 16)).astype(np.float32)
    ref_d, ref_i = brute_force(q, g, kappa)
    blocks = [g[:100], g[100:101], g[101:]]  # uneven blocks, one of a single row
    top = NumpyScorer(block_bytes=block_bytes).topk(q, blocks, kappa)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)
    np.testing.assert_array_equal(top.indices, ref_i)


def test_close_neighbours_keep_their_digits():
    check_close_neighbours_keep_their_digits(NumpyScorer())


def test_low_precision_blocks_are_widened_per_block():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    g = rng.normal(size=(64, 8)).astype(np.float16)
    ref_d, ref_i = brute_force(q, g.astype(np.float32), 2)
    top = NumpyScorer().topk(q, [g], 2)
    np.testing.assert_array_equal(top.indices, ref_i)


def test_rejects_bad_arguments():
    check_rejects_bad_arguments(NumpyScorer())


def test_owes_the_contract():
    check_near_ties_are_decided_exactly(NumpyScorer())
    check_reads_the_gallery_view(NumpyScorer())


def test_near_ties_need_the_spare_candidates(monkeypatch):
    """The check above has teeth: with a list of kappa + 1 (the numpy scorer's old policy) the
    expanded distance's rounding picks the wrong near-duplicates."""
    from spade_edge.runtime.scoring import base

    monkeypatch.setattr(base, "SPARE", 1)
    with pytest.raises(AssertionError):
        check_near_ties_are_decided_exactly(NumpyScorer())


def test_the_cuda_scorer_owes_the_contract_on_the_cupy_stand_in(cupy_stand_in):  # noqa: F811
    from spade_edge.runtime.scoring.cuda import CudaScorer

    check_near_ties_are_decided_exactly(CudaScorer())
    check_reads_the_gallery_view(CudaScorer())
    assert CudaScorer().topk(np.zeros((2, 3), np.float32), [np.ones((4, 3), np.float32)], 1).indices.shape == (2, 1)


def test_merge_decides_by_exact_distance_ties_to_the_lower_index():
    d = np.array([[3.0, 1.0, np.inf, 1.0], [2.0, 2.0, 2.0, 0.5]], np.float32)
    i = np.array([[7, 9, -1, 4], [8, 3, 5, 6]], np.int64)
    dist, idx = merge(d, i, 3)
    np.testing.assert_array_equal(idx, [[4, 9, 7], [6, 3, 5]])
    np.testing.assert_array_equal(dist, [[1.0, 1.0, 3.0], [0.5, 2.0, 2.0]])
    # parts side by side, as scorers merge a running list with a new block's candidates
    dist2, idx2 = merge([d[:, :2], d[:, 2:]], [i[:, :2], i[:, 2:]], 3)
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(dist2, dist)
    # an empty slot (index -1, +inf) comes after every real candidate
    _, idx4 = merge(np.array([[np.inf, 5.0]], np.float32), np.array([[-1, 2]]), 2)
    np.testing.assert_array_equal(idx4, [[2, -1]])


def test_candidates_keep_kappa_plus_spare():
    top = Candidates(2, 3)
    assert top.approx.shape == (2, keep(3)) == (2, 3 + SPARE)
    entered = top.add(np.arange(40, dtype=np.float32).reshape(2, 20)[:, ::-1].copy(), np.arange(40).reshape(2, 20))
    assert len(entered[0]) == 2 * keep(3)  # the keep(3) smallest by the cheap distance of each row
    top.exact[top.index >= 0] = top.approx[top.index >= 0]
    r = top.result()
    np.testing.assert_array_equal(r.indices, [[19, 18, 17], [39, 38, 37]])


def test_gallery_views_index_read_and_locate():
    blocks = [np.arange(12, dtype=np.float32).reshape(4, 3), np.ones((2, 3), np.float32)]
    view = GalleryRows.of(blocks, grid=(2, 2))
    assert len(view) == 2 and list(view.sizes) == [4, 2] and list(view.starts()) == [0, 4, 6]
    assert view[-1] is blocks[1] and len(list(view)) == 2 and len(view[0:2]) == 2
    with pytest.raises(IndexError):
        view[2]
    np.testing.assert_allclose(view.sqnorms(0), (blocks[0] ** 2).sum(1))
    assert [list(c) for c in view.cells(0, np.array([1, 2, 3]))] == [[0, 1, 1], [1, 0, 1]]
    with pytest.raises(ValueError, match="kept norms"):
        GalleryRows.of(blocks, sqnorms=[np.zeros(4)])
    levels = [[np.ones((4, 4, 2), np.float32), np.ones((2, 2, 3), np.float32)]]
    pyr = GalleryPyramids.of(levels, (4, 4), keep_norms=True)
    assert pyr.keeps_norms and list(pyr.sizes) == [16]
    np.testing.assert_allclose(pyr.sqnorms(0), 5.0)  # 2 + 3 channels of ones, upsampled: still ones
    rows = pyr.upsampled()
    assert rows[0].shape == (16, 5) and rows.keeps_norms and rows.sqnorms(0) is pyr.sqnorms(0)


def test_distance_block_is_bounded(monkeypatch):
    # the scorer must never form a distance matrix larger than its budget
    import spade_edge.runtime.scoring.numpy as mod

    seen = []
    real = mod._merge

    def spy(q, left, g, offset, top, norms=None):
        seen.append(q.shape[0] * g.shape[0] * 4)
        return real(q, left, g, offset, top, norms)

    monkeypatch.setattr(mod, "_merge", spy)
    rng = np.random.default_rng(2)
    budget = 64 << 10
    q = rng.normal(size=(128, 8)).astype(np.float32)
    mod.NumpyScorer(block_bytes=budget).topk(q, [rng.normal(size=(5000, 8)).astype(np.float32)], 1)
    assert len(seen) > 1 and max(seen) <= budget


@pytest.mark.parametrize(
    "kappa,grid,shapes",
    [
        (1, (16, 16), [(16, 16, 6), (8, 8, 10), (4, 4, 20)]),
        (4, (16, 16), [(16, 16, 6), (8, 8, 10), (4, 4, 20)]),
        (2, (15, 13), [(15, 13, 5), (8, 7, 9), (3, 4, 12)]),  # odd sizes: slabs that do not divide the grid
        (3, (12, 12), [(12, 12, 4), (12, 12, 3), (6, 6, 8)]),  # two levels at the fine grid
    ],
)
@pytest.mark.parametrize("variant", ["blas", "numpy products", "kept norms"])
def test_pyramid_at_per_level_cost_equals_naive_concatenation(kappa, grid, shapes, variant, monkeypatch):
    """docs/speed.md: interpolating native-resolution dot products gives the concatenated distances,
    with the products accumulated by BLAS or by numpy, and with norms that the gallery kept."""
    import spade_edge.runtime.scoring.numpy as mod
    from spade_edge.runtime.resample import upsample_hwc

    monkeypatch.setattr(mod, "PER_LEVEL_SHARE", 100.0)  # force the per-level path on small shapes
    if variant == "numpy products":
        monkeypatch.setattr(blas, "_sgemm", lambda: None)
    taken = []
    monkeypatch.setattr(mod, "exact_distances", lambda *a: taken.append(1) or exact_distances(*a))
    rng = np.random.default_rng(kappa)
    q = [rng.normal(size=s).astype(np.float32) for s in shapes]
    gallery = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)]
    if variant == "kept norms":
        asked = []
        images = gallery
        gallery = GalleryPyramids(
            images.__getitem__,
            len(images),
            grid,
            lambda j, block=None: asked.append(j) or upsampled_sqnorms(images[j], grid),
        )
    naive_q = np.concatenate([upsample_hwc(x, *grid) for x in q], axis=2).reshape(grid[0] * grid[1], -1)
    naive_g = np.concatenate(
        [np.concatenate([upsample_hwc(x, *grid) for x in g], axis=2).reshape(grid[0] * grid[1], -1) for g in gallery]
    )
    ref_d, ref_i = brute_force(naive_q, naive_g, kappa)
    top = mod.NumpyScorer().topk_pyramid(q, gallery, grid, kappa)
    assert taken, "the per-level path was not taken"
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)
    if variant == "kept norms":
        assert asked == list(range(3))


def test_kept_norms_are_used_and_must_match_the_blocks():
    rng = np.random.default_rng(5)
    q = rng.normal(size=(30, 6)).astype(np.float32)
    blocks = [rng.normal(size=(50, 6)).astype(np.float32), rng.normal(size=(70, 6)).astype(np.float32)]
    norms = [np.einsum("ij,ij->i", b, b) for b in blocks]
    plain = NumpyScorer(block_bytes=1024).topk(q, blocks, 3)
    kept = NumpyScorer(block_bytes=1024).topk(q, GalleryRows.of(blocks, sqnorms=norms), 3)
    np.testing.assert_array_equal(kept.indices, plain.indices)
    np.testing.assert_array_equal(kept.distances, plain.distances)
    nearest = plain.indices[0, 0]  # in block 0 or 1: push it far away through its kept norm only
    block = int(nearest >= 50)
    norms[block][nearest - 50 * block] += 1e6
    assert nearest not in NumpyScorer(block_bytes=1024).topk(q, GalleryRows.of(blocks, sqnorms=norms), 3).indices[0]
    with pytest.raises(ValueError):
        NumpyScorer().topk(q, GalleryRows.of(blocks, sqnorms=norms[:1]), 3)
    with pytest.raises(ValueError, match="kept norms"):
        NumpyScorer().topk(q, GalleryRows.of(blocks, sqnorms=[norms[0], norms[1][:5]]), 3)


@pytest.mark.parametrize("reach", ["blas", "numpy"])
def test_gemm_accumulates_into_windows(reach, monkeypatch):
    if reach == "numpy":
        monkeypatch.setattr(blas, "_sgemm", lambda: None)
    rng = np.random.default_rng(3)
    wide, b = rng.random((40, 30), np.float32), rng.random((9, 11), np.float32)
    big = rng.random((40, 20), np.float32)
    out = big[:, 4:15]  # a column window: written in place, its neighbours untouched
    before = big.copy()
    blas.gemm(wide[:, 5:14], b, out)
    np.testing.assert_allclose(out, wide[:, 5:14] @ b, rtol=1e-5)
    blas.gemm(wide[:, 20:29], b, out, alpha=-2.0, beta=1.0)
    np.testing.assert_allclose(out, wide[:, 5:14] @ b - 2 * wide[:, 20:29] @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(big[:, :4], before[:, :4])
    np.testing.assert_array_equal(big[:, 15:], before[:, 15:])
    with pytest.raises(ValueError, match="do not match"):
        blas.gemm(wide, b, out)


def test_gemm_reaches_numpys_openblas_on_numpy_wheels():
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if cfg.get("name") != "scipy-openblas":
        pytest.skip(f"numpy here is built with {cfg.get('name')}, not the wheels' scipy-openblas")
    assert blas.available()


def test_pyramid_pieces_match_the_upsampled_maps():
    from spade_edge.runtime.resample import upsample_hwc

    rng = np.random.default_rng(7)
    levels = [rng.normal(size=s).astype(np.float32) for s in [(10, 9, 3), (5, 5, 4), (3, 2, 6)]]
    full = np.concatenate([upsample_hwc(x, 10, 9) for x in levels], axis=2).reshape(90, -1)
    np.testing.assert_allclose(upsampled_sqnorms(levels, (10, 9)), (full**2).sum(1), rtol=1e-5)
    cells = rng.integers(0, 90, 40)
    np.testing.assert_allclose(upsampled_rows(levels, (10, 9), cells), full[cells], rtol=1e-5, atol=1e-6)


def test_wide_pyramids_take_the_per_level_path_and_narrow_ones_do_not():
    wrn = PyramidSlabs(
        [np.zeros(s, np.float32) for s in [(56, 56, 256), (28, 28, 512), (14, 14, 1024)]], (56, 56), rows=4
    )
    lite = PyramidSlabs(
        [np.zeros(s, np.float32) for s in [(56, 56, 24), (28, 28, 40), (14, 14, 112)]], (56, 56), rows=4
    )
    from spade_edge.runtime.scoring.numpy import PER_LEVEL_SHARE

    assert wrn.contraction < PER_LEVEL_SHARE * 1792 and lite.contraction >= PER_LEVEL_SHARE * 176


@pytest.mark.parametrize("kappa", [1, 3, 10, 20])
def test_ties_resolve_to_the_lower_gallery_index(kappa):
    # duplicated gallery rows give exactly equal distances; the lower index must come first
    rng = np.random.default_rng(kappa)
    base = rng.integers(-3, 4, size=(40, 6)).astype(np.float32)
    g = np.concatenate([base, base, base])  # every row three times
    q = rng.integers(-3, 4, size=(25, 6)).astype(np.float32)
    ref_d, ref_i = brute_force(q, g, kappa)
    top = NumpyScorer(block_bytes=2048).topk(q, [g[:50], g[50:]], kappa)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-6)


def test_pyramid_near_ties_far_from_the_origin_are_decided_exactly(monkeypatch):
    """Gallery pyramids that differ from the query by less than the expanded distance's rounding
    (features around 50): every candidate within the rounding bound is re-computed, and the exact
    distances decide (the same neighbours as a float64 brute force)."""
    import spade_edge.runtime.scoring.numpy as mod
    from spade_edge.runtime.resample import upsample_hwc

    monkeypatch.setattr(mod, "PER_LEVEL_SHARE", 100.0)
    rng = np.random.default_rng(4)
    grid, shapes = (8, 8), [(8, 8, 6), (4, 4, 10), (2, 2, 12)]
    q = [(50 + rng.normal(size=s)).astype(np.float32) for s in shapes]
    gallery = [
        [(x + np.float32(2.0**-9 * (j + 1)) * rng.normal(size=x.shape)).astype(np.float32) for x in q]
        for j in rng.permutation(6)
    ]

    def concat(levels):
        return np.concatenate([upsample_hwc(x, *grid) for x in levels], axis=2).reshape(64, -1).astype(np.float64)

    ref_d, ref_i = brute_force(concat(q), np.concatenate([concat(g) for g in gallery]), 2)
    top = mod.NumpyScorer().topk_pyramid(q, gallery, grid, 2)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-2)  # differences of fp32 features around 50
    # and the bound matters: re-computing only the kappa best by the expanded distance gets them wrong
    real = Candidates.may_belong
    monkeypatch.setattr(Candidates, "may_belong", lambda self, error: real(self, 0 * error))
    assert not np.array_equal(mod.NumpyScorer().topk_pyramid(q, gallery, grid, 2).indices, ref_i)
