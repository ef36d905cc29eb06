"""The fused kernels (runtime/scoring/fused.py, kernels/fused.c): every level this CPU runs finds the
float64 search's neighbours, ties to the lower index; the dispatch takes the best level and obeys
SPADE_EDGE_CPU_LEVEL; the concatenated pyramid goes through the kernel where it is narrow."""

import numpy as np
import pytest

from spade_edge.runtime import cpu
from spade_edge.runtime.scoring import NumpyScorer, cpu_scorer, fused
from spade_edge.runtime.scoring.base import GalleryPyramids, concat_upsampled

from ..scorer_contract import (
    check_close_neighbours_keep_their_digits,
    check_near_ties_are_decided_exactly,
    check_reads_the_gallery_view,
    check_rejects_bad_arguments,
)

X86 = cpu.platform.machine() in ("x86_64", "AMD64")


def runnable(level: str):
    """``level`` as a parameter, skipped with the reason where this CPU cannot run it."""
    need = fused.LEVELS[level][0]
    arch = "aarch64" if level == "neon" else None
    if arch and cpu.platform.machine() not in ("aarch64", "arm64"):
        return pytest.param(
            level, marks=pytest.mark.skip(reason=f"{level} kernels run on Arm; this is x86 (see test_neon)")
        )
    if not cpu.has(*need):
        return pytest.param(
            level, marks=pytest.mark.skip(reason=f"this CPU lacks {', '.join(need)} for the {level} kernel")
        )
    return level


LEVELS = [runnable(lv) for lv in fused.LEVELS]


def brute_force(q, g, kappa):
    d = ((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :kappa]
    return np.take_along_axis(d, idx, 1), idx


def scorer(level):
    s = fused.FusedScorer(level)
    assert s.lib is not None, fused.kernel(level)[1]
    return s


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kappa", [1, 4, 20])
@pytest.mark.parametrize("dim", [3, 24, 40, 177])
def test_every_level_finds_the_float64_neighbours(level, kappa, dim):
    rng = np.random.default_rng(kappa * 1000 + dim)
    q = rng.normal(size=(53, dim)).astype(np.float32)  # 53: not a multiple of any row tile
    g = rng.normal(size=(301, dim)).astype(np.float32)
    blocks = [g[:100], g[100:101], g[101:250], g[250:]]  # uneven, one a single row: panels padded
    ref_d, ref_i = brute_force(q, g, kappa)
    s = scorer(level)
    top = s.topk(q, blocks, kappa)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5, atol=1e-6)
    assert s.stats["path"] == f"fused {level}"


@pytest.mark.parametrize("batch", [1, 64, 1 << 20])
def test_blocks_joined_into_batches_give_the_same_neighbours(monkeypatch, batch):
    """Small blocks (a coreset's) are joined into one kernel call up to BATCH_ROWS; the answer does not
    depend on where the joins fall."""
    level = fused.best()[0]
    if level is None:
        pytest.skip(f"no fused kernel runs here: {fused.best()[1]}")
    monkeypatch.setattr(fused, "BATCH_ROWS", batch)
    rng = np.random.default_rng(11)
    q = rng.normal(size=(45, 10)).astype(np.float32)
    blocks = [rng.normal(size=(m, 10)).astype(np.float32) for m in (30, 7, 0, 61, 1, 44)]
    ref_d, ref_i = brute_force(q, np.concatenate(blocks), 5)
    top = scorer(level).topk(q, fused.GalleryRows.of(blocks, [np.einsum("ij,ij->i", b, b) for b in blocks]), 5)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
def test_ties_resolve_to_the_lower_gallery_index(level):
    """Duplicated gallery rows (equal expanded and exact distances): the earlier copy wins, in every
    position of the list, across panels, lanes and blocks."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 4, size=(40, 8)).astype(np.float32)  # small integers: many exact ties
    g = np.concatenate([base, base, base])
    q = rng.integers(0, 4, size=(37, 8)).astype(np.float32)
    ref_d, ref_i = brute_force(q, g, 6)
    top = scorer(level).topk(q, [g[:50], g[50:]], 6)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_array_equal(top.distances, ref_d.astype(np.float32))


@pytest.mark.parametrize("level", LEVELS)
def test_owes_what_every_scorer_owes(level):
    s = scorer(level)
    check_close_neighbours_keep_their_digits(s)
    check_rejects_bad_arguments(s)
    check_near_ties_are_decided_exactly(s)
    check_reads_the_gallery_view(s)


def test_pyramids_take_the_kernels_per_level_cost_and_wide_ones_the_bf16_screen_where_it_runs():
    level = fused.best()[0]
    if level is None:
        pytest.skip(f"no fused kernel runs here: {fused.best()[1]}")
    rng = np.random.default_rng(2)
    grid = (8, 32)
    wide_screened = fused.FusedScorer(level).pyramid_screen() is not None
    for shapes, path in (
        ([(8, 32, 8), (4, 16, 8), (2, 8, 8)], f"fused {level} levels"),  # narrow: the fused kernel's per-level cost
        # wide: screened in bf16 where the level has AVX512-BF16 (test_pyramid_screen.py), else the kernel's too
        ([(8, 32, 16), (4, 16, 128), (2, 8, 256)], "avx512bf16 screen" if wide_screened else f"fused {level} levels"),
    ):
        q = [rng.normal(size=s).astype(np.float32) for s in shapes]
        gal = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(4)]
        s = fused.FusedScorer(level)
        top = s.topk_pyramid(q, GalleryPyramids.of(gal, grid, keep_norms=True), grid, 3)
        assert s.stats["path"] == path
        ref_d, ref_i = brute_force(
            concat_upsampled(q, grid), np.concatenate([concat_upsampled(x, grid) for x in gal]), 3
        )
        np.testing.assert_array_equal(top.indices, ref_i)
        np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


def test_cpu_scorer_takes_the_best_level_and_the_cap(monkeypatch):
    monkeypatch.setenv("SPADE_EDGE_AMX", "0")
    levels = fused.levels_here()
    assert cpu_scorer().name == (f"fused {levels[0]}" if levels else "numpy")
    for level in levels:
        monkeypatch.setenv(fused.LEVEL_ENV, level)
        assert fused.levels_here()[0] == level
        assert cpu_scorer().name == f"fused {level}"
    monkeypatch.setenv(fused.LEVEL_ENV, "numpy")
    assert type(cpu_scorer()) is NumpyScorer
    monkeypatch.setenv(fused.LEVEL_ENV, "sse9")
    with pytest.raises(ValueError, match="sse9"):
        fused.levels_here()


@pytest.mark.skipif(not X86, reason="the x86 levels' order is checked on x86")
def test_x86_levels_follow_the_cpu_features():
    want = [lv for lv in ("avx512bf16", "avx512vnni", "avx512", "avx2", "portable") if cpu.has(*fused.LEVELS[lv][0])]
    assert list(fused.levels_here()) == want


SCREENS = [  # (screen, the level whose kernel has it)
    pytest.param(
        screen,
        level,
        marks=pytest.mark.skipif(
            not cpu.has(*fused.LEVELS[level][0]), reason=f"this CPU has no {what} for the {screen} screen"
        ),
    )
    for screen, level, what in (("bf16", "avx512bf16", "AVX512-BF16"), ("int8", "avx512vnni", "AVX512-VNNI"))
]


def screened(monkeypatch, level):
    monkeypatch.setattr(fused, "SCREEN_WORK", 0)  # the screen on searches of any size
    return scorer(level)


@pytest.mark.parametrize("screen, level", SCREENS)
@pytest.mark.parametrize("kappa", [1, 5])
@pytest.mark.parametrize("dim", [9, 24, 176])
def test_each_screen_finds_the_float64_neighbours(monkeypatch, screen, level, kappa, dim):
    rng = np.random.default_rng(dim + kappa)
    q = (rng.random((70, dim)) + 3).astype(np.float32)  # off the origin: centring matters
    g = (rng.random((500, dim)) + 3).astype(np.float32)
    g[450:] = g[400:450]  # duplicates: ties to the lower index
    s = screened(monkeypatch, level)
    top = s.topk(q, [g[:200], g[200:]], kappa)
    assert s.stats["path"] == f"fused {level}, {screen} screen"
    ref_d, ref_i = brute_force(q, g, kappa)
    np.testing.assert_array_equal(top.indices, ref_i)
    np.testing.assert_allclose(top.distances, ref_d, rtol=1e-5)


@pytest.mark.parametrize("screen, level", SCREENS)
@pytest.mark.parametrize("scale", [1e-3, 10.0, 1e4])
def test_the_bound_holds_for_every_kept_pair(screen, level, scale):
    """Every value a screen keeps is at most the true (float64) centred expanded distance of its pair,
    at any scale, and within the screen's own error of it: the kernel computes what screens.py bounds."""
    from spade_edge.runtime.scoring.screens import ScreenedSearch

    rng = np.random.default_rng(4)
    q = (rng.standard_t(3, size=(64, 40)) * scale).astype(np.float32)  # heavy tails: int8 scales stretched
    g = (rng.standard_t(3, size=(300, 40)) * scale).astype(np.float32)
    run = ScreenedSearch(fused.kernel(level)[0], q, 20, screen)  # keeps 35 of 300 per row
    run.add(g, 0)
    run.run.close()
    a, b = q.astype(np.float64) - run.ops.mu, g.astype(np.float64) - run.ops.mu
    true = (b * b).sum(1)[None, :] - 2 * a @ b.T
    kept = np.take_along_axis(true, run.run.idx, 1)
    assert (run.run.vals <= kept).all()
    gap = (kept - run.run.vals) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[run.run.idx])
    assert gap.max() < (0.05 if screen == "bf16" else 0.5)  # a bound, not a blanket


@pytest.mark.parametrize("screen, level", SCREENS)
def test_rows_a_screen_cannot_settle_are_searched_again(monkeypatch, screen, level):
    """Near-duplicates of the query closer than the screen can resolve (1e-2 apart on values ~1, fp32
    resolves them): the screen cannot prove its list complete, the rows are searched again in fp32,
    and the answer is exact. The other query rows are far apart: centring on their mean leaves the
    near ones far from the origin."""
    rng = np.random.default_rng(6)
    base = rng.random(32).astype(np.float32)
    near_q = base[None] + (rng.random((4, 32)) * 1e-2).astype(np.float32)
    q = np.concatenate([near_q, rng.random((60, 32)).astype(np.float32)])
    near = base[None] + (rng.random((40, 32)) * 1e-2).astype(np.float32)  # 40 > kappa + SPARE of them
    g = np.concatenate([rng.random((300, 32)).astype(np.float32), near])
    s = screened(monkeypatch, level)
    top = s.topk(q, [g], 3)
    assert 4 <= s.stats["rows_unsettled"] < 40
    ref_d, ref_i = brute_force(q, g, 3)
    np.testing.assert_array_equal(top.indices, ref_i)


@pytest.mark.parametrize("screen, level", SCREENS)
def test_a_screen_that_settles_too_few_rows_gives_up_for_the_fp32_kernel(monkeypatch, screen, level):
    rng = np.random.default_rng(7)
    base = rng.random(16).astype(np.float32)
    near_q = base[None] + (rng.random((30, 16)) * 1e-2).astype(np.float32)
    q = np.concatenate([near_q, rng.random((30, 16)).astype(np.float32)])  # half of the rows unsettled
    blocks = [base[None] + (rng.random((40, 16)) * 1e-2).astype(np.float32) for _ in range(10)]
    monkeypatch.setattr(fused, "BATCH_ROWS", 1)  # a kernel call per block: the probe after 4 of 10
    s = screened(monkeypatch, level)
    top = s.topk(q, blocks, 2)
    assert s.stats["path"] == f"fused {level}" and s.stats["gave_up_after"] == 4 and s.stats["screen"] == screen
    ref_d, ref_i = brute_force(q, np.concatenate(blocks), 2)
    np.testing.assert_array_equal(top.indices, ref_i)


@pytest.mark.parametrize("screen, level", SCREENS)
def test_the_screen_serves_big_searches_only(screen, level):
    s = scorer(level)
    small = np.zeros((100, 24), np.float32)
    assert s.screen_for(small, fused.GalleryRows.of([np.zeros((1000, 24), np.float32)])) is None
    big = np.zeros((3136, 24), np.float32)
    assert s.screen_for(big, fused.GalleryRows.of([np.zeros((3136 * 50, 24), np.float32)])) == screen
    assert scorer("avx512").screen_for(big, fused.GalleryRows.of([np.zeros((3136 * 50, 24), np.float32)])) is None


@pytest.mark.parametrize("screen, level", [s for s in SCREENS if s.values[0] == "bf16"])
@pytest.mark.parametrize("dim", [1, 15, 16, 17, 40, 177])
def test_bf16_operands_are_the_rounded_centred_rows(screen, level, dim):
    """sf_prep_bf16 (16 channels at a time) packs bf16(fp32(g - mu)) of every row, bit for bit, into its
    lane, zero past the rows and channels, and |g - mu| (float64 sums) beside it."""
    from spade_edge.runtime.scoring.amx_screen import bf16

    lib, rng = fused.kernel(level)[0], np.random.default_rng(dim)
    n, w, d2 = 37, 16, (dim + 1) // 2
    g = (rng.standard_t(3, size=(n, dim)) * 10.0 ** rng.integers(-30, 5, (n, 1))).astype(np.float32)
    g[0] = -0.0
    mu = np.where(rng.random(dim) < 0.3, 0.0, rng.standard_normal(dim))
    npan = -(-n // (2 * w)) * 2
    panels = np.full(npan * d2 * w, 7, np.uint32)
    pnorms, pgn = np.zeros(npan * w, np.float32), np.zeros(npan * w, np.float32)
    lib.sf_prep_bf16(g.ctypes.data, n, dim, mu.ctypes.data, d2, 0, npan, 0.0, panels.ctypes.data,
                     pnorms.ctypes.data, pgn.ctypes.data)  # fmt: skip
    b = g.astype(np.float64) - mu
    want = np.zeros((npan * w, 2 * d2), np.uint16)
    want[:n, :dim] = bf16(b.astype(np.float32))
    got = panels.reshape(npan, d2, w).transpose(0, 2, 1).reshape(npan * w, d2).copy().view(np.uint16)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(pgn[:n], np.sqrt((b * b).sum(1)), rtol=1e-6)
    assert (pnorms[n:] == np.inf).all() and (pgn[n:] == 0).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dim", [1, 7, 8, 9, 176])
def test_exact_recomputation_is_the_float64_distance_rounded_once(level, dim):
    """sf_exact (8 float64 sums side by side): each listed candidate of the block gets its float64
    squared distance rounded to fp32; candidates of other blocks are left as they were."""
    lib, rng = fused.kernel(level)[0], np.random.default_rng(dim)
    q, g = rng.standard_normal((9, dim)).astype(np.float32), rng.standard_normal((50, dim)).astype(np.float32)
    idx = rng.integers(0, 80, (9, 6)).astype(np.int64)
    ex = np.full((9, 6), -1.0, np.float32)
    lib.sf_exact(0, 9, q.ctypes.data, dim, g.ctypes.data, 50, 10, 6, idx.ctypes.data, ex.ctypes.data)
    inside = (idx >= 10) & (idx < 60)
    ref = ((q[:, None].astype(np.float64) - g[np.clip(idx - 10, 0, 49)].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(ex[inside], ref.astype(np.float32)[inside])
    assert (ex[~inside] == -1.0).all()
