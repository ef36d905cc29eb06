"""The AMX screen (runtime/scoring/amx.py, kernels/amx_screen.c): the same neighbours as an exact
float64 search, its error bound holding pair by pair, and the fp32 paths it falls back on. It needs
a CPU with AMX-BF16 and a C compiler; elsewhere the module is skipped with the reason."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime.resample import upsample_hwc
from spade_edge.runtime.scoring import NumpyScorer, amx, cpu_scorer
from spade_edge.runtime.scoring.amx_screen import PyramidScreen
from spade_edge.runtime.scoring.pyramid import PyramidSlabs

from ..scorer_contract import (
    check_close_neighbours_keep_their_digits,
    check_near_ties_are_decided_exactly,
    check_reads_the_gallery_view,
    check_rejects_bad_arguments,
)
from .test_scoring import brute_force

ok, why = amx.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"AMX screen not available here: {why}")


def _concat(levels, grid):
    return np.concatenate([upsample_hwc(x, *grid) for x in levels], axis=2).reshape(grid[0] * grid[1], -1)


def _pyramid(rng, shapes, n, offset=0.0, scale=1.0):
    """A test pyramid and n gallery pyramids; offset and scale move every feature (ReLU-like magnitudes)."""

    def one():
        return [(offset + scale * rng.normal(size=s)).astype(np.float32) for s in shapes]

    return one(), [one() for _ in range(n)]


def _brute_force(q, g, kappa):
    """The kappa nearest by float64 distances, ties to the lower index (expanded: the big cases do
    not fit a difference tensor; float64 keeps it exact enough)."""
    q, g = q.astype(np.float64), g.astype(np.float64)
    d = (q**2).sum(1)[:, None] + (g**2).sum(1)[None, :] - 2 * q @ g.T
    idx = np.argsort(d, axis=1, kind="stable")[:, :kappa]
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize(
    "kappa,grid,shapes,n,offset",
    [
        (1, (16, 16), [(16, 16, 6), (8, 8, 10), (4, 4, 20)], 3, 0.0),
        (4, (16, 16), [(16, 16, 6), (8, 8, 10), (4, 4, 20)], 3, 0.0),
        (3, (20, 20), [(20, 20, 40), (10, 10, 70), (5, 5, 130)], 5, 0.0),  # 400 rows: a padded row block
        (2, (12, 12), [(12, 12, 4), (12, 12, 3), (6, 6, 8)], 4, 0.0),  # two levels at the fine grid
        (1, (32, 32), [(32, 32, 64), (16, 16, 128), (8, 8, 256)], 12, 20.0),  # several slabs, far from the origin
    ],
)
def test_screen_finds_the_exact_neighbours(kappa, grid, shapes, n, offset):
    rng = np.random.default_rng(kappa + n)
    q, gallery = _pyramid(rng, shapes, n, offset)
    ref_d, ref_i = _brute_force(_concat(q, grid), np.concatenate([_concat(g, grid) for g in gallery]), kappa)
    scorer = amx.AmxScorer()
    top = scorer.topk_pyramid(q, gallery, grid, kappa)
    assert scorer.stats["path"] == "amx" and scorer.stats["rows_rescored"] < grid[0] * grid[1] // 10
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


def test_the_bound_holds_for_every_pair():
    """With room for every gallery cell in the lists, each pair's lower and upper bounds bracket its
    expanded distance |Ug|^2 - 2 <Uq, Ug> computed in float64."""
    rng = np.random.default_rng(7)
    grid, shapes = (8, 8), [(8, 8, 48), (4, 4, 96), (2, 2, 200)]
    q, (g,) = _pyramid(rng, shapes, 1, offset=5.0, scale=3.0)
    screen = PyramidScreen(amx._kernel()[0], PyramidSlabs(q, grid), m=64)
    screen.add(g, None)
    screen.close()
    low, idx, high, _ = screen.bounds(1)
    qx, gx = _concat(q, grid).astype(np.float64), _concat(g, grid).astype(np.float64)
    mu = np.concatenate(screen.mu).astype(np.float64)  # the screen centres on the query's mean
    distances = ((qx[:, None, :] - gx[None]) ** 2).sum(-1)
    truth = np.take_along_axis(distances - ((qx - mu) ** 2).sum(1)[:, None], idx, 1)
    assert (idx >= 0).all()
    assert np.all(low <= truth) and np.all(truth <= high)
    assert np.median(high - low) < 1e-2 * np.median(np.abs(truth))  # and the bounds are not vacuous


def test_rows_the_screen_cannot_settle_are_rescored_exactly(monkeypatch):
    monkeypatch.setattr(amx, "SPARE", 0)  # lists of kappa: most rows cannot rule out what they dropped
    rng = np.random.default_rng(11)
    grid, shapes = (16, 16), [(16, 16, 24), (8, 8, 40), (4, 4, 80)]
    q, gallery = _pyramid(rng, shapes, 4)
    scorer = amx.AmxScorer()
    top = scorer.topk_pyramid(q, gallery, grid, 2)
    assert scorer.stats["rows_rescored"] > 0
    ref_d, ref_i = brute_force(_concat(q, grid), np.concatenate([_concat(g, grid) for g in gallery]), 2)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


@pytest.mark.parametrize("kappa", [1, 3])
def test_ties_resolve_to_the_lower_gallery_index(kappa):
    rng = np.random.default_rng(kappa)
    grid, shapes = (8, 8), [(8, 8, 6), (4, 4, 10), (2, 2, 12)]
    q = [rng.integers(-2, 3, size=s).astype(np.float32) for s in shapes]
    image = [rng.integers(-2, 3, size=s).astype(np.float32) for s in shapes]
    gallery = [image, [x.copy() for x in image], image]  # every cell three times
    ref_d, ref_i = brute_force(_concat(q, grid), np.concatenate([_concat(g, grid) for g in gallery]), kappa)
    top = amx.AmxScorer().topk_pyramid(q, gallery, grid, kappa)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-6)


def test_a_query_unlike_the_gallery_gives_up_for_the_fp32_path():
    """Gallery cells all alike and far from a spread-out query: every cell is about as far, bf16
    cannot order them, and after PROBE images the scorer hands the whole search to the fp32 path."""
    rng = np.random.default_rng(3)
    grid, shapes = (16, 16), [(16, 16, 32), (8, 8, 64), (4, 4, 128)]
    q, gallery = _pyramid(rng, shapes, 2 * amx.PROBE + 2, offset=5.0, scale=0.01)
    q = [(10 * rng.normal(size=s)).astype(np.float32) for s in shapes]
    scorer = amx.AmxScorer()
    top = scorer.topk_pyramid(q, gallery, grid, 1)
    assert scorer.stats["path"] == "fp32" and scorer.stats["gave_up_after"] == amx.PROBE
    fp32 = NumpyScorer().topk_pyramid(q, gallery, grid, 1)
    np.testing.assert_array_equal(top.indices, fp32.indices)


def test_real_features_match_the_fp32_path(lite0_onnx, elpv_normal, tmp_path):
    """EfficientNet-Lite0's real features of ELPV cells: the same neighbours as NumpyScorer, but for
    cells at exactly the same distance (equal in float64), which go to the lower index."""
    from spade_edge.datasets import elpv_cells
    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.codec import Storage
    from spade_edge.runtime.detector import Detector
    from spade_edge.runtime.features import backend_from_model
    from spade_edge.runtime.spade import SpadeConfig, image_knn, projected_levels

    backend = backend_from_model(lite0_onnx)
    info = backend.info
    gallery = gallery_from_images(
        backend, elpv_normal[:12], tmp_path / "g.gallery", holdout=0.0, show_progress=False, storage=Storage.exact()
    )

    det = Detector(backend, gallery, config=SpadeConfig(score="top-pixels"))
    x, _ = det.prepare(str(elpv_cells(1.0, "mono")[0]), None)
    out = {k: v[0] for k, v in backend(x[None]).items()}
    names = [lv.name for lv in info.levels]
    _, near = image_knn(out[info.global_name], gallery, 10)
    grid = out[names[0]].shape[1:]
    query = projected_levels(out, gallery, names)
    images = gallery.pyramid_view(names, near, grid)
    scorer = amx.AmxScorer()
    ours, fp32 = scorer.topk_pyramid(query, images, grid, 1), NumpyScorer().topk_pyramid(query, images, grid, 1)
    assert scorer.stats["path"] == "amx"
    np.testing.assert_allclose(ours.distances, fp32.distances, rtol=1e-5)
    q64 = _concat([x.astype(np.float64) for x in query], grid)
    p = grid[0] * grid[1]
    for row in np.flatnonzero(ours.indices[:, 0] != fp32.indices[:, 0]):
        a, b = (int(t.indices[row, 0]) for t in (ours, fp32))
        da, db = (
            ((q64[row] - _concat([x.astype(np.float64) for x in images[i // p]], grid)[i % p]) ** 2).sum()
            for i in (a, b)
        )
        assert da == pytest.approx(db, rel=1e-9) and a < b


def test_cpu_scorer_takes_the_screen_unless_told_not_to(monkeypatch):
    assert cpu_scorer().name == "amx"
    monkeypatch.setenv("SPADE_EDGE_AMX", "0")  # the best fused kernel of this CPU instead
    assert cpu_scorer().name != "amx" and cpu_scorer().name.startswith("fused ")


@pytest.mark.parametrize("kappa", [1, 3, 8])
def test_plain_rows_find_the_exact_neighbours(kappa):
    """The per-level search: query rows against uneven blocks of gallery rows (one of a single row,
    others across several slabs of the kernel)."""
    rng = np.random.default_rng(kappa)
    q = (3.0 + rng.normal(size=(200, 40))).astype(np.float32)
    g = (3.0 + rng.normal(size=(1134, 40))).astype(np.float32)
    blocks = [g[:100], g[100:101], g[101:801], g[801:]]
    scorer = amx.AmxScorer()
    top = scorer.topk(q, iter(blocks), kappa)  # an iterator: the scorer keeps what it must read twice
    assert scorer.stats["path"] == "amx"
    ref_d, ref_i = brute_force(q, g, kappa)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


@pytest.mark.parametrize("rescreen_rows", [1, 10**9])
def test_plain_rows_the_screen_cannot_settle_are_searched_again(rescreen_rows, monkeypatch):
    """Unsettled rows go to the three-product screen (when there are enough of them), and what that
    cannot settle to the fp32 path."""
    monkeypatch.setattr(amx, "SPARE", 0)
    monkeypatch.setattr(amx, "RESCREEN_ROWS", rescreen_rows)
    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(64, 24)).astype(np.float32), rng.normal(size=(900, 24)).astype(np.float32)
    scorer = amx.AmxScorer()
    top = scorer.topk(q, [g[:450], g[450:]], 2)
    assert scorer.stats["rows_rescored"] > 0
    assert scorer.stats.get("rows_rescreened", 0) > 0 if rescreen_rows == 1 else "rows_rescreened" not in scorer.stats
    ref_d, ref_i = brute_force(q, g, 2)
    np.testing.assert_array_equal(top.indices, ref_i)
    with pytest.raises(ValueError, match="fewer than kappa"):
        amx.AmxScorer().topk(q, [g[:3]], 4)


def test_owes_what_every_scorer_owes():
    check_close_neighbours_keep_their_digits(amx.AmxScorer())
    check_rejects_bad_arguments(amx.AmxScorer())
    check_near_ties_are_decided_exactly(amx.AmxScorer())
    check_reads_the_gallery_view(amx.AmxScorer())


def test_the_three_product_bound_holds_and_is_tighter():
    """Plain rows, every gallery row kept: the bounds bracket each expanded distance (float64), and
    three products bracket it far more tightly than one."""
    from spade_edge.runtime.scoring.amx_screen import PlainScreen

    rng = np.random.default_rng(4)
    q, g = (2 + rng.normal(size=(40, 72))).astype(np.float32), (2 + rng.normal(size=(96, 72))).astype(np.float32)
    widths = []
    for three in (False, True):
        screen = PlainScreen(amx._kernel()[0], q, 96, three)
        screen.add(g)
        screen.close()
        low, idx, high, _ = screen.bounds(1)
        q64, g64 = q.astype(np.float64) - screen.mu, g.astype(np.float64) - screen.mu
        truth = np.take_along_axis((g64**2).sum(1)[None, :] - 2 * q64 @ g64.T, idx, 1)
        assert np.all(low <= truth) and np.all(truth <= high)
        widths.append(np.median(high - low))
    assert widths[1] < widths[0] / 20
