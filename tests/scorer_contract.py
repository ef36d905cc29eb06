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
