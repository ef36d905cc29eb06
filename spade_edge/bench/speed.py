"""Speed on the CPU, measured side by side in one run: pixel scoring against faiss, torch and plain
numpy; the backbone under ONNX Runtime against PyTorch eager; one image end to end."""
from __future__ import annotations

import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from ..runtime.scoring import NumpyScorer
from ..runtime.scoring.base import concat_upsampled

SHAPES = {  # (h, w, C) per level
    "wide_resnet50_2": [(56, 56, 256), (28, 28, 512), (14, 14, 1024)],
    "efficientnet_lite0": [(56, 56, 24), (28, 28, 40), (14, 14, 112)],
}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gemm_rate(p: int, d: int, repeats: int = 5) -> float:
    """numpy fp32 GEMM GFLOP/s on a (p x d) by (d x p) product: this machine's ceiling."""
    rng = np.random.default_rng(0)
    a, b = rng.random((p, d), np.float32), rng.random((p, d), np.float32)
    a @ b.T
    return 2 * p * p * d / median_time(lambda: a @ b.T, repeats) / 1e9


def machine() -> dict:
    from ..runtime.threads import thread_info

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "pools": thread_info()}


def scoring(backbone: str, k: int, repeats: int, peers: bool = True, seed: int = 0) -> dict:
    """One test image against ``k`` gallery images at ``backbone``'s concat shapes, kappa = 1."""
    rng = np.random.default_rng(seed)
    shapes = SHAPES[backbone]
    grid = shapes[0][:2]
    q = [rng.random(s, np.float32) for s in shapes]
    gal = [[rng.random(s, np.float32) for s in shapes] for _ in range(k)]
    p = grid[0] * grid[1]
    d = sum(s[2] for s in shapes)
    flops = 2.0 * p * p * k * d  # the naive concatenation's count, for every method
    out = {"shape": f"Q={p} G={k}x{p} D={d}", "gflop": flops / 1e9}
    ours = NumpyScorer()
    # what the runtime does: gallery stored per level at native resolution, upsampled as it goes
    levels = ours.topk_pyramid(q, gal, grid, 1)
    out["ours_levels_s"] = median_time(lambda: ours.topk_pyramid(q, gal, grid, 1), repeats)
    qx = concat_upsampled(q, grid)
    gx = np.concatenate([concat_upsampled(g, grid) for g in gal])
    # the same data every peer gets: concatenated, upsampled rows
    top = ours.topk(qx, [gx], 1)
    out["ours_s"] = median_time(lambda: ours.topk(qx, [gx], 1), repeats)
    if not peers:
        return out

    def plain():  # the textbook expansion over the whole gallery at once
        dist = (qx**2).sum(1)[:, None] - 2 * qx @ gx.T + (gx**2).sum(1)[None, :]
        return dist.argmin(1)

    out["numpy_s"] = median_time(plain, repeats)
    import faiss

    index = faiss.IndexFlatL2(d)
    index.add(gx)
    _, fi = index.search(qx, 1)
    out["faiss_s"] = median_time(lambda: index.search(qx, 1), repeats)
    out["same_neighbours_as_faiss"] = float(min((fi[:, 0] == top.indices[:, 0]).mean(), (fi[:, 0] == levels.indices[:, 0]).mean()))
    import torch

    tq, tg = torch.from_numpy(qx), torch.from_numpy(gx)
    out["torch_s"] = median_time(lambda: torch.cdist(tq, tg).topk(1, largest=False), repeats)
    return out


# where the concatenated-pyramid scoring spends its time: (label, module, function, own or cumulative)
PROFILE_PARTS = (
    ("BLAS products, fine and coarse (8.1 GFLOP per gallery image)", "blas.py", "_call", "own"),
    ("native products and their query-side upsampling", "pyramid.py", "coarse_products", "cumulative"),
    ("selection (smallest per slab, running candidates)", "numpy.py", "_smallest", "cumulative"),
    ("", "numpy.py", "add", "cumulative"),
    ("exact re-computation of the kept candidates", "pyramid.py", "upsampled_rows", "cumulative"),
    ("gallery norms (a loaded gallery keeps them: made here each time)", "pyramid.py", "upsampled_sqnorms", "cumulative"),
)


def profile_concat(k: int = 50, seed: int = 0) -> dict:
    """cProfile of one WRN50x2 concatenated-pyramid scoring against ``k`` images: seconds per part
    (:data:`PROFILE_PARTS`), the rest as 'other', and the total."""
    import cProfile
    import pstats

    rng = np.random.default_rng(seed)
    shapes = SHAPES["wide_resnet50_2"]
    q = [rng.random(s, np.float32) for s in shapes]
    gal = [[rng.random(s, np.float32) for s in shapes] for _ in range(k)]
    scorer = NumpyScorer()
    scorer.topk_pyramid(q, gal[:2], shapes[0][:2], 1)  # warm: BLAS threads, caches
    prof = cProfile.Profile()
    prof.runcall(scorer.topk_pyramid, q, gal, shapes[0][:2], 1)
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, calls, own, cumulative, callers)
    total = sum(v[2] for v in stats.values())
    parts: dict[str, float] = {}
    label = ""
    for name, module, fn, kind in PROFILE_PARTS:
        label = name or label  # an empty label adds to the part above it
        seconds = sum(v[2 if kind == "own" else 3] for key, v in stats.items() if key[0].endswith(module) and key[2] == fn)
        parts[label] = parts.get(label, 0.0) + seconds
    parts["other (gallery operands, bookkeeping)"] = total - sum(parts.values())
    return {"k": k, "total_s": total, "parts_s": parts}


def backbones(repeats: int, batches=(1, 8)) -> dict:
    """ONNX Runtime fp32 and int8 against PyTorch eager, per backbone and batch size."""
    import torch

    from ..calibration.int8 import Int8Options, int8_from_onnx
    from ..export.backbones import create_backbone
    from ..export.onnx_export import WithPreprocess, onnx_from_backbone
    from ..runtime.features import backend_from_model

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHAPES:
            torch.manual_seed(0)
            net = create_backbone(name, weights="random" if name == "wide_resnet50_2" else None)
            fp32 = Path(tmp) / f"{name}.onnx"
            onnx_from_backbone(net, name, fp32)
            calib = Path(tmp) / "calib"
            calib.mkdir(exist_ok=True)
            from PIL import Image

            for i in range(8):
                Image.fromarray(np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(calib / f"{i}.png")
            int8 = Path(tmp) / f"{name}.int8.onnx"
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                int8_from_onnx(fp32, sorted(calib.iterdir()), int8, Int8Options(), show_progress=False)
            wrapper = WithPreprocess(net, net.feature_info).eval()
            for b in batches:
                x = np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8)
                tx = torch.from_numpy(x)
                row = {}
                for label, path in (("ort_fp32_s", fp32), ("ort_int8_s", int8)):
                    be = backend_from_model(path)
                    be(x)
                    row[label] = median_time(lambda: be(x), repeats)
                with torch.inference_mode():
                    wrapper(tx)
                    row["torch_s"] = median_time(lambda: wrapper(tx), repeats)
                res[f"{name} batch {b}"] = row
    return res


def end_to_end(k: int = 50, repeats: int = 3, modes: tuple[str, ...] = ("concat", "per-level")) -> dict:
    """WRN50x2 (random weights: speed does not depend on them), K images, per stage, for each of
    ``modes`` on the same model, gallery and image: {mode: stages}."""
    import torch

    from PIL import Image

    from ..export.backbones import create_backbone
    from ..export.onnx_export import onnx_from_backbone
    from ..runtime.detector import Detector
    from ..runtime.features import backend_from_model
    from ..runtime.gallery import Gallery
    from ..runtime.spade import SpadeConfig

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Path(tmp) / "wrn.onnx"
        info = onnx_from_backbone(create_backbone("wide_resnet50_2", weights="random"), "wide_resnet50_2", model)
        rng = np.random.default_rng(0)
        levels = {lv.name: rng.random((k, 224 // lv.stride, 224 // lv.stride, lv.channels), np.float32) for lv in info.levels}
        manifest = {"model": {"backbone": info.backbone, "fingerprint": info.fingerprint}, "thresholds": {}}
        g = Gallery.from_arrays([str(i) for i in range(k)], rng.random((k, 2048), np.float32), levels, manifest)
        g.save(Path(tmp) / "g.gallery")
        del levels, g
        image = Path(tmp) / "part.png"
        Image.fromarray(rng.integers(0, 256, (512, 640, 3), dtype=np.uint8)).save(image)
        backend, gallery, out = backend_from_model(model), Gallery.load(Path(tmp) / "g.gallery"), {}
        for mode in modes:
            det = Detector(backend, gallery, config=SpadeConfig(k_image=k, k_gallery=k, mode=mode, score="top-pixels"))
            det.predict(str(image))
            runs = [det.predict(str(image)).timings for _ in range(repeats)]
            stages = {s: float(np.median([r[s] for r in runs])) for s in runs[0]}
            stages["total"] = float(np.median([sum(r.values()) for r in runs]))
            stages["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out[mode] = stages
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; numpy {m['numpy']}; thread pools: "
             + ", ".join(f"{p['internal_api']} x{p['num_threads']}" for p in m["pools"]), "",
             f"numpy fp32 GEMM ceiling at these shapes: {r['gemm_gflops']:.0f} GFLOP/s", "",
             "Same data for every peer: one test image's concatenated, upsampled pixel features against K gallery "
             "images' (rows of D channels). 'ours' is what the runtime runs: it starts from the stored "
             "native-resolution levels (docs/speed.md), upsampling included; 'ours, plain' is our blocked product on "
             "the peers' rows. Rates count the naive concatenation's FLOPs (2 Q G D) for every method.", "",
             "| pixel scoring, kappa = 1 | GFLOP (naive) | ours s | ours, plain s | faiss s | torch s | numpy s | ours vs faiss | ours GFLOP/s | share of GEMM | same neighbours |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["scoring"].items():
        ours = s["ours_levels_s"]
        rate = s["gflop"] / ours
        peer = (f"{s['faiss_s']:.2f} | {s['torch_s']:.2f} | {s['numpy_s']:.2f} | {s['faiss_s'] / ours:.2f}x"
                if "faiss_s" in s else "- | - | - | -")
        same = f"{s['same_neighbours_as_faiss']:.3f}" if "faiss_s" in s else "-"
        lines.append(f"| {name} ({s['shape']}) | {s['gflop']:.0f} | {ours:.2f} | {s['ours_s']:.2f} | {peer} | {rate:.0f} | "
                     f"{rate / r['gemm_gflops']:.0%} | {same} |")
    if "backbones" in r:
        lines += ["", "| backbone | ORT fp32 ms | ORT int8 ms | PyTorch eager ms | ORT fp32 vs PyTorch | int8 / fp32 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, b in r["backbones"].items():
            lines.append(f"| {name} | {b['ort_fp32_s'] * 1e3:.1f} | {b['ort_int8_s'] * 1e3:.1f} | {b['torch_s'] * 1e3:.1f} | "
                         f"{b['torch_s'] / b['ort_fp32_s']:.2f}x | {b['ort_int8_s'] / b['ort_fp32_s']:.2f} |")
    if "profile" in r:
        pr = r["profile"]
        lines += ["", f"Where concat scoring spends its time, WRN50x2, K = {pr['k']} (cProfile, one run, "
                  f"{pr['total_s']:.2f} s under the profiler):", "", "| part | s | share | per gallery image ms |",
                  "|---|---:|---:|---:|"]
        for part, sec in pr["parts_s"].items():
            lines.append(f"| {part} | {sec:.2f} | {sec / pr['total_s']:.0%} | {sec / pr['k'] * 1e3:.1f} |")
    for mode, label in (("concat", "concat (the paper's)"), ("per-level", "per-level (the default)")):
        if mode in r.get("end_to_end", {}):
            e = r["end_to_end"][mode]
            lines += ["", f"End to end, WRN50x2, {label}, K = 50, one 640 x 512 image (median): "
                      + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in e.items() if k not in ("total", "peak_rss_mb"))
                      + f"; total {e['total']:.2f} s (PaDiM's measurement of SPADE: 7.1 s); peak RSS so far "
                      f"{e['peak_rss_mb']:.0f} MB"]
    return "\n".join(lines) + "\n"
