"""Known answers, and agreement with scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from spade_edge.metrics import area_to, aupro, f1_max, pixel_roc_auc, pro_curve, roc_auc, roc_curve


def test_roc_auc_hand_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    # one inversion among 2 x 2 pairs
    assert roc_auc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == 0.75
    # a tie between a positive and a negative counts one half
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.1, 0.2])


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # rounding creates ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_f1_max_hand_case():
    # threshold 0.35: P 1, R 2/3 -> F1 0.8; threshold 0.2: P 3/4, R 1 -> F1 6/7 (the best)
    r = f1_max([1, 1, 0, 1, 0], [0.4, 0.35, 0.3, 0.2, 0.1])
    assert r.f1 == pytest.approx(6 / 7) and r.threshold == 0.2
    assert r.precision == 0.75 and r.recall == 1.0


def test_pro_curve_hand_case():
    # one image, two defect regions of sizes 2 and 1, three normal pixels
    mask = np.array([[[1, 1, 0], [0, 0, 0], [0, 0, 1]]], bool)
    amap = np.array([[[0.9, 0.2, 0.5], [0.1, 0.05, 0.0], [0.0, 0.0, 0.8]]])
    amap[0, 1, 2] = 0.01
    fpr, pro = pro_curve(mask, amap)
    # descending: 0.9 (region A, half) -> pro 0.25; 0.8 (region B) -> 0.75; 0.5 (normal) -> fpr 1/6
    # 0.2 (region A, second pixel) -> pro 1.0
    assert list(np.round(pro[:5], 6)) == [0.0, 0.25, 0.75, 0.75, 1.0]
    assert fpr[3] == pytest.approx(1 / 6)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


def test_aupro_perfect_and_integration_limit():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 20, 20), bool)
    masks[0, 2:6, 2:6] = masks[1, 10:12, 3:15] = True
    perfect = masks + rng.random(masks.shape) * 0.5
    assert aupro(masks, perfect) == pytest.approx(1.0)
    # a region that is never above any normal pixel contributes 0 until FPR reaches 1
    inverted = -perfect
    assert aupro(masks, inverted) == pytest.approx(0.0)
    # trapezoid with interpolation at the limit: y = x on [0, 1] -> area to 0.3 is 0.045
    assert area_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.3) == pytest.approx(0.045)


def test_aupro_counts_regions_not_pixels():
    # a large region found and a small region missed weigh the same
    masks = np.zeros((1, 30, 30), bool)
    masks[0, :10, :10] = True  # 100 px, found
    masks[0, 20, 20] = True  # 1 px, missed (scored lowest of all)
    amap = np.where(masks, 1.0, 0.5)
    amap[0, 20, 20] = 0.0
    fpr, pro = pro_curve(masks, amap)
    assert pro[np.searchsorted(fpr, 0.0, side="right") - 1] == pytest.approx(0.5)


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 16, 16)) > 0.9
    maps = rng.random((4, 16, 16)) + masks * 0.5
    assert pixel_roc_auc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
