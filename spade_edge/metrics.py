"""Detection metrics in plain numpy."""
from __future__ import annotations

import numpy as np


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); labels 1 = anomalous."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both normal and anomalous samples")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    # average rank of each run of equal scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
