"""The pyramid screen's back-ends (runtime/scoring/amx.py BACKENDS, kernels/amx_screen.c): the AMX
method with its products on AMX tiles or on AVX512-BF16 (VDPBF16PS) over the same packed operands,
the same bound and the same settling. Each back-end gives the neighbours of an exact float64 search;
a back-end this CPU lacks is skipped with the reason; the fused scorer dispatches to AVX512-BF16 for
wide pyramids where its level has it."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime import cpu
from spade_edge.runtime.scoring import amx, amx_screen, fused
from spade_edge.runtime.scoring.amx_screen import PyramidScreen, column_taps, tile_runs, up
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
        (2, (56, 56), [(56, 56, 8), (28, 28, 16), (14, 14, 32)], 2, 1.0),  # WRN50x2's grids: tiles across rows
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
@pytest.mark.parametrize("coarse_parts", [0, 1, 2])
@pytest.mark.parametrize(
    "grid,shapes",
    [
        ((8, 8), [(8, 8, 48), (4, 4, 96), (2, 2, 200)]),
        ((20, 20), [(20, 20, 24), (10, 10, 40), (5, 5, 72)]),  # tiles across fine rows, a padded row block
    ],
)
def test_the_bound_holds_for_every_pair(backend, coarse_parts, grid, shapes):
    """Every gallery cell kept, the coarse windows in one bf16 part or two, or (AVX-512) as fp32 taps: each
    pair's lower and upper bounds bracket its expanded distance (float64), and the bracket is narrow."""
    if coarse_parts == 0 and not amx._kernel(backend)[0].se_taps():
        pytest.skip(f"the {backend} back-end has no taps mode")
    rng = np.random.default_rng(7)
    q, (g,) = _pyramid(rng, shapes, 1, offset=5.0, scale=3.0)
    cells = grid[0] * grid[1]
    screen = PyramidScreen(amx._kernel(backend)[0], PyramidSlabs(q, grid), m=cells, coarse_parts=coarse_parts)
    screen.add(g, None)
    screen.close()
    low, idx, high, _ = screen.bounds(1)
    qx, gx = _concat(q, grid).astype(np.float64), _concat(g, grid).astype(np.float64)
    mu = np.concatenate(screen.mu).astype(np.float64)
    truth = np.take_along_axis(((qx[:, None, :] - gx[None]) ** 2).sum(-1) - ((qx - mu) ** 2).sum(1)[:, None], idx, 1)
    assert (idx >= 0).all()
    assert np.all(low <= truth) and np.all(truth <= high)
    # one part: each window value off by up to 2^-8 of the row's largest, a wider (but holding) bracket
    assert np.median(high - low) < (2e-2 if coarse_parts == 1 else 1e-2) * np.median(np.abs(truth))


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
    the screens off) it is the fused kernel's per-level cost (tests/runtime/test_fused_levels.py)."""
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
    assert capped.stats["path"] == "fused avx512 levels"


RUN_GRIDS = [
    [(56, 56, 1), (28, 28, 1), (14, 14, 1)],  # WRN50x2
    [(20, 20, 1), (10, 10, 1), (5, 5, 1)],
    [(12, 12, 1), (6, 6, 1)],
    [(32, 32, 1), (16, 16, 1), (8, 8, 1)],
    [(7, 9, 1), (3, 4, 1)],  # uneven: weights that are not multiples of 1/4, a slab of 3 rows
]


@pytest.mark.parametrize("shapes", RUN_GRIDS)
def test_each_tile_reads_every_pair_its_weights_need(shapes):
    """tile_runs: every nonzero weight of a 16-column B tile lies in one of that tile's runs of pairs; the
    runs are ascending, disjoint and inside the window; on WRN50x2's grids they are under a third of it."""
    q = [np.zeros(s, np.float32) for s in shapes]
    slabs = PyramidSlabs(q, shapes[0][:2], rows=4)
    n_pad = up(slabs.rows * shapes[0][1])
    read = total = 0
    for _, _, coarse in slabs.slabs:
        for _, _, weights in coarse:
            runs, at = tile_runs(weights, n_pad)
            pairs = up(weights.shape[0], 2) // 2
            assert at[0] == 0 and at[-1] == len(runs) and np.all(np.diff(at) >= 0) and len(at) == n_pad // 16 + 1
            for t in range(n_pad // 16):
                mine = runs[at[t] : at[t + 1]]
                assert np.all(mine[:, 0] < mine[:, 1]) and np.all(mine[1:, 0] > mine[:-1, 1])
                assert mine.size == 0 or (mine.min() >= 0 and mine.max() <= pairs)
                covered = np.zeros(2 * pairs, bool)
                for k0, k1 in mine:
                    covered[2 * k0 : 2 * k1] = True
                needed = (weights[:, 16 * t : 16 * t + 16] != 0).any(axis=1)
                assert np.all(covered[: len(needed)] | ~needed)
                read += int((mine[:, 1] - mine[:, 0]).sum())
            total += pairs * (n_pad // 16)
    if shapes[0][:2] == (56, 56):
        assert read < total / 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_runs_change_no_screened_value(backend, monkeypatch):
    """The windows cut to each tile's runs skip only products with zero weights: every value the screen
    keeps is bit for bit what the whole window gives (AMX reads the whole window either way)."""
    rng = np.random.default_rng(3)
    grid, shapes = (20, 20), [(20, 20, 24), (10, 10, 40), (5, 5, 72)]
    q, gallery = _pyramid(rng, shapes, 2, offset=1.0)
    lib = amx._kernel(backend)[0]

    def screened():
        screen = PyramidScreen(lib, PyramidSlabs(q, grid), m=24)
        for g in gallery:
            screen.add(g, None)
        screen.close()
        return screen.vals, screen.idx, screen.thr

    cut = screened()

    def whole(weights, n_pad):  # one run over the whole window for every tile
        pairs = up(weights.shape[0], 2) // 2
        return np.array([[0, pairs]] * (n_pad // 16), np.int32), np.arange(n_pad // 16 + 1, dtype=np.int64)

    monkeypatch.setattr(amx_screen, "tile_runs", whole)
    for a, b in zip(cut, screened()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shapes", RUN_GRIDS)
def test_each_column_s_taps_are_its_weights(shapes):
    """column_taps: a column's four (cell, weight) taps add up to exactly its column of the slab's weights (B before
    packing); columns past the slab's own have weight 0."""
    q = [np.zeros(s, np.float32) for s in shapes]
    slabs = PyramidSlabs(q, shapes[0][:2], rows=4)
    n_pad = up(slabs.rows * shapes[0][1])
    for _, _, coarse in slabs.slabs:
        for _, _, weights in coarse:
            cells, w = column_taps(weights, n_pad)
            assert cells.shape == w.shape == (n_pad, 4) and cells.min() >= 0 and cells.max() < len(weights)
            made = np.zeros((len(weights), n_pad), np.float32)
            np.add.at(made, (cells, np.arange(n_pad)[:, None]), w)
            np.testing.assert_array_equal(made[:, : weights.shape[1]], weights)
            assert not made[:, weights.shape[1] :].any()


def test_taps_are_asked_only_of_a_backend_that_has_them():
    """coarse_parts = 0 (fp32 taps) is the AVX-512 kernel's; a library without them (AMX) is refused at once."""

    class NoTaps:
        @staticmethod
        def se_taps():
            return 0

    q = [np.zeros(s, np.float32) for s in WRN_LIKE]
    with pytest.raises(ValueError, match="AVX-512 only"):
        PyramidScreen(NoTaps(), PyramidSlabs(q, (16, 16)), m=16, coarse_parts=0)
    assert amx.COARSE_PARTS["amx"] in (1, 2)


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
