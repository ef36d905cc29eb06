"""Evaluation on the MVTec AD folder layout: metrics per category and per defect type, curves,
timings, and the worst false positives and false negatives with their heat maps.

Pixel metrics are computed at the model's input resolution on the pre-processed view (the mask
goes through the same resize and crop as the image), as in the paper's evaluation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import mvtec_category
from .metrics import aupro, f1_max, pixel_roc_auc, pro_curve, roc_auc, roc_curve
from .runtime.build import gallery_from_images
from .runtime.detector import Detector
from .runtime.features import FeatureBackend
from .runtime.images import Preprocess, load_image
from .runtime.progress import progress
from .runtime.scoring import PixelScorer
from .runtime.spade import SpadeConfig

N_WORST = 3


@dataclass
class CategoryResult:
    name: str
    metrics: dict
    per_type: dict
    timings_ms: dict
    worst: dict  # {"false_positives": [...], "false_negatives": [...]}: image names, scores, heat-map paths
    curves: dict  # picture paths

    def to_dict(self) -> dict:
        return self.__dict__


def find_categories(root: Path) -> list[Path]:
    """``root`` itself if it is a category (has train/good), else its sub-folders that are."""
    root = Path(root)
    if (root / "train" / "good").is_dir():
        return [root]
    cats = sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not cats:
        raise FileNotFoundError(f"{root}: no MVTec AD category (a folder with train/good) here or one level down")
    return cats


def _safe(fn, *args):
    try:
        return fn(*args)
    except ValueError:  # e.g. a test set without defects: the metric is undefined, not zero
        return None


def evaluate_category(
    backend: FeatureBackend,
    category: Path,
    out: Path,
    config: SpadeConfig,
    preprocess: Preprocess,
    echo=print,
    scorer: PixelScorer | None = None,
) -> CategoryResult:
    from .render import save_heatmap

    train, tests = mvtec_category(category)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"[{category.name}] gallery from {len(train)} normal images, {len(tests)} test images")
    t0 = time.perf_counter()
    # 10% of train/good held out: thresholds, and the normal medians of the default combined score
    gallery = gallery_from_images(
        backend, train, out / f"{category.name}.gallery", holdout=0.1, config=config, preprocess=preprocess
    )
    build_s = time.perf_counter() - t0
    det = Detector(backend, gallery, scorer, config=config, preprocess=preprocess)
    s = backend.info.input_size
    rows, maps, masks = [], [], []
    for path, kind, mask_path in progress(tests, len(tests), category.name):
        p = det.predict(path)
        if mask_path is not None:
            m = preprocess(np.repeat(load_image(mask_path)[:, :, :1], 3, axis=2))[0][:, :, 0] > 127
        else:
            m = np.zeros((s, s), bool)
        maps.append(p.anomaly_map.astype(np.float32))
        masks.append(m)
        rows.append(
            {
                "image": str(path.relative_to(category)),
                "type": kind,
                "label": int(kind != "good"),
                "score": p.score,
                "max_pixel": p.max_pixel_score,
                "timings_ms": p.to_dict()["timings_ms"],
            }
        )
    labels = np.array([r["label"] for r in rows])
    scores = np.array([r["score"] for r in rows])
    maxpix = np.array([r["max_pixel"] for r in rows])
    maps_a, masks_a = np.stack(maps), np.stack(masks)
    has_masks = masks_a.any()
    metrics = {
        "images": len(rows),
        "defective": int(labels.sum()),
        "image_auroc": _safe(roc_auc, labels, scores),
        "image_auroc_max_pixel": _safe(roc_auc, labels, maxpix),
        "pixel_auroc": _safe(pixel_roc_auc, masks_a, maps_a) if has_masks else None,
        "aupro": _safe(aupro, masks_a, maps_a) if has_masks else None,
        "f1_max": (lambda r: r.__dict__ if r else None)(_safe(f1_max, labels, scores)),
        "gallery_build_s": build_s,
    }
    per_type = {}
    good = labels == 0
    for kind in sorted({r["type"] for r in rows} - {"good"}):
        sel = np.array([r["type"] == kind for r in rows])
        both = sel | good
        per_type[kind] = {
            "images": int(sel.sum()),
            "image_auroc": _safe(roc_auc, labels[both], scores[both]),
            "image_auroc_max_pixel": _safe(roc_auc, labels[both], maxpix[both]),
            "pixel_auroc": _safe(pixel_roc_auc, masks_a[both], maps_a[both]) if masks_a[sel].any() else None,
            "aupro": _safe(aupro, masks_a[both], maps_a[both]) if masks_a[sel].any() else None,
        }
    stages = rows[0]["timings_ms"].keys()
    timings = {k: float(np.median([r["timings_ms"][k] for r in rows])) for k in stages}
    timings["total"] = float(np.median([sum(r["timings_ms"].values()) for r in rows]))

    worst: dict[str, list[dict]] = {"false_positives": [], "false_negatives": []}
    fp = [i for i in np.argsort(-scores) if labels[i] == 0][:N_WORST]
    fn = [i for i in np.argsort(scores) if labels[i] == 1][:N_WORST]
    for key, idx in (("false_positives", fp), ("false_negatives", fn)):
        for i in idx:  # scored again rather than keeping every prediction in memory
            pic = save_heatmap(
                det.predict(tests[i][0], name=rows[i]["image"]),
                gallery,
                out / "worst" / key,
                name=rows[i]["image"].replace("/", "_"),
            )
            worst[key].append(
                {"image": rows[i]["image"], "score": rows[i]["score"], "heatmap": str(pic.relative_to(out.parent))}
            )
    curves = plot_curves(labels, scores, maxpix, masks_a, maps_a, out / f"{category.name}-curves.png", category.name)
    result = CategoryResult(
        category.name, metrics, per_type, timings, worst, {"curves": str(curves.relative_to(out.parent))}
    )
    (out / "results.json").write_text(
        json.dumps(
            {**result.to_dict(), "config": config.to_dict(), "preprocess": preprocess.to_dict(), "images": rows},
            indent=1,
        )
    )
    return result


def plot_curves(labels, scores, maxpix, masks, maps, path: Path, title: str) -> Path:
    """ROC of both image scores and, where masks exist, the PRO curve, side by side."""
    from .runtime.errors import require

    matplotlib = require("matplotlib", "eval", "Plotting evaluation curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    ax = axes[0]
    if labels.min() != labels.max():
        for s, name in ((scores, "image-stage score"), (maxpix, "max pixel score")):
            fpr, tpr, _ = roc_curve(labels, s)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc(labels, s):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: image ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax = axes[1]
    if masks.any():
        fpr, pro = pro_curve(masks, maps)
        ax.plot(fpr, pro, label=f"AUPRO@0.3 {aupro(masks, maps):.3f}")
        ax.axvline(0.3, ls=":", color="gray")
        ax.legend(loc="lower right", fontsize=8)
    ax.set(
        xlabel="false positive rate (pixels)",
        ylabel="per-region overlap",
        title=f"{title}: PRO",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def evaluate(
    backend: FeatureBackend,
    data: Path,
    out: Path,
    config: SpadeConfig,
    preprocess: Preprocess,
    echo=print,
    scorer: PixelScorer | None = None,
) -> list[CategoryResult]:
    """Evaluate every category under ``data`` (``scorer``: the one that follows ``backend``'s
    features, runtime/device.py; default this CPU's); write per-category JSON and report.md / .html."""
    from .report import write_reports

    out = Path(out)
    results = [
        evaluate_category(backend, c, out / c.name, config, preprocess, echo, scorer) for c in find_categories(data)
    ]
    write_reports(results, out, backend.info.backbone, config, preprocess)
    return results
