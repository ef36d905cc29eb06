"""What reduced precision costs: feature drift per level, accuracy on the ELPV benchmarks, and
latency under ONNX Runtime on this CPU, all against the fp32 model in one run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from spade_edge.runtime import cpu
from spade_edge.runtime.features import FeatureBackend
from spade_edge.runtime.images import Preprocess, load_image


def _rows(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]) if a.ndim == 4 else a


def feature_drift(ref: FeatureBackend, test: FeatureBackend, images, batch: int = 8) -> dict:
    """Per output: cosine similarity of every pixel feature (mean and 1st percentile) and relative
    error ||test - ref|| / ||ref||, over ``images``."""
    pre = Preprocess(ref.info.input_size)
    cos: dict[str, list[np.ndarray]] = {}
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for s in range(0, len(images), batch):
        x = np.stack([pre(load_image(p))[0] for p in images[s : s + batch]])
        a, b = ref(x), test(x)
        for k in a:
            ra, rb = _rows(a[k]).astype(np.float64), _rows(b[k]).astype(np.float64)
            c = (ra * rb).sum(1) / np.maximum(np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1), 1e-12)
            cos.setdefault(k, []).append(c)
            num[k] = num.get(k, 0.0) + float(((ra - rb) ** 2).sum())
            den[k] = den.get(k, 0.0) + float((ra**2).sum())
    return {
        k: {
            "cosine_mean": float(np.concatenate(cos[k]).mean()),
            "cosine_p01": float(np.percentile(np.concatenate(cos[k]), 1)),
            "rel_error": float(np.sqrt(num[k] / den[k])),
        }
        for k in cos
    }


def latency(backend: FeatureBackend, batch: int = 1, repeats: int = 20) -> float:
    """Median seconds of one inference of ``batch`` images (after warm-up)."""
    x = np.random.default_rng(0).integers(
        0, 256, (batch, backend.info.input_size, backend.info.input_size, 3), dtype=np.uint8
    )
    for _ in range(3):
        backend(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def drift_report(
    ref: FeatureBackend,
    test: FeatureBackend,
    normal,
    anomalous,
    out: Path,
    accuracy: dict | None = None,
    repeats: int = 20,
) -> dict:
    """Write drift.json and drift.md into ``out``; ``accuracy``: {setting: {fp32: ..., reduced: ...}} if measured."""
    report = {
        "precision": test.info.precision,
        "calibration": test.info.extra.get("calibration"),
        "features": {"normal": feature_drift(ref, test, normal), "anomalous": feature_drift(ref, test, anomalous)},
        "images": {"normal": len(normal), "anomalous": len(anomalous)},
        # INT8 products differ by CPU kernel (runtime/cpu.py): the figures hold for this one
        "measured_on": cpu.measured_on(),
    }
    t_ref, t_test = latency(ref, repeats=repeats), latency(test, repeats=repeats)
    report["latency"] = {"fp32_ms": t_ref * 1e3, "reduced_ms": t_test * 1e3, "ratio": t_test / t_ref, "batch": 1}
    if accuracy:
        report["accuracy"] = accuracy
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(report, indent=1))
    (out / "drift.md").write_text(markdown(report, ref.info.backbone))
    return report


def markdown(r: dict, backbone: str) -> str:
    lines = [
        f"# {backbone}: {r['precision']} against fp32",
        "",
        f"Calibration: {r['calibration']}",
        "",
        f"Measured on: {r['measured_on']['summary']}",
        "",
        "| output | normal: cosine mean | cosine p1 | rel. error | anomalous: cosine mean | cosine p1 | rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, n in r["features"]["normal"].items():
        a = r["features"]["anomalous"][k]
        lines.append(
            f"| {k} | {n['cosine_mean']:.4f} | {n['cosine_p01']:.4f} | {n['rel_error']:.4f} | "
            f"{a['cosine_mean']:.4f} | {a['cosine_p01']:.4f} | {a['rel_error']:.4f} |"
        )
    lat = r["latency"]
    lines += [
        "",
        f"ONNX Runtime CPU latency, batch 1: fp32 {lat['fp32_ms']:.1f} ms, {r['precision']} {lat['reduced_ms']:.1f} ms, "
        f"ratio {lat['ratio']:.2f}",
        "",
    ]
    if "accuracy" in r:
        lines += ["| benchmark | metric | fp32 | reduced | difference |", "|---|---|---:|---:|---:|"]
        for bench, m in r["accuracy"].items():
            for metric in ("image_auroc", "max_pixel_auroc", "pixel_auroc", "aupro"):
                f, q = m["fp32"][metric], m["reduced"][metric]
                lines.append(f"| {bench} | {metric} | {f:.3f} | {q:.3f} | {q - f:+.3f} |")
    return "\n".join(lines) + "\n"
