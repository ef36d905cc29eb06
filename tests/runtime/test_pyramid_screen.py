"""The pyramid screen's back-ends (runtime/scoring/amx.py BACKENDS, kernels/amx_screen.c): the AMX
method with its products on AMX tiles or on AVX512-BF16 (VDPBF16PS) over the same packed operands,
the same bound and the same settling. Each back-end gives the neighbours of an exact float64 search;
a back-end this CPU lacks is skipped with the reason; the fused scorer dispatches to AVX512-BF16 for
wide pyramids where its level has it."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime import cpu
from spade_edge.runtime.scoring import amx, fused
from spade_edge.runtime.scoring.amx_screen import PyramidScreen
from spade_edge.runtime.scoring.numpy import uses_levels
from spade_edge.runtime.scoring.pyramid import PyramidSlabs, contraction

from .test_amx import _brute_force, _concat, _pyramid


def _backend(name: str):
    ok, why = amx.available(name)
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name} screen not available here: {why}"))


BACKENDS = [_backend(name) for name in amx.BACKENDS]
WRN_LIKE = [(16, 16, 32), (8, 8, 64), (4, 4, 128)]  # WRN-like: channels double as the grid halves


def _reference(q, gallery, grid, kappa):
    return _brute_force(_concat(q, grid), np.concatenate([_concat(g, grid) for g in gallery]), kappa)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kappa,grid,shapes,n,offset",
    [
        (1, (16, 16), WRN_LIKE, 3, 0.0),
        (5, (16, 16), WRN_LIKE, 4, 2.0),
        (3, (20, 20), [(20, 20, 40), (10, 10, 70), (5, 5, 130)], 5, 0.0),  # 400 rows: a padded row block
        (2, (12, 12), [(12, 12, 4), (12, 12, 3), (6, 6, 8)], 4, 0.0),  # two levels at the fine grid
        (1, (32, 32), [(32, 32, 64), (16, 16, 128), (8, 8, 256)], 6, 20.0),  # several slabs, far from the origin
    ],
)
def test_each_backend_finds_the_exact_neighbours(backend, kappa, grid, shapes, n, offset):
    rng = np.random.default_rng(kappa + n)
    q, gallery = _pyramid(rng, shapes, n, offset)
    ref_d, ref_i = _reference(q, gallery, grid, kappa)
    scorer = amx.AmxScorer(backend=backend)
    top = scorer.topk_pyramid(q, gallery, grid, kappa)
    assert scorer.stats["path"] == scorer.name and scorer.stats["rows_rescored"] < grid[0] * grid[1] // 10
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coarse_parts", [1, 2])
def test_the_bound_holds_for_every_pair(backend, coarse_parts):
    """Every gallery cell kept, the coarse windows in one bf16 part or two: each pair's lower and upper
    bounds bracket its expanded distance (float64), and the bracket is narrow."""
    rng = np.random.default_rng(7)
    grid, shapes = (8, 8), [(8, 8, 48), (4, 4, 96), (2, 2, 200)]
    q, (g,) = _pyramid(rng, shapes, 1, offset=5.0, scale=3.0)
    screen = PyramidScreen(amx._kernel(backend)[0], PyramidSlabs(q, grid), m=64, coarse_parts=coarse_parts)
    screen.add(g, None)
    screen.close()
    low, idx, high, _ = screen.bounds(1)
    qx, gx = _concat(q, grid).astype(np.float64), _concat(g, grid).astype(np.float64)
    mu = np.concatenate(screen.mu).astype(np.float64)
    truth = np.take_along_axis(((qx[:, None, :] - gx[None]) ** 2).sum(-1) - ((qx - mu) ** 2).sum(1)[:, None], idx, 1)
    assert (idx >= 0).all()
    assert np.all(low <= truth) and np.all(truth <= high)
    assert np.median(high - low) < 1e-2 * np.median(np.abs(truth))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_the_screen_cannot_settle_are_rescored_exactly(backend, monkeypatch):
    monkeypatch.setattr(amx, "SPARE", 0)  # lists of kappa: most rows cannot rule out what they dropped
    rng = np.random.default_rng(11)
    q, gallery = _pyramid(rng, WRN_LIKE, 4)
    scorer = amx.AmxScorer(backend=backend)
    top = scorer.topk_pyramid(q, gallery, (16, 16), 2)
    assert scorer.stats["path"] == scorer.name and scorer.stats["rows_rescored"] > 0
    ref_d, ref_i = _reference(q, gallery, (16, 16), 2)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kappa", [1, 3])
def test_ties_go_to_the_lower_index_and_near_ties_are_decided_exactly(backend, kappa):
    """Every cell three times (exact ties: the lower index first), then near-duplicates closer than bf16
    can tell apart (the fine level moved by 1e-3 relative): decided by the exact distances."""
    rng = np.random.default_rng(kappa)
    grid, shapes = (8, 8), [(8, 8, 6), (4, 4, 10), (2, 2, 12)]
    q = [rng.integers(-2, 3, size=s).astype(np.float32) for s in shapes]
    image = [rng.integers(-2, 3, size=s).astype(np.float32) for s in shapes]
    gallery = [image, [x.copy() for x in image], image]
    ref_d, ref_i = _reference(q, gallery, grid, kappa)
    top = amx.AmxScorer(backend=backend).topk_pyramid(q, gallery, grid, kappa)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-6)

    q, (base,) = _pyramid(rng, WRN_LIKE, 1, offset=3.0)
    near = [[x.copy() for x in base] for _ in range(3)]
    for j, img in enumerate(near):
        img[0] *= np.float32(1 + 1e-3 * (2 - j))  # the last the nearest to nothing in particular
    ref_d, ref_i = _reference(q, near, (16, 16), kappa)
    scorer = amx.AmxScorer(backend=backend)
    top = scorer.topk_pyramid(q, near, (16, 16), kappa)
    assert scorer.stats["path"] == scorer.name and scorer.stats["candidates"] > 0
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


def test_the_fused_scorer_screens_wide_pyramids_on_avx512bf16(monkeypatch):
    """Where this CPU's best fused level is avx512bf16, a wide pyramid (the per-level cost path) runs the
    screen's AVX512-BF16 back-end, and the neighbours are NumpyScorer's; capped below that level (or with
    the screens off) it is NumpyScorer's per-level path."""
    if fused.best()[0] != "avx512bf16" or not amx.available("avx512bf16")[0]:
        pytest.skip(
            f"this CPU's fused level is {fused.best()[0]!r}; the avx512bf16 screen: {amx.available('avx512bf16')[1]}"
        )
    rng = np.random.default_rng(5)
    q, gallery = _pyramid(rng, WRN_LIKE, 3)
    assert uses_levels(q, (16, 16))
    scorer = fused.FusedScorer()
    top = scorer.topk_pyramid(q, gallery, (16, 16), 2)
    assert scorer.stats["path"] == "avx512bf16 screen"
    np.testing.assert_array_equal(top.indices, _reference(q, gallery, (16, 16), 2)[1])
    assert fused.FusedScorer(screens=False).pyramid_screen() is None
    monkeypatch.setenv(fused.LEVEL_ENV, "avx512")
    capped = fused.FusedScorer()
    assert capped.pyramid_screen() is None
    capped.topk_pyramid(q, gallery, (16, 16), 2)
    assert capped.stats["path"] == "fp32 levels"


def test_a_backend_the_cpu_lacks_says_why():
    for name, (flags, lacking, _) in amx.BACKENDS.items():
        ok, why = amx.available(name)
        assert ok or why  # a reason wherever it does not run
        if not cpu.has(*flags):
            assert not ok and why == lacking
    with pytest.raises(ValueError, match="back-end"):
        amx.AmxScorer(backend="sse")


@pytest.mark.parametrize(
    "shapes",
    [
        [(56, 56, 24), (28, 28, 40), (14, 14, 112)],
        [(56, 56, 256), (28, 28, 512), (14, 14, 1024)],
        [(16, 16, 8), (8, 8, 4), (4, 4, 3)],
        [(7, 5, 3), (3, 2, 2)],
        [(9, 9, 2), (9, 9, 3), (2, 2, 1)],
    ],
)
def test_the_path_choice_reads_the_slabs_width_without_making_them(shapes):
    """pyramid.contraction (what uses_levels asks) is PyramidSlabs' contraction at every slab height."""
    q = [np.zeros(s, np.float32) for s in shapes]
    grid = shapes[0][:2]
    for rows in (1, 2, 3, 4):
        assert contraction(q, grid, rows) == PyramidSlabs(q, grid, rows).contraction
