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


class KeptNorms(list):
    """Gallery images (lists of level maps) with their upsampled squared norms made once, as a loaded
    gallery keeps them (spade._DecodedPyramids): the scorers' ``sqnorms`` hook."""

    def __init__(self, images: list, grid: tuple[int, int]):
        super().__init__(images)
        from ..runtime.scoring.pyramid import upsampled_sqnorms

        self.norms = [upsampled_sqnorms(g, grid) for g in images]

    def sqnorms(self, j: int, levels) -> np.ndarray:
        return self.norms[j]


def scoring(backbone: str, k: int, repeats: int, peers: bool = True, seed: int = 0) -> dict:
    """One test image against ``k`` gallery images at ``backbone``'s concat shapes, kappa = 1: the
    runtime's CPU scorer (``scorer``: AMX where the CPU has it), our fp32 path, and the peers."""
    from ..runtime.scoring import scorer_for

    rng = np.random.default_rng(seed)
    shapes = SHAPES[backbone]
    grid = shapes[0][:2]
    q = [rng.random(s, np.float32) for s in shapes]
    p = grid[0] * grid[1]
    # what the runtime does: gallery stored per level at native resolution (its norms kept), upsampled as it goes
    gal = KeptNorms([[rng.random(s, np.float32) for s in shapes] for _ in range(k)], grid)
    d = sum(s[2] for s in shapes)
    flops = 2.0 * p * p * k * d  # the naive concatenation's count, for every method
    out = {"shape": f"Q={p} G={k}x{p} D={d}", "gflop": flops / 1e9}
    ours, fp32 = scorer_for("cpu"), NumpyScorer()
    out["scorer"] = ours.name
    levels = ours.topk_pyramid(q, gal, grid, 1)
    out["ours_levels_s"] = median_time(lambda: ours.topk_pyramid(q, gal, grid, 1), repeats)
    out["ours_stats"] = {key: v for key, v in getattr(ours, "stats", {}).items() if key != "seconds"}
    same_fp32 = fp32.topk_pyramid(q, gal, grid, 1)
    out["fp32_levels_s"] = median_time(lambda: fp32.topk_pyramid(q, gal, grid, 1), repeats)
    out["same_neighbours_as_fp32"] = float((same_fp32.indices[:, 0] == levels.indices[:, 0]).mean())
    qx = concat_upsampled(q, grid)
    gx = np.concatenate([concat_upsampled(g, grid) for g in gal])
    # the same data every peer gets: concatenated, upsampled rows
    top = fp32.topk(qx, [gx], 1)
    out["ours_s"] = median_time(lambda: fp32.topk(qx, [gx], 1), repeats)
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
)


def profile_concat(k: int = 50, seed: int = 0) -> dict:
    """Where one WRN50x2 concatenated-pyramid scoring against ``k`` images spends its time, on the
    runtime's CPU scorer: the AMX scorer's own clock by part, or for the fp32 path cProfile by part
    (:data:`PROFILE_PARTS`); the rest as 'other', and the total."""
    from ..runtime.scoring import scorer_for

    rng = np.random.default_rng(seed)
    shapes = SHAPES["wide_resnet50_2"]
    grid = shapes[0][:2]
    q = [rng.random(s, np.float32) for s in shapes]
    gal = KeptNorms([[rng.random(s, np.float32) for s in shapes] for _ in range(k)], grid)
    scorer = scorer_for("cpu")
    scorer.topk_pyramid(q, gal[:2], grid, 1)  # warm: threads, caches, the compiled kernel
    if scorer.name == "amx":
        t0 = time.perf_counter()
        scorer.topk_pyramid(q, gal, grid, 1)
        total = time.perf_counter() - t0
        parts = dict(scorer.stats.get("seconds", {}))
        parts["other (outside the screen's clock)"] = total - sum(parts.values())
        return {"k": k, "scorer": scorer.name, "total_s": total, "parts_s": parts}
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(scorer.topk_pyramid, q, gal, grid, 1)
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, calls, own, cumulative, callers)
    total = sum(v[2] for v in stats.values())
    parts: dict[str, float] = {}
    label = ""
    for name, module, fn, kind in PROFILE_PARTS:
        label = name or label  # an empty label adds to the part above it
        seconds = sum(v[2 if kind == "own" else 3] for key, v in stats.items() if key[0].endswith(module) and key[2] == fn)
        parts[label] = parts.get(label, 0.0) + seconds
    parts["other (gallery operands, bookkeeping)"] = total - sum(parts.values())
    return {"k": k, "scorer": scorer.name, "total_s": total, "parts_s": parts}


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
    """WRN50x2 end to end on real images, per stage: a gallery of ``k`` + 10 normal ELPV cells (mono),
    one defective cell scored with K = ``k``, for each of ``modes`` with the runtime's CPU scorer, and
    concat once more on the fp32 path. Random weights (ImageNet's cannot be fetched here): the speed
    of the backbone does not depend on them; the AMX screen's does a little (docs/speed.md).
    Returns {label: stages}."""
    import torch

    from ..datasets import elpv_cells
    from ..export.backbones import create_backbone
    from ..export.onnx_export import onnx_from_backbone
    from ..runtime.build import gallery_from_images
    from ..runtime.detector import Detector
    from ..runtime.features import backend_from_model
    from ..runtime.gallery import Gallery
    from ..runtime.scoring import scorer_for
    from ..runtime.spade import SpadeConfig

    normal, defective = elpv_cells(0.0, "mono")[: k + 10], elpv_cells(1.0, "mono")[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Path(tmp) / "wrn.onnx"
        onnx_from_backbone(create_backbone("wide_resnet50_2", weights="random"), "wide_resnet50_2", model)
        backend = backend_from_model(model)
        gallery_from_images(backend, normal, Path(tmp) / "g.gallery", holdout=0.0, show_progress=False)
        gallery, out = Gallery.load(Path(tmp) / "g.gallery"), {}
        runs = [(mode, mode, scorer_for("cpu")) for mode in modes]
        if "concat" in modes and runs[0][2].name != "numpy":
            runs.append(("concat, fp32 scorer", "concat", NumpyScorer()))
        for label, mode, scorer in runs:
            det = Detector(backend, gallery, scorer, SpadeConfig(k_image=k, k_gallery=k, mode=mode, score="top-pixels"))
            det.predict(str(defective))  # warm: the gallery keeps its norms, the kernel is compiled
            timings = [det.predict(str(defective)).timings for _ in range(repeats)]
            stages = {s: float(np.median([t[s] for t in timings])) for s in timings[0]}
            stages["total"] = float(np.median([sum(t.values()) for t in timings]))
            stages["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out[label] = {"scorer": scorer.name, "stages": stages,
                          "stats": {key: v for key, v in getattr(scorer, "stats", {}).items() if key != "seconds"}}
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; numpy {m['numpy']}; thread pools: "
             + ", ".join(f"{p['internal_api']} x{p['num_threads']}" for p in m["pools"]), "",
             f"numpy fp32 GEMM ceiling at these shapes: {r['gemm_gflops']:.0f} GFLOP/s", "",
             "Same data for every peer: one test image's concatenated, upsampled pixel features against K gallery "
             "images' (rows of D channels). 'ours' is what the runtime runs (scorer named in the row): it starts from "
             "the stored native-resolution levels and their kept norms (docs/speed.md), upsampling included; 'fp32' "
             "is our exact fp32 path on the same levels; 'fp32, plain' is our blocked product on the peers' rows. "
             "Rates count the naive concatenation's FLOPs (2 Q G D) for every method.", "",
             "| pixel scoring, kappa = 1 | GFLOP (naive) | ours s | fp32 s | fp32, plain s | faiss s | torch s | numpy s | ours vs faiss | ours GFLOP/s | share of GEMM | same neighbours |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["scoring"].items():
        ours = s["ours_levels_s"]
        rate = s["gflop"] / ours
        peer = (f"{s['faiss_s']:.2f} | {s['torch_s']:.2f} | {s['numpy_s']:.2f} | {s['faiss_s'] / ours:.2f}x"
                if "faiss_s" in s else "- | - | - | -")
        same = f"{s['same_neighbours_as_faiss']:.3f}" if "faiss_s" in s else "-"
        lines.append(f"| {name} ({s['shape']}; {s['scorer']}) | {s['gflop']:.0f} | {ours:.2f} | {s['fp32_levels_s']:.2f} | "
                     f"{s['ours_s']:.2f} | {peer} | {rate:.0f} | {rate / r['gemm_gflops']:.0%} | {same} |")
    if "backbones" in r:
        lines += ["", "| backbone | ORT fp32 ms | ORT int8 ms | PyTorch eager ms | ORT fp32 vs PyTorch | int8 / fp32 |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, b in r["backbones"].items():
            lines.append(f"| {name} | {b['ort_fp32_s'] * 1e3:.1f} | {b['ort_int8_s'] * 1e3:.1f} | {b['torch_s'] * 1e3:.1f} | "
                         f"{b['torch_s'] / b['ort_fp32_s']:.2f}x | {b['ort_int8_s'] / b['ort_fp32_s']:.2f} |")
    if "profile" in r:
        pr = r["profile"]
        lines += ["", f"Where concat scoring spends its time, WRN50x2, K = {pr['k']}, scorer {pr['scorer']} "
                  f"({pr['total_s']:.2f} s in all, one run):", "", "| part | s | share | per gallery image ms |",
                  "|---|---:|---:|---:|"]
        for part, sec in pr["parts_s"].items():
            lines.append(f"| {part} | {sec:.2f} | {sec / pr['total_s']:.0%} | {sec / pr['k'] * 1e3:.1f} |")
    if "end_to_end" in r:
        lines += ["", "End to end, WRN50x2 (random weights), K = 50: a gallery of 60 normal ELPV cells, one defective "
                  "cell scored (median of runs):", "", "| mode | scorer | preprocess ms | backbone ms | image kNN ms | "
                  "pixel scoring ms | map ms | total s | peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, e in r["end_to_end"].items():
            st = e["stages"]
            lines.append(f"| {label} | {e['scorer']} | {st['preprocess'] * 1e3:.0f} | {st['backbone'] * 1e3:.0f} | "
                         f"{st['image_knn'] * 1e3:.0f} | {st['pixel_scoring'] * 1e3:.0f} | {st['map'] * 1e3:.0f} | "
                         f"{st['total']:.2f} | {st['peak_rss_mb']:.0f} |")
        lines += ["", "PaDiM's authors measured SPADE at 7.1 s per image on a CPU."]
    return "\n".join(lines) + "\n"
