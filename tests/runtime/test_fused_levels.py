"""The concatenated pyramid at per-level cost inside the fused kernel (runtime/scoring/fused_levels.py,
``sf_levels`` in kernels/fused.c): at every level this CPU runs, the float64 search of the upsampled,
concatenated rows finds the same neighbours, ties to the lower index; the bound brackets every kept
candidate's expanded distance; bad galleries are refused. (Which pyramids take it: test_fused.py.)"""

import numpy as np
import pytest

from spade_edge.runtime.resample import taps
from spade_edge.runtime.scoring import fused, fused_levels, pyramid
from spade_edge.runtime.scoring.base import GalleryPyramids, concat_upsampled
from spade_edge.runtime.scoring.fused import Clock
from spade_edge.runtime.threads import blas_single_threaded

from .test_fused import LEVELS, brute_force, scorer

# (grid, level shapes): Lite0-like; widths that are no multiple of a register tile's lanes; odd native sizes
# and three coarse levels; two levels at the fine grid; a coarse level as wide as the grid in x only
PYRAMIDS = [
    ((16, 16), [(16, 16, 24), (8, 8, 40), (4, 4, 112)]),
    ((9, 23), [(9, 23, 5), (5, 12, 7), (3, 6, 9)]),
    ((14, 10), [(14, 10, 8), (7, 5, 16), (4, 3, 12), (2, 2, 20)]),
    ((12, 12), [(12, 12, 6), (12, 12, 3), (6, 6, 10)]),
    ((8, 20), [(8, 20, 4), (4, 20, 6)]),  # SPAN: VW columns' taps reach VW + 1 native columns
    ((20, 21), [(20, 21, 6), (10, 19, 5), (5, 17, 3)]),
]
SPAN = 4


def search(level, q, gal, grid, kappa, keep_norms=True):
    s = scorer(level)
    top = s.topk_levels(q, GalleryPyramids.of(gal, grid, keep_norms=keep_norms), grid, kappa)
    return s, top


def reference(q, gal, grid, kappa):
    return brute_force(concat_upsampled(q, grid), np.concatenate([concat_upsampled(x, grid) for x in gal]), kappa)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", range(len(PYRAMIDS)))
@pytest.mark.parametrize("kappa", [1, 3, 20])
@pytest.mark.parametrize("native_x", [1, 10**9], ids=["native-x", "gx"])
def test_every_level_finds_the_float64_neighbours_of_the_upsampled_concatenation(
    level, case, kappa, native_x, monkeypatch
):
    """Both ways of a coarse level's products: native x (the kernel's lane permutations make the gallery's
    x taps; WRN50x2's wide levels) and the gallery upsampled along x first (Gx; narrow levels)."""
    monkeypatch.setattr(fused_levels, "NATIVE_X", native_x)
    grid, shapes = PYRAMIDS[case]
    rng = np.random.default_rng(100 * case + kappa)
    q = [rng.normal(size=s).astype(np.float32) for s in shapes]
    gal = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)]
    s, top = search(level, q, gal, grid, kappa, keep_norms=case % 2 == 0)
    assert s.stats["path"] == f"fused {level} levels"
    ref_d, ref_i = reference(q, gal, grid, kappa)
    vw = int(fused.kernel(level)[0].sf_width())
    wpad = -(-grid[1] // vw) * vw
    spans_fit = [fused_levels._groups(*taps(grid[1], x[1]), grid[1], wpad, vw) is not None for x in shapes[1:]]
    coarse = [x[2] for x in shapes if x[:2] != grid]
    assert s.stats["native_x"] == [c >= native_x and fit for c, fit in zip(coarse, spans_fit[-len(coarse) :])]
    if case == SPAN:
        assert not any(spans_fit)  # no lane permutation reaches the taps: Gx, whatever the channels
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kappa", [1, 2])  # kappa = 1: 16 kept, the register-wide insertion on x86
def test_near_neighbours_are_decided_by_the_exact_distance_and_ties_go_to_the_lower_index(level, kappa):
    """Gallery images that are the query plus noise below fp32's resolution of the expanded distance (their
    expanded distances tie or misorder), and an exact copy of one of them later: the float64 order wins,
    the copy's cells never displace the first one's."""
    grid, shapes = PYRAMIDS[0]
    rng = np.random.default_rng(7)
    q = [(rng.normal(size=s) * 30).astype(np.float32) for s in shapes]
    near = [[(x + rng.normal(size=x.shape) * 1e-3 * (1 + j)).astype(np.float32) for x in q] for j in range(3)]
    gal = [near[0], near[1], near[2], [x.copy() for x in near[1]]]
    s, top = search(level, q, gal, grid, kappa)
    ref_d, ref_i = reference(q, gal, grid, kappa)
    np.testing.assert_array_equal(top.indices, ref_i)
    p = grid[0] * grid[1]
    assert (top.indices < 3 * p).all()  # the copy (image 3) ties with image 1 and loses on its index
    # the upsampled rows are fp32 (values ~30, steps ~2e-6): the distances of 1e-3 noise are known to ~1e-7
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_the_bound_brackets_every_kept_candidates_expanded_distance(level, scale):
    """|kept value - float64 expanded distance| <= bound for every candidate kept, at small and large scales,
    heavy-tailed features (the bound is what decides which candidates are re-computed)."""
    grid, shapes = PYRAMIDS[1]
    rng = np.random.default_rng(int(scale * 1000) + 3)
    q = [(rng.standard_t(3, size=s) * scale).astype(np.float32) for s in shapes]
    gal = [[(rng.standard_t(3, size=s) * scale).astype(np.float32) for s in shapes] for _ in range(4)]
    lib = fused.kernel(level)[0]
    view = GalleryPyramids.of(gal, grid, keep_norms=True)
    run = fused_levels.LevelsSearch(lib, q, grid, 5, Clock())
    kept, reach = [], np.empty(len(gal))
    p = grid[0] * grid[1]
    with blas_single_threaded():
        for j in range(len(gal)):
            norms = np.asarray(view.sqnorms(j), np.float64)
            run.add(gal[j], norms, j * p)
            kept.append(norms)
            reach[j] = pyramid.reach(gal[j])
    run.close()
    bound = run.bound(kept, reach).astype(np.float64)
    top = run.top
    assert (top.index >= 0).all()
    q_up = concat_upsampled(q, grid).astype(np.float64)
    g_up = np.concatenate([concat_upsampled(x, grid) for x in gal]).astype(np.float64)
    rows = np.arange(p)[:, None]
    g = g_up[top.index]
    expanded = (g * g).sum(-1) - 2 * (q_up[rows] * g).sum(-1)
    slack = np.abs(top.approx.astype(np.float64) - expanded)
    assert (slack <= bound).all(), float((slack / bound).max())
    assert (slack > bound / 200).any()  # the data round for real: a bound 200x smaller fails here
    assert (bound < 1e-3 * (np.abs(expanded) + (q_up * q_up).sum(-1)[:, None])).all()  # and tight enough to settle


@pytest.mark.parametrize("level", LEVELS)
def test_bad_galleries_and_kappa_are_refused(level):
    grid, shapes = PYRAMIDS[0]
    rng = np.random.default_rng(0)
    q = [rng.normal(size=s).astype(np.float32) for s in shapes]
    good = [rng.normal(size=s).astype(np.float32) for s in shapes]
    bad = [good[0], good[1], good[2][:, :, :-1]]
    with pytest.raises(ValueError, match="levels"):
        search(level, q, [good, bad], grid, 1, keep_norms=False)
    with pytest.raises(ValueError, match="kappa"):
        search(level, q, [good], grid, 0)
    with pytest.raises(ValueError, match="fewer than kappa"):
        search(level, q, [good], grid, grid[0] * grid[1] + 1)


@pytest.mark.parametrize("level", LEVELS)
def test_a_copy_of_the_query_is_at_distance_zero_at_every_cell(level):
    """The exact distances are the upsampled rows' without their fp32 rounding: both sides' taps are made
    the same way, so a gallery image equal to the query matches every cell at 0, itself."""
    grid, shapes = PYRAMIDS[1]
    rng = np.random.default_rng(5)
    q = [rng.normal(size=s).astype(np.float32) for s in shapes]
    other = [rng.normal(size=s).astype(np.float32) for s in shapes]
    s, top = search(level, q, [other, [x.copy() for x in q]], grid, 1)
    p = grid[0] * grid[1]
    np.testing.assert_array_equal(top.distances[:, 0], 0.0)
    np.testing.assert_array_equal(top.indices[:, 0], p + np.arange(p))
