"""Speed on the CPU, measured side by side in one run: pixel scoring against faiss, torch and plain
numpy; the backbone under ONNX Runtime against PyTorch eager; one image end to end.

Every figure is measured in a fresh Python process of its own (:func:`in_fresh_process`), as a user's
process would run it: no other library's thread pool (faiss's OpenMP, torch's) is loaded beside the
one measured, to spin on the cores it needs. ``python -m spade_edge.bench.speed '{"fn": "machine"}'``
runs one measurement by hand and prints its JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.scoring import NumpyScorer
from ..runtime.scoring.base import GalleryPyramids, concat_upsampled

SHAPES = {  # (h, w, C) per level
    "wide_resnet50_2": [(56, 56, 256), (28, 28, 512), (14, 14, 1024)],
    "efficientnet_lite0": [(56, 56, 24), (28, 28, 40), (14, 14, 112)],
}
TINY_SHAPES = {"tiny": [(12, 12, 40), (6, 6, 80), (3, 3, 160)]}  # `bench speed --shapes tiny`: checks the bench itself

_threads: int | None = None  # the --threads setting, in a measuring process


def in_fresh_process(fn_name: str, threads: int | None = None, **kwargs) -> dict:
    """Run ``fn_name(**kwargs)`` of this module in a new Python interpreter and return its result
    (JSON: a dict, else ``{"value": result}``), with the child's ``pid`` and the native thread pools
    it had loaded by the end (``pools``) under ``process``. ``threads`` is applied there: to every
    pool through OMP_NUM_THREADS and its kin, to BLAS by :func:`~spade_edge.runtime.threads.set_threads`,
    to faiss, torch and ONNX Runtime by their own calls."""
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    call = json.dumps({"fn": fn_name, "threads": threads, "kwargs": kwargs})
    p = subprocess.run([sys.executable, "-m", "spade_edge.bench.speed", call], env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"bench speed: {fn_name} failed in its own process:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def _child(call: str) -> None:
    """The measuring process: run one call, write its JSON to stdout (anything else printed goes to stderr)."""
    global _threads
    from ..runtime.threads import set_threads, thread_info

    c = json.loads(call)
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the measured code prints, native libraries included
    sys.stdout = sys.stderr
    _threads = c.get("threads")
    set_threads(_threads)
    result = globals()[c["fn"]](**c.get("kwargs", {}))
    result = result if isinstance(result, dict) else {"value": result}
    result["process"] = {"pid": os.getpid(), "pools": thread_info()}
    json.dump(result, result_out, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    result_out.close()


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


def cpu_features() -> dict[str, bool]:
    """The instruction sets that choose kernels (AVX2, AVX-512, VNNI, BF16, AMX; NEON dot products,
    SVE on Arm), present or not, as /proc/cpuinfo and CPUID report them (runtime/cpu.py)."""
    from ..runtime.cpu import features

    return features()


def machine() -> dict:
    from ..runtime import cpu
    from ..runtime.scoring import cpu_scorer
    from ..runtime.scoring.fused import LEVEL_ENV
    from ..runtime.threads import thread_info

    return {
        "cpu": cpu.model_name(),
        "arch": platform.machine(),
        "scorer": cpu_scorer().name,
        "level_cap": os.environ.get(LEVEL_ENV) or None,
        "features": cpu_features(),
        "int8_kernel": cpu.int8_kernel()[0],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pools": thread_info(),
    }


def kept_norms(images: list, grid: tuple[int, int]) -> GalleryPyramids:
    """Gallery images (lists of level maps) as the view a scorer gets from a loaded gallery
    (``Gallery.pyramid_view``): their upsampled squared norms made once and kept."""
    return GalleryPyramids.of(images, grid, keep_norms=True)


OURS, PEERS = ("ours", "fp32", "fp32_plain"), ("numpy", "faiss", "torch")
SCORING_PARTS = OURS + PEERS  # each measured in a process of its own


def scoring_part(part: str, shapes: list, k: int, repeats: int, seed: int = 0) -> dict:
    """One method of :func:`scoring` on its data (the same for every part: made from ``seed``):
    ``{"<part>_s": median seconds, "neighbours": each query cell's nearest gallery row}``, and for
    'ours' the scorer's name and stats. 'ours' and 'fp32' start from the stored levels and their kept
    norms; 'fp32_plain' and the peers get the concatenated, upsampled rows."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(s) for s in shapes]
    grid = shapes[0][:2]
    q = [rng.random(s, np.float32) for s in shapes]
    gal = [[rng.random(s, np.float32) for s in shapes] for _ in range(k)]
    out: dict[str, Any] = {}
    if part in ("ours", "fp32"):
        from ..runtime.scoring import cpu_scorer

        scorer = cpu_scorer() if part == "ours" else NumpyScorer()
        kept = kept_norms(gal, grid)  # what the runtime does: levels stored at native resolution, their norms kept

        def fn():
            return scorer.topk_pyramid(q, kept, grid, 1).indices[:, 0]

        if part == "ours":
            out["scorer"] = scorer.name
    else:
        qx = concat_upsampled(q, grid)
        gx = np.concatenate([concat_upsampled(g, grid) for g in gal])
        del gal
        if part == "fp32_plain":

            def fn():
                return NumpyScorer().topk(qx, [gx], 1).indices[:, 0]
        elif part == "numpy":

            def fn():  # the textbook expansion over the whole gallery at once
                return ((qx**2).sum(1)[:, None] - 2 * qx @ gx.T + (gx**2).sum(1)[None, :]).argmin(1)
        elif part == "faiss":
            import faiss

            if _threads:
                faiss.omp_set_num_threads(_threads)
            index = faiss.IndexFlatL2(qx.shape[1])
            index.add(gx)

            def fn():
                return index.search(qx, 1)[1][:, 0]
        elif part == "torch":
            import torch

            if _threads:
                torch.set_num_threads(_threads)
            tq, tg = torch.from_numpy(qx), torch.from_numpy(gx)

            def fn():
                return torch.cdist(tq, tg).topk(1, largest=False).indices[:, 0].numpy()
        else:
            raise ValueError(f"unknown scoring part {part!r}; choose from {SCORING_PARTS}")
    out["neighbours"] = fn().tolist()  # also the warm-up: threads, caches, the compiled kernel
    out[f"{part}_s"] = median_time(fn, repeats)
    if part == "ours":  # what the last search did, by the scorer's own account: which path ran
        out["stats"] = {key: v for key, v in scorer.stats.items() if key != "seconds"}
    return out


def scoring(
    backbone: str,
    k: int,
    repeats: int,
    peers: bool = True,
    seed: int = 0,
    threads: int | None = None,
    shapes: list | None = None,
) -> dict:
    """One test image against ``k`` gallery images at ``backbone``'s concat shapes, kappa = 1: the
    runtime's CPU scorer (``scorer``: AMX where the CPU has it), our fp32 path, and the peers, each
    in a fresh process (:func:`scoring_part`)."""
    shapes = shapes or SHAPES[backbone]
    p, d = shapes[0][0] * shapes[0][1], sum(s[2] for s in shapes)
    flops = 2.0 * p * p * k * d  # the naive concatenation's count, for every method
    parts = {
        part: in_fresh_process("scoring_part", threads, part=part, shapes=shapes, k=k, repeats=repeats, seed=seed)
        for part in (SCORING_PARTS if peers else OURS)
    }
    same = {part: np.array(r.pop("neighbours")) for part, r in parts.items()}
    ours = parts["ours"]
    out = {
        "shape": f"Q={p} G={k}x{p} D={d}",
        "gflop": flops / 1e9,
        "scorer": ours["scorer"],
        "ours_levels_s": ours["ours_s"],
        "ours_stats": ours["stats"],
        "fp32_levels_s": parts["fp32"]["fp32_s"],
        "same_neighbours_as_fp32": float((same["fp32"] == same["ours"]).mean()),
        "ours_s": parts["fp32_plain"]["fp32_plain_s"],
    }
    if peers:
        out.update({f"{peer}_s": parts[peer][f"{peer}_s"] for peer in PEERS})
        out["same_neighbours_as_faiss"] = float(
            min((same["faiss"] == same["fp32_plain"]).mean(), (same["faiss"] == same["ours"]).mean())
        )
    out["processes"] = {part: r["process"] for part, r in parts.items()}
    return out


STORAGES = ("fp32", "default")  # per-level rows: a full fp32 gallery, and `gallery build`'s default storage
PER_LEVEL_PARTS = ("ours", "fp32", "faiss")


def level_gallery(shapes: list, k: int, storage: str, seed: int = 0):
    """A per-level gallery of ``k`` random images (a :class:`~spade_edge.runtime.gallery.Gallery`
    holding only pixel levels), stored as extracted ('fp32') or with ``Storage()``, the default of
    `gallery build` (int8, a coreset of a fifth of each image's cells); and the query's levels as rows."""
    from ..runtime.build import encode_level
    from ..runtime.codec import Storage, fit_codec
    from ..runtime.gallery import Gallery, LevelStore

    rng = np.random.default_rng(seed)
    st = Storage.exact() if storage == "fp32" else Storage()
    query, levels = [], {}
    for i, shape in enumerate(shapes):
        h, w, c = shape
        query.append(rng.random((h * w, c), np.float32))
        maps = [rng.random(shape, np.float32) for _ in range(k)]
        codec = fit_codec(np.concatenate([m.reshape(-1, c) for m in maps]), st)
        data, offsets, yx = encode_level(maps, codec, st)
        levels[f"l{i}"] = LevelStore(data, (h, w), codec, offsets, yx)
    gallery = Gallery([str(j) for j in range(k)], np.zeros((k, 1), np.float32), levels, {"storage": st.to_dict()})
    return query, gallery


def per_level_part(part: str, shapes: list, k: int, storage: str, repeats: int, seed: int = 0) -> dict:
    """One method of :func:`per_level`: every level's query rows against that level of ``k`` gallery
    images (kappa = 1), as the per-level mode scores a test image. 'ours' and 'fp32' (NumpyScorer) read
    the gallery's level views (decoded image by image, norms kept once made); faiss gets the decoded rows."""
    query, gallery = level_gallery([tuple(s) for s in shapes], k, storage, seed)
    names = list(gallery.levels)
    views = [gallery.level_view(name, range(k)) for name in names]
    out: dict[str, Any] = {"rows": int(sum(v.sizes.sum() for v in views))}
    if part in ("ours", "fp32"):
        from ..runtime.scoring import cpu_scorer

        scorer = cpu_scorer() if part == "ours" else NumpyScorer()
        paths: list[str | None] = []

        def fn():
            found = []
            paths.clear()
            for q, view in zip(query, views):
                found.append(scorer.topk(q, view, 1).indices[:, 0])
                paths.append(scorer.stats.get("path"))
            return np.concatenate(found)

        if part == "ours":
            out["scorer"] = scorer.name
    elif part == "faiss":
        import faiss

        if _threads:
            faiss.omp_set_num_threads(_threads)
        indexes = []
        for view in views:
            index = faiss.IndexFlatL2(view[0].shape[1])
            index.add(np.ascontiguousarray(np.concatenate([view[j] for j in range(len(view))]), np.float32))
            indexes.append(index)

        def fn():
            return np.concatenate([index.search(q, 1)[1][:, 0] for q, index in zip(query, indexes)])
    else:
        raise ValueError(f"unknown per-level part {part!r}; choose from {PER_LEVEL_PARTS}")
    out["neighbours"] = fn().tolist()
    out[f"{part}_s"] = median_time(fn, repeats)
    if part == "ours":
        out["paths"] = paths
    return out


def per_level(backbone: str, k: int, storage: str, repeats: int, threads: int | None = None, seed: int = 0) -> dict:
    """Per-level pixel scoring of one test image against ``k`` gallery images at ``backbone``'s
    shapes, gallery stored as ``storage`` (:data:`STORAGES`): ours, NumpyScorer and faiss, each in a
    fresh process."""
    shapes = SHAPES[backbone]
    parts = {
        part: in_fresh_process(
            "per_level_part", threads, part=part, shapes=shapes, k=k, storage=storage, repeats=repeats, seed=seed
        )
        for part in PER_LEVEL_PARTS
    }
    same = {part: np.array(r.pop("neighbours")) for part, r in parts.items()}
    return {
        "storage": storage,
        "rows": parts["ours"]["rows"],
        "scorer": parts["ours"]["scorer"],
        "paths": parts["ours"]["paths"],
        "ours_s": parts["ours"]["ours_s"],
        "fp32_s": parts["fp32"]["fp32_s"],
        "faiss_s": parts["faiss"]["faiss_s"],
        "same_neighbours_as_faiss": float(
            min((same["faiss"] == same["ours"]).mean(), (same["fp32"] == same["ours"]).mean())
        ),
        "processes": {part: r["process"] for part, r in parts.items()},
    }


# where the concatenated-pyramid scoring spends its time on the fp32 path: (label, module, function,
# own or cumulative time); none of them calls another, so their times add up
PROFILE_PARTS = (
    ("BLAS products, fine and coarse (8.1 GFLOP per gallery image)", "blas.py", "_call", "own"),
    ("native products and their query-side upsampling", "pyramid.py", "coarse_products", "cumulative"),
    ("slab operands (fine rows scaled, norms placed)", "pyramid.py", "__call__", "own"),
    ("selection (smallest per slab, running candidates)", "base.py", "smallest", "cumulative"),
    ("", "base.py", "add", "cumulative"),
    ("exact re-computation of the candidates that may belong", "pyramid.py", "exact_distances", "cumulative"),
    ("", "base.py", "concat_upsampled", "cumulative"),  # the query's upsampled rows it compares with
    ("", "base.py", "may_belong", "cumulative"),
)
OTHER = "other (not in a part above)"


def profile_concat(k: int = 50, seed: int = 0, backbone: str = "wide_resnet50_2", shapes: list | None = None) -> dict:
    """Where one concatenated-pyramid scoring (WRN50x2's shapes unless told) against ``k`` images
    spends its time, on the runtime's CPU scorer. ``total_s``: the wall clock of the run; ``parts_s``:
    the AMX scorer's own clock by part, or on the fp32 path cProfile's by part (:data:`PROFILE_PARTS`),
    each measured, and :data:`OTHER`, what the total leaves (the profile's gaps: small when the parts
    name where the time goes). ``path``: the path that ran, by the scorer's own stats."""
    from ..runtime.scoring import cpu_scorer

    rng = np.random.default_rng(seed)
    shapes = [tuple(s) for s in shapes or SHAPES[backbone]]
    grid = shapes[0][:2]
    q = [rng.random(s, np.float32) for s in shapes]
    gal = kept_norms([[rng.random(s, np.float32) for s in shapes] for _ in range(k)], grid)
    scorer = cpu_scorer()
    scorer.topk_pyramid(q, kept_norms(gal[:2], grid), grid, 1)  # warm: threads, caches, the compiled kernel
    res = {"k": k, "backbone": backbone, "scorer": scorer.name}
    if "seconds" in scorer.stats:  # a scorer that keeps its own clock (the AMX screen, the fused kernels)
        t0 = time.perf_counter()
        scorer.topk_pyramid(q, gal, grid, 1)
        total = time.perf_counter() - t0
        parts = dict(scorer.stats.get("seconds", {}))
    else:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(scorer.topk_pyramid, q, gal, grid, 1)
        total = time.perf_counter() - t0
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]  # not in typeshed's pstats; (file, line, function) -> (calls, calls, own, cumulative, callers)
        parts = {}
        label = ""
        for name, module, fn, kind in PROFILE_PARTS:
            label = name or label  # an empty label adds to the part above it
            seconds = sum(
                v[2 if kind == "own" else 3] for key, v in stats.items() if key[0].endswith(module) and key[2] == fn
            )
            parts[label] = parts.get(label, 0.0) + seconds
    parts[OTHER] = total - sum(parts.values())
    return {**res, "path": scorer.stats.get("path"), "total_s": total, "parts_s": parts}


def export_backbone(name: str, folder: str) -> dict:
    """``name`` (seeded random or packaged weights) exported to ONNX fp32 and int8 in ``folder``."""
    import warnings

    import torch
    from PIL import Image

    from ..calibration.int8 import Int8Options, int8_from_onnx
    from ..export.backbones import create_backbone
    from ..export.onnx_export import onnx_from_backbone

    torch.manual_seed(0)
    fp32, int8, calib = (Path(folder) / f"{name}{ext}" for ext in (".onnx", ".int8.onnx", "-calib"))
    onnx_from_backbone(create_backbone(name, weights="random" if name == "wide_resnet50_2" else None), name, fp32)
    calib.mkdir(exist_ok=True)
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            calib / f"{i}.png"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8_from_onnx(fp32, sorted(calib.iterdir()), int8, Int8Options(), show_progress=False)
    return {"fp32": str(fp32), "int8": str(int8)}


def backbone_time(batches: list, repeats: int, model: str | None = None, torch_name: str | None = None) -> dict:
    """Median seconds per batch size of one backbone: the ONNX ``model`` under ONNX Runtime, or
    ``torch_name`` in PyTorch eager (with the same uint8 input and preprocessing)."""
    xs = [np.random.default_rng(b).integers(0, 256, (b, 224, 224, 3), dtype=np.uint8) for b in batches]
    mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if model:
        from ..runtime.features import backend_from_model

        be = backend_from_model(model, threads=_threads)
        fns = [lambda x=x: be(x) for x in xs]
    else:
        import torch

        from ..export.backbones import create_backbone
        from ..export.onnx_export import WithPreprocess

        if _threads:
            torch.set_num_threads(_threads)
        torch.manual_seed(0)
        if torch_name is None:
            raise ValueError("backbone_time needs model or torch_name")
        net = create_backbone(torch_name, weights="random" if torch_name == "wide_resnet50_2" else None)
        wrapper = WithPreprocess(net, net.feature_info).eval()
        fns, mode = [lambda tx=torch.from_numpy(x): wrapper(tx) for x in xs], torch.inference_mode()
    seconds = []
    with mode:
        for fn in fns:
            fn()
            seconds.append(median_time(fn, repeats))
    return {"seconds": seconds}


def backbones(repeats: int, batches=(1, 8), threads: int | None = None) -> dict:
    """ONNX Runtime fp32 and int8 against PyTorch eager, per backbone and batch size, each in a fresh process."""
    res, batches = {}, list(batches)
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHAPES:
            files = in_fresh_process("export_backbone", threads, name=name, folder=tmp)
            times = {
                label: in_fresh_process("backbone_time", threads, batches=batches, repeats=repeats, **how)["seconds"]
                for label, how in (
                    ("ort_fp32_s", {"model": files["fp32"]}),
                    ("ort_int8_s", {"model": files["int8"]}),
                    ("torch_s", {"torch_name": name}),
                )
            }
            for i, b in enumerate(batches):
                res[f"{name} batch {b}"] = {label: t[i] for label, t in times.items()}
    return res


def end_to_end_files(folder: str, k: int) -> dict:
    """WRN50x2 (random weights: ImageNet's cannot be fetched here) exported to ONNX in ``folder``, and
    a gallery of ``k`` + 10 normal ELPV cells (mono) built with it; one defective cell to score."""
    import torch

    from ..datasets import elpv_cells
    from ..export.backbones import create_backbone
    from ..export.onnx_export import onnx_from_backbone
    from ..runtime.build import gallery_from_images
    from ..runtime.codec import Storage
    from ..runtime.features import backend_from_model

    normal, defective = elpv_cells(0.0, "mono")[: k + 10], elpv_cells(1.0, "mono")[0]
    torch.manual_seed(0)
    model, gallery = Path(folder) / "wrn.onnx", Path(folder) / "g.gallery"
    onnx_from_backbone(create_backbone("wide_resnet50_2", weights="random"), "wide_resnet50_2", model)
    # stored as extracted (fp32, every pixel): both modes score the same gallery, and the figures compare
    # with the peers' (the default int8 coreset scores a fifth of the rows, docs/results.md)
    gallery_from_images(
        backend_from_model(model, threads=_threads),
        normal,
        gallery,
        holdout=0.0,
        show_progress=False,
        storage=Storage.exact(),
    )
    return {"model": str(model), "gallery": str(gallery), "image": str(defective)}


def standalone_predict(
    model: str, gallery: str, image: str, k: int, mode: str, repeats: int, fp32: bool = False
) -> dict:
    """What ``spade-edge infer`` does, in this (fresh) process: load the model and the gallery, score
    ``image`` with K = ``k`` in ``mode`` (the runtime's CPU scorer, or the fp32 path); then
    ``repeats`` more times. Returns the stages' median over the repeats (``stages``, with ``total``
    and this process's peak RSS), the first prediction's (``first``) and the loading's seconds."""
    from ..runtime.detector import Detector

    t0 = time.perf_counter()
    det = Detector.load(
        model, gallery, device="cpu", threads=_threads, k_image=k, k_gallery=k, mode=mode, score="top-pixels"
    )
    if fp32:
        det.scorer = NumpyScorer()
    load = time.perf_counter() - t0
    first = det.predict(image).timings  # the gallery's norms made, the kernel loaded: what one `infer` pays
    timings = [det.predict(image).timings for _ in range(repeats)]
    stages = {s: float(np.median([t[s] for t in timings])) for s in timings[0]}
    stages["total"] = float(np.median([sum(t.values()) for t in timings]))
    stages["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "scorer": det.scorer.name,
        "stages": stages,
        "first": {**first, "total": sum(first.values())},
        "load_s": load,
        "stats": {key: v for key, v in getattr(det.scorer, "stats", {}).items() if key != "seconds"},
    }


def end_to_end(
    k: int = 50, repeats: int = 3, modes: tuple[str, ...] = ("concat", "per-level"), threads: int | None = None
) -> dict:
    """WRN50x2 end to end on real images, per stage: the model and a gallery of ``k`` + 10 normal
    ELPV cells made in one process (:func:`end_to_end_files`), then one defective cell scored with
    K = ``k`` by a fresh process per row (:func:`standalone_predict`), for each of ``modes`` with the
    runtime's CPU scorer, and concat once more on the fp32 path (where that is not the CPU scorer).
    Random weights: the speed of the backbone does not depend on them; the AMX screen's does a
    little (docs/speed.md). Returns {label: stages}."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = in_fresh_process("end_to_end_files", threads, folder=tmp, k=k)
        files.pop("process")
        for mode in modes:
            out[mode] = in_fresh_process("standalone_predict", threads, k=k, mode=mode, repeats=repeats, **files)
        if "concat" in modes and out["concat"]["scorer"] != "numpy":
            out["concat, fp32 scorer"] = in_fresh_process(
                "standalone_predict", threads, k=k, mode="concat", repeats=repeats, fp32=True, **files
            )
    return out


LEVEL_ENV_NOTE = (
    "kernel level capped by SPADE_EDGE_CPU_LEVEL={cap}: these are the {cap} kernels run on this CPU, "
    "not a measurement of a CPU that has only {cap}"
)


def markdown(r: dict) -> str:
    m = r["machine"]
    flags = m.get("features", {})
    threads = r.get("threads") or "each library's default"
    lines = [
        f"Machine: {m['cpu']} ({m.get('arch', '?')}), {m['cores']} cores; numpy {m['numpy']}; thread pools: "
        + ", ".join(f"{p['internal_api']} x{p['num_threads']}" for p in m["pools"]),
        "Instruction sets: "
        + (" ".join(f for f, on in flags.items() if on) or "-")
        + (f" (not: {' '.join(f for f, on in flags.items() if not on)})" if not all(flags.values()) else "")
        + (f"; ONNX Runtime INT8 kernel: {m['int8_kernel']}" if "int8_kernel" in m else ""),
        f"CPU scorer: {m.get('scorer', '?')}"
        + (f" ({LEVEL_ENV_NOTE.format(cap=m['level_cap'])})" if m.get("level_cap") else ""),
        "",
        f"Every figure was measured in a fresh Python process of its own (threads: {threads}): no other "
        "library's thread pool in it.",
        "",
        f"numpy fp32 GEMM ceiling at these shapes: {r['gemm_gflops']:.0f} GFLOP/s",
        "",
        "Same data for every peer: one test image's concatenated, upsampled pixel features against K gallery "
        "images' (rows of D channels). 'ours' is what the runtime runs (scorer named in the row): it starts from "
        "the stored native-resolution levels and their kept norms (docs/speed.md), upsampling included; 'fp32' "
        "is our exact fp32 path on the same levels; 'fp32, plain' is our blocked product on the peers' rows. "
        "Rates count the naive concatenation's FLOPs (2 Q G D) for every method.",
        "",
        "| pixel scoring, kappa = 1 | GFLOP (naive) | ours s | fp32 s | fp32, plain s | faiss s | torch s | numpy s | ours vs faiss | ours GFLOP/s | share of GEMM | same neighbours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in r["scoring"].items():
        ours = s["ours_levels_s"]
        rate = s["gflop"] / ours
        peer = (
            f"{s['faiss_s']:.2f} | {s['torch_s']:.2f} | {s['numpy_s']:.2f} | {s['faiss_s'] / ours:.2f}x"
            if "faiss_s" in s
            else "- | - | - | -"
        )
        same = f"{s['same_neighbours_as_faiss']:.3f}" if "faiss_s" in s else "-"
        lines.append(
            f"| {name} ({s['shape']}; {s['scorer']}) | {s['gflop']:.0f} | {ours:.2f} | {s['fp32_levels_s']:.2f} | "
            f"{s['ours_s']:.2f} | {peer} | {rate:.0f} | {rate / r['gemm_gflops']:.0%} | {same} |"
        )
    if r.get("per_level"):
        lines += [
            "",
            "Per-level pixel scoring, kappa = 1: each level's query rows against that level of K gallery images "
            "(random features), the gallery stored as extracted (fp32) or with `gallery build`'s defaults (int8, "
            "a coreset of a fifth of the cells); faiss searches the decoded rows.",
            "",
            "| per-level pixel scoring | gallery rows | ours s | fp32 (numpy) s | faiss s | ours vs faiss | ours vs numpy | paths | same neighbours |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for name, s in r["per_level"].items():
            lines.append(
                f"| {name} ({s['scorer']}) | {s['rows']} | {s['ours_s']:.3f} | {s['fp32_s']:.3f} | {s['faiss_s']:.3f} | "
                f"{s['faiss_s'] / s['ours_s']:.2f}x | {s['fp32_s'] / s['ours_s']:.2f}x | {'; '.join(map(str, s['paths']))} | "
                f"{s['same_neighbours_as_faiss']:.3f} |"
            )
    if "backbones" in r:
        lines += [
            "",
            "| backbone | ORT fp32 ms | ORT int8 ms | PyTorch eager ms | ORT fp32 vs PyTorch | int8 / fp32 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, b in r["backbones"].items():
            lines.append(
                f"| {name} | {b['ort_fp32_s'] * 1e3:.1f} | {b['ort_int8_s'] * 1e3:.1f} | {b['torch_s'] * 1e3:.1f} | "
                f"{b['torch_s'] / b['ort_fp32_s']:.2f}x | {b['ort_int8_s'] / b['ort_fp32_s']:.2f} |"
            )
    if "profile" in r:
        pr = r["profile"]
        lines += [
            "",
            f"Where concat scoring spends its time, {pr.get('backbone', 'wide_resnet50_2')}, K = {pr['k']}, "
            f"scorer {pr['scorer']} ({pr['total_s']:.2f} s in all, one run):",
            "",
            "| part | s | share | per gallery image ms |",
            "|---|---:|---:|---:|",
        ]
        for part, sec in pr["parts_s"].items():
            lines.append(f"| {part} | {sec:.2f} | {sec / pr['total_s']:.0%} | {sec / pr['k'] * 1e3:.1f} |")
    if "end_to_end" in r:
        lines += [
            "",
            "End to end, WRN50x2 (random weights), K = 50: a gallery of 60 normal ELPV cells, one defective "
            "cell scored. Each row is a standalone prediction: a fresh process loads the model and the gallery "
            "as `spade-edge infer` does, predicts once (first predict: the gallery's norms made), then again "
            "(stages and total: median of those runs):",
            "",
            "| mode | scorer | preprocess ms | backbone ms | image kNN ms | pixel scoring ms | map ms | total s | "
            "first predict s | load s | peak RSS MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, e in r["end_to_end"].items():
            st = e["stages"]
            lines.append(
                f"| {label} | {e['scorer']} | {st['preprocess'] * 1e3:.0f} | {st['backbone'] * 1e3:.0f} | "
                f"{st['image_knn'] * 1e3:.0f} | {st['pixel_scoring'] * 1e3:.0f} | {st['map'] * 1e3:.0f} | "
                f"{st['total']:.2f} | {e['first']['total']:.2f} | {e['load_s']:.2f} | {st['peak_rss_mb']:.0f} |"
            )
        lines += ["", "PaDiM's authors measured SPADE at 7.1 s per image on a CPU."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _child(sys.argv[1])
