"""What every pixel scorer owes, checked the same way for the numpy scorer, the CUDA scorer on
a CuPy stand-in (CPU) and the CUDA scorer on a real GPU."""

from __future__ import annotations

import numpy as np
import pytest


def check_close_neighbours_keep_their_digits(scorer) -> None:
    # a gallery far from the origin with a near-duplicate: the GEMM expansion alone would lose its
    # distance; the exact re-computation of the kept candidates keeps it
    rng = np.random.default_rng(0)
    g = (rng.normal(size=(200, 64)) + 300).astype(np.float32)
    q = g[:5] + np.float32(1e-3)
    top = scorer.topk(q, [g], 1)
    np.testing.assert_array_equal(top.indices[:, 0], np.arange(5))
    np.testing.assert_allclose(top.distances[:, 0], ((q - g[:5]).astype(np.float64) ** 2).sum(1), rtol=1e-3)


def check_rejects_bad_arguments(scorer) -> None:
    q = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="kappa"):
        scorer.topk(q, [np.zeros((5, 4), np.float32)], 0)
    with pytest.raises(ValueError, match="expected"):
        scorer.topk(q, [np.zeros((5, 3), np.float32)], 1)
    with pytest.raises(ValueError, match="fewer than kappa"):
        scorer.topk(q, [np.zeros((2, 4), np.float32)], 3)


def check_near_ties_are_decided_exactly(scorer) -> None:
    """The candidate policy (scoring/base.py): far from the origin, a dozen near-duplicates of the
    query are closer to one another than the expanded distance can resolve (its rounding, ~1e-7 of
    |g|^2 = 5.8e6, is ~0.5; their distances are 1e-6 .. 1.4e-4), each in a block of its own among
    far rows. Fewer than SPARE of them: kept as candidates, re-computed exactly, decided by the exact
    distance: the nearest, then the next, in order."""
    from spade_edge.runtime.scoring.base import SPARE

    rng = np.random.default_rng(3)
    base = (rng.normal(size=64) + 300).astype(np.float32)
    u = np.zeros(64, np.float32)
    u[0] = 1.0
    n = min(12, SPARE)
    order = rng.permutation(n)  # the i-th block holds the near-duplicate of rank order[i]
    blocks = []
    for rank in order:
        far = (rng.normal(size=(20, 64)) * 5 + 300).astype(np.float32)
        blocks.append(np.concatenate([far, (base + np.float32((rank + 1) * 2.0**-10) * u)[None]]))  # exact in fp32
    q = np.repeat(base[None], 3, axis=0)
    top = scorer.topk(q, blocks, 3)
    g = np.concatenate(blocks).astype(np.float64)
    d = ((g[None] - q[:, None].astype(np.float64)) ** 2).sum(-1)
    want = np.argsort(d, axis=1, kind="stable")[:, :3]
    assert {int(order[i // 21]) for i in want[0]} == {0, 1, 2}  # the three nearest near-duplicates
    np.testing.assert_array_equal(top.indices, want)
    np.testing.assert_allclose(top.distances, np.take_along_axis(d, want, 1), rtol=1e-6)


def check_reads_the_gallery_view(scorer) -> None:
    """A :class:`GalleryRows` view is what a scorer reads: blocks by indexing (decoded on each read),
    the same neighbours as from plain arrays; and the scorer's stats name the path that ran."""
    from spade_edge.runtime.scoring.base import GalleryRows

    rng = np.random.default_rng(8)
    q = rng.normal(size=(40, 12)).astype(np.float32)
    blocks = [rng.normal(size=(m, 12)).astype(np.float16) for m in (30, 1, 55)]
    reads = []

    def read(j):
        reads.append(j)
        return blocks[j]

    view = GalleryRows(read, [len(b) for b in blocks], grid=None)
    plain = scorer.topk(q, [b.copy() for b in blocks], 2)
    assert isinstance(scorer.stats.get("path"), str) and scorer.stats["path"]
    got = scorer.topk(q, view, 2)
    assert set(reads) == {0, 1, 2}
    np.testing.assert_array_equal(got.indices, plain.indices)
    np.testing.assert_array_equal(got.distances, plain.distances)
