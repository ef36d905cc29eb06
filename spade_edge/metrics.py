"""Detection metrics in plain numpy (connected regions for PRO use scipy.ndimage).

* image / pixel ROC AUC (Mann-Whitney U, average ranks for ties: equals scikit-learn);
* PRO / AUPRO as the MVTec AD evaluation defines it: for each connected ground-truth region the
  share of its pixels above the threshold, averaged over all regions of the test set, against the
  false-positive rate on anomaly-free pixels; area up to FPR 0.3 (trapezoid), divided by 0.3;
* F1-max: the best F1 over all thresholds, and that threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve; labels 1 = anomalous."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both normal and anomalous samples")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]  # runs of equal scores share their average rank
    ends = np.r_[starts[1:], len(s)]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; a point per distinct score, starting at (0, 0)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(y.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~y).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[last]]


@dataclass
class F1Max:
    f1: float
    threshold: float
    precision: float
    recall: float


def f1_max(labels, scores) -> F1Max:
    """Best F1 over all thresholds (predict anomalous when score >= threshold)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last].astype(np.float64)
    predicted = (last + 1).astype(np.float64)
    precision, recall = tp / predicted, tp / max(y.sum(), 1)
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
    i = int(np.argmax(f1))
    return F1Max(float(f1[i]), float(s[last[i]]), float(precision[i]), float(recall[i]))


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions (8-connectivity, as the MVTec AD evaluation), numbered
    across the whole stack of masks (N, H, W): (labels, number of regions)."""
    from .runtime.errors import require

    ndimage = require("scipy.ndimage", "eval", "PRO / AUPRO (connected regions)")

    labels = np.zeros(masks.shape, np.int64)
    n = 0
    for i, m in enumerate(np.asarray(masks, bool)):
        lab, k = ndimage.label(m, structure=np.ones((3, 3)))
        labels[i] = np.where(lab > 0, lab + n, 0)
        n += k
    return labels, n


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, fpr ascending. ``masks``, ``maps``: (N, H, W)."""
    masks = np.asarray(masks, bool)
    maps = np.asarray(maps, np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    regions, n_regions = label_regions(masks)
    n_normal = int((~masks).sum())
    if n_regions == 0 or n_normal == 0:
        raise ValueError("PRO needs at least one defect region and one anomaly-free pixel")
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1).astype(np.float64)
    # each pixel, once above the threshold, adds 1/|region|/n_regions to PRO or 1/n_normal to FPR
    r = regions.ravel()
    pro_w = np.where(r > 0, 1.0 / (sizes[r] * n_regions), 0.0)
    fpr_w = np.where(masks.ravel(), 0.0, 1.0 / n_normal)
    s = maps.ravel()
    order = np.argsort(-s, kind="mergesort")
    s = s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    fpr = np.r_[0.0, np.cumsum(fpr_w[order])[last]]
    pro = np.r_[0.0, np.cumsum(pro_w[order])[last]]
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def aupro(masks, maps, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to ``max_fpr`` (trapezoid, interpolated at the limit), / max_fpr."""
    fpr, pro = pro_curve(masks, maps)
    return area_to(fpr, pro, max_fpr) / max_fpr


def area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], x ascending; y interpolated at ``limit``."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit and keep.sum() < len(x):
        j = int(np.argmax(~keep))
        y_lim = y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1])
        xs, ys = np.r_[xs, limit], np.r_[ys, y_lim]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def pixel_roc_auc(masks, maps) -> float:
    """ROC AUC over every pixel of every image."""
    return roc_auc(np.asarray(masks, bool).ravel(), np.asarray(maps).ravel())
