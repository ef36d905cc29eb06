"""GPU pixel scoring measured side by side in one run: the runtime's ``CudaScorer`` against what a
user would write with torch on the same GPU and the same data (matmul expansion + ``torch.topk``,
fp32 and fp16), with the device's fp16 GEMM rate measured beside them; one image end to end
(backbone through verdict) where a model can be made. The on-paper Jetson estimate is
:mod:`.gpu_paper`.

**One process, not one per figure** (``bench speed`` starts a fresh process per figure so that no
other library's CPU thread pool spins beside the one measured). Here the measured work runs on the
GPU and is timed between device synchronisations; the CPU only launches it. A fresh process per
figure would pay CUDA context creation, CuPy's kernel load and torch's CUDA initialisation (seconds
each) dozens of times, past the ``--quick`` budget, for no change in what is timed. What one
process could share between figures is device memory: torch's caching allocator and CuPy's pool
are emptied after every row, and every figure is a median after a warm-up.

**Stand-ins.** With the CuPy stand-in of ``tests/standins`` (``cupy.STANDIN``) the same road runs on
the CPU: the scorer on numpy, the torch peer on the CPU. The output then says so on every line that
names the device, and its times are the CPU's, not a GPU's.

``spade-edge bench gpu`` prints :func:`markdown`; ``--paper`` prints :func:`.gpu_paper.paper_markdown`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import ModelError, SpadeError
from ..runtime.scoring.base import concat_upsampled, merge
from .speed import SHAPES, TINY_SHAPES

NO_GPU_EXIT = 3  # exit status of `bench gpu` where no GPU (or no CuPy, or no torch peer) is usable
KAPPA = 1  # the runtime's default (SpadeConfig.kappa)
CHECK_ROWS = 256  # query rows compared with the float64 search (all of them where fewer)


class NoGpuError(SpadeError):
    """What ``bench gpu`` needs is missing: the message names the piece."""


# -- the bench's plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measured row: a backbone's shapes, the mode (concat or per-level) and K gallery images."""

    backbone: str
    mode: str
    k: int

    @property
    def label(self) -> str:
        return f"{self.backbone} {self.mode} K={self.k}"


def plan(quick: bool = False, shapes: str = "real") -> list[Row]:
    """The rows to measure. Full: WRN50x2 concat and per-level at K = 5 and 50, Lite0 concat at K = 5
    and 50. ``quick``: WRN50x2 concat K = 50 (the issue's target), WRN50x2 per-level K = 5, Lite0
    concat K = 5. ``shapes='tiny'``: made-up small shapes (checks the bench itself in seconds)."""
    if shapes == "tiny":
        return [Row("tiny", "concat", 5), Row("tiny", "per-level", 5)] + ([] if quick else [Row("tiny", "concat", 8)])
    if quick:
        return [
            Row("wide_resnet50_2", "concat", 50),
            Row("wide_resnet50_2", "per-level", 5),
            Row("efficientnet_lite0", "concat", 5),
        ]
    return [
        Row(b, m, k)
        for b, modes in (("wide_resnet50_2", ("concat", "per-level")), ("efficientnet_lite0", ("concat",)))
        for m in modes
        for k in (5, 50)
    ]


def shapes_of(backbone: str) -> list[tuple[int, int, int]]:
    return [tuple(s) for s in {**SHAPES, **TINY_SHAPES}[backbone]]  # type: ignore[misc]


def naive_flops(levels: list[tuple[int, int, int]], k: int, mode: str) -> float:
    """The FLOPs every method is credited with (as ``bench speed``): concat, the naive product of the
    upsampled concatenation, 2 P (K P) D; per-level, each level's own product, sum of 2 n_l (K n_l) C_l."""
    if mode == "concat":
        p = levels[0][0] * levels[0][1]
        return 2.0 * p * k * p * sum(c for _, _, c in levels)
    return float(sum(2.0 * (h * w) * k * (h * w) * c for h, w, c in levels))


# -- the machine --------------------------------------------------------------------------------------


@dataclass
class Bench:
    """CuPy, torch and the device they share; ``standin``: CuPy is tests/standins' (numpy), and the
    torch peer then runs on the CPU."""

    cp: Any
    torch: Any
    device_id: int
    standin: bool
    peer: Any  # torch.device of the peer
    notes: list = field(default_factory=list)

    def sync(self) -> None:
        self.cp.cuda.Device(self.device_id).synchronize()
        if self.peer.type == "cuda":
            self.torch.cuda.synchronize(self.peer)

    def free(self) -> None:
        """Give back what the pools hold between rows, so that no row runs in another's leftovers."""
        pool = getattr(self.cp, "get_default_memory_pool", None)
        if pool is not None:
            pool().free_all_blocks()
        if self.peer.type == "cuda":
            self.torch.cuda.empty_cache()


def open_bench(device_id: int = 0) -> Bench:
    """CuPy on CUDA device ``device_id`` and torch on the same device, or :class:`NoGpuError` naming
    what is missing. Never falls back to the CPU (the stand-in CuPy is the only way to run it there)."""
    import importlib.util

    from ..runtime.gpu import cupy_usable

    ok, why = cupy_usable(device_id)
    if not ok:
        raise NoGpuError(f"bench gpu needs an NVIDIA GPU that CuPy can use: {why}. No figure was measured.")
    if importlib.util.find_spec("torch") is None:
        raise NoGpuError(
            "bench gpu needs torch for the peer it measures against (torch.matmul + topk on the same GPU): "
            "it is not installed (pip install torch, a CUDA build). No figure was measured."
        )
    import cupy
    import torch

    standin = bool(getattr(cupy, "STANDIN", False))
    if standin:
        peer = torch.device("cpu")
    else:
        if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
            raise NoGpuError(
                f"bench gpu runs the torch peer on the same GPU, but this torch ({torch.__version__}, CUDA "
                f"{torch.version.cuda}) sees no CUDA device {device_id}: install a CUDA build of torch. "
                "No figure was measured."
            )
        peer = torch.device("cuda", device_id)
    return Bench(cupy, torch, int(device_id), standin, peer)


def _version(number: int | None) -> str:
    """CUDA's version integers (12060) as 12.6."""
    return "?" if number is None else f"{number // 1000}.{number % 1000 // 10}"


def device_info(b: Bench) -> dict:
    """Name, compute capability, SMs and memory of the device; driver, CUDA runtime, CuPy and torch
    versions; the CPU's model and instruction sets (runtime/cpu.py)."""
    from ..runtime import cpu

    rt = b.cp.cuda.runtime
    props = rt.getDeviceProperties(b.device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])

    def ask(fn: str) -> int | None:
        call = getattr(rt, fn, None)  # the stand-in has no driver to ask
        try:
            return None if call is None else int(call())
        except Exception:  # noqa: BLE001 - a version we cannot read is printed as '?'
            return None

    torch = b.torch
    return {
        "device": f"stand-in (numpy): {name}" if b.standin else name,
        "device_id": b.device_id,
        "standin": b.standin,
        "compute_capability": f"{props['major']}.{props['minor']}",
        "sms": props.get("multiProcessorCount"),
        "memory_gib": round(props.get("totalGlobalMem", 0) / 2**30, 1),
        "driver": _version(ask("driverGetVersion")),
        "cuda_runtime": _version(ask("runtimeGetVersion")),
        "cupy": getattr(b.cp, "__version__", "?") + (" (stand-in)" if b.standin else ""),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "peer": "stand-in: torch on the CPU" if b.standin else f"torch on {b.peer}",
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cpu": cpu.summary(),
    }


def timed(fn, sync, repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones, each between
    device synchronisations; and the last run's result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def fp16_gemm_rate(b: Bench, n: int, repeats: int = 5) -> float:
    """The device's dense fp16 GEMM rate (TFLOP/s), torch.matmul of two (n x n) fp16 matrices: the
    ceiling the scoring rates are shown against."""
    torch = b.torch
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.rand((n, n), generator=gen).to(b.peer, torch.float16)
    c = torch.rand((n, n), generator=gen).to(b.peer, torch.float16)
    seconds, _ = timed(lambda: a @ c, b.sync, repeats, warmup=2)
    return 2.0 * n**3 / seconds / 1e12


# -- the data and the float64 search -----------------------------------------------------------------


def make_data(levels: list[tuple[int, int, int]], k: int, seed: int = 0) -> tuple[list, list]:
    """A test image's level maps (fp32, as a backbone hands them over) and ``k`` gallery images' (fp16,
    as the gallery stores them for the GPU), every value exact in fp16 so that each method sees the
    same numbers. Gallery image 1 is a copy of image 0: every query cell has exact ties, which a
    search must resolve to the lower gallery index."""
    rng = np.random.default_rng(seed)

    def level(s):
        return rng.random(s, dtype=np.float32).astype(np.float16)

    query = [level(s).astype(np.float32) for s in levels]
    gallery = [[level(s) for s in levels] for _ in range(k)]
    if k >= 2:
        gallery[1] = [x.copy() for x in gallery[0]]
    return query, gallery


class Float64Search:
    """The reference: squared distances in float64 of ``query`` rows to gallery rows added block by
    block; per block the ``kappa`` + 8 nearest by the float64 expansion are re-computed from their
    differences, and the kappa smallest win, ties to the lower gallery index (:func:`.base.merge`)."""

    def __init__(self, query: np.ndarray, kappa: int):
        self.q = np.asarray(query, np.float64)
        self.qn = np.einsum("ij,ij->i", self.q, self.q)
        self.kappa = kappa
        self.d = np.full((len(self.q), kappa), np.inf)
        self.i = np.full((len(self.q), kappa), -1, np.int64)
        self.offset = 0

    def add(self, block: np.ndarray) -> None:
        g = np.asarray(block, np.float64)
        expanded = self.qn[:, None] + np.einsum("ij,ij->i", g, g)[None, :] - 2.0 * self.q @ g.T
        c = min(self.kappa + 8, len(g))
        near = np.argpartition(expanded, c - 1, axis=1)[:, :c]
        diff = self.q[:, None, :] - g[near]
        exact = np.einsum("rcd,rcd->rc", diff, diff)
        self.d, self.i = merge([self.d, exact], [self.i, near + self.offset], self.kappa)
        self.offset += len(g)


def check_rows(p: int, n: int = CHECK_ROWS) -> np.ndarray:
    """Query rows compared with the float64 search: all of them, or ``n`` spread over the grid."""
    return np.arange(p) if p <= n else np.unique(np.linspace(0, p - 1, n).round().astype(np.int64))


def _identical(indices, reference: np.ndarray, rows: np.ndarray) -> float:
    return float((np.asarray(indices)[rows] == reference).all(axis=1).mean())


# -- the methods ---------------------------------------------------------------------------------------


def bench_gallery(gallery: list, levels: list) -> Any:
    """The gallery images' level maps as a loaded :class:`~spade_edge.runtime.gallery.Gallery` holds
    them (dense, fp16 as stored), so that the scorer reads it as the runtime does: through the
    gallery's views, made resident by its ``attach``."""
    from ..runtime.gallery import Gallery

    names = [f"level{i}" for i in range(len(levels))]
    stacks = {n: np.stack([g[i] for g in gallery]) for i, n in enumerate(names)}
    manifest = {"model": {"backbone": "bench", "fingerprint": "sha256:bench"}, "thresholds": {}}
    k = len(gallery)
    return Gallery.from_arrays([f"img{j}" for j in range(k)], np.zeros((k, 1), np.float32), stacks, manifest)


def _ours(b: Bench, query: list, gallery: list, levels: list, mode: str, repeats: int, fused: bool = True) -> dict:
    """CudaScorer on one image, the test image's features already on the device (as the backend
    hands them over) and the gallery attached where the scorer can (``resident``: its views then
    read the device copy): seconds, result indices (one array per level in per-level mode), stats.
    ``fused=False``: every product through memory (the design before the fused kernel)."""
    from ..runtime.scoring.cuda import CudaScorer

    scorer = CudaScorer(device_id=b.device_id, fused=fused)
    grid = levels[0][:2]
    gal = bench_gallery(gallery, levels)
    names, images = list(gal.levels), range(len(gallery))
    attach = getattr(scorer, "attach", None)
    with b.cp.cuda.Device(b.device_id):
        if attach is not None:
            attach(gal)
        if mode == "concat":
            views = [gal.pyramid_view(names, images, grid)]
            qs = [[b.cp.asarray(x) for x in query]]
        else:
            views = [gal.level_view(n, images) for n in names]
            qs = [b.cp.asarray(x.reshape(h * w, c)) for x, (h, w, c) in zip(query, levels)]

        def fn():
            out, stats = [], []
            for q, view in zip(qs, views):
                top = scorer.topk_pyramid(q, view, grid, KAPPA) if mode == "concat" else scorer.topk(q, view, KAPPA)
                out.append(top.indices)
                stats.append(dict(scorer.stats))
            return out, stats

        seconds, (indices, stats) = timed(fn, b.sync, repeats)
    close = getattr(scorer, "close", None)
    if close is not None:
        close()
    launches = [s.get("launches") for s in stats]
    rescored = [s.get("rescored_rows") for s in stats]
    return {
        "s": seconds,
        "indices": indices,
        "resident": attach is not None and all(getattr(v, "source", None) is not None for v in views),
        "path": ",".join(str(s.get("path", "?")) for s in stats),
        "launches": None if None in launches else int(sum(launches)),
        "rescored_rows": None if None in rescored else int(sum(rescored)),
    }


def _torch_peers(b: Bench, queries: list, galleries: list, repeats: int) -> dict:
    """What a user writes in torch, on the same device: the gallery rows resident (fp32, and fp16 for
    the fp16 peer), their squared norms kept, then per search d = |g|^2 - 2 q g^T by one addmm and
    ``topk`` of the smallest; indices brought to the host as ours are. ``queries`` and ``galleries``:
    one (rows, D) query and one (N, D) fp32 gallery per search of an image (3 levels per-level)."""
    torch = b.torch
    out: dict[str, dict] = {}

    def measure(dtype) -> dict:  # its tensors are freed on return, before the next peer's are made
        qs = [torch.from_numpy(q).to(b.peer, dtype) for q in queries]
        gs = [torch.from_numpy(g).to(b.peer, dtype) for g in galleries]
        norms = [(g.float() ** 2).sum(1).to(dtype)[None, :] for g in gs]

        def fn():
            return [
                torch.addmm(n, q, g.T, alpha=-2).topk(KAPPA, dim=1, largest=False).indices.cpu().numpy()
                for q, g, n in zip(qs, gs, norms)
            ]

        seconds, indices = timed(fn, b.sync, repeats)
        return {"s": seconds, "indices": indices}

    for label, dtype in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
        try:
            out[label] = measure(dtype)
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError among others: said, not hidden
            out[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        b.free()
    return out


def measure_row(b: Bench, row: Row, repeats: int, seed: int = 0) -> dict:
    """One row: ours and the torch peers on the same data, the float64 check of ours (and, for
    information, of the peers) on :func:`check_rows`, rates against the naive FLOP count."""
    levels = shapes_of(row.backbone)
    query, gallery = make_data(levels, row.k, seed)
    grid = levels[0][:2]
    ours = _ours(b, query, gallery, levels, row.mode, repeats)
    b.free()
    memory = _ours(b, query, gallery, levels, row.mode, repeats, fused=False)
    b.free()
    # the searches of one image, as rows: the reference's input and the peers'
    if row.mode == "concat":
        searches = [(concat_upsampled(query, grid), [concat_upsampled(g, grid) for g in gallery])]
    else:
        searches = [
            (query[li].reshape(h * w, c), [g[li].reshape(h * w, c).astype(np.float32) for g in gallery])
            for li, (h, w, c) in enumerate(levels)
        ]
    references, picks = [], []
    for q, blocks in searches:
        rows = check_rows(len(q))
        ref = Float64Search(q[rows], KAPPA)
        for block in blocks:
            ref.add(block)
        references.append(ref.i)
        picks.append(rows)

    def identical(indices: list) -> float:
        return min(_identical(ix, ref, rows) for ix, ref, rows in zip(indices, references, picks))

    peers = _torch_peers(b, [q for q, _ in searches], [np.concatenate(blocks) for _, blocks in searches], repeats)
    result = {
        "row": row.label,
        "backbone": row.backbone,
        "mode": row.mode,
        "k": row.k,
        "kappa": KAPPA,
        "shape": " + ".join(f"{h}x{w}x{c}" for h, w, c in levels),
        "gflop": naive_flops(levels, row.k, row.mode) / 1e9,
        "checked_rows": int(sum(len(r) for r in picks)),
        "ours_s": ours["s"],
        "ours_path": ours["path"],
        "ours_resident": ours["resident"],
        "launches": ours["launches"],
        "rescored_rows": ours["rescored_rows"],
        "ours_identical": identical(ours["indices"]),
        "memory_s": memory["s"],
        "memory_path": memory["path"],
        "memory_identical": identical(memory["indices"]),
    }
    for label, r in peers.items():
        if "error" in r:
            result[f"{label}_error"] = r["error"]
        else:
            result[f"{label}_s"] = r["s"]
            result[f"{label}_identical"] = identical(r["indices"])
    return result


# -- end to end ----------------------------------------------------------------------------------------


def e2e_files(folder: str, k: int, backbone: str) -> dict:
    """In a child process (torch and ONNX Runtime side by side have crashed one process here):
    ``backbone`` with random weights (its speed does not depend on them) exported to ONNX in
    ``folder``, ``k`` + 3 images (textured noise around one base: normal parts that differ a little),
    a gallery of the first ``k`` + 2 stored fp16 with every pixel; the last image is the one scored."""
    import torch
    from PIL import Image

    from ..export.backbones import create_backbone
    from ..export.onnx_export import onnx_from_backbone
    from ..runtime.build import gallery_from_images
    from ..runtime.codec import Storage
    from ..runtime.features import backend_from_model

    out = Path(folder)
    torch.manual_seed(0)
    model = out / f"{backbone}.onnx"
    onnx_from_backbone(create_backbone(backbone, weights="random"), backbone, model)
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (256, 256, 3), dtype=np.uint8)
    images = []
    for i in range(k + 3):
        images.append(str(out / f"{i}.png"))
        Image.fromarray(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)).save(images[-1])
    gallery = out / "g.gallery"
    backend = backend_from_model(model)
    try:
        storage = Storage(precision="fp16", coreset=1.0)
        gallery_from_images(backend, images[:-1], gallery, holdout=0.0, show_progress=False, storage=storage)
    finally:
        backend.close()
    return {"model": str(model), "gallery": str(gallery), "image": images[-1]}


def e2e_predict(model: str, gallery: str, image: str, k: int, mode: str, device_id: int, repeats: int) -> dict:
    """In a child process without torch, as ``spade-edge infer`` runs: load on ``cuda:N``, or where this
    ONNX Runtime has no CUDA provider the backbone on the CPU with the CUDA scorer (said in ``where``);
    predict once (``first_s``), then ``repeats`` times (``stages``: their medians, and ``total``)."""
    from ..runtime.detector import Detector
    from ..runtime.scoring.cuda import CudaScorer

    config: dict[str, Any] = {"k_image": k, "k_gallery": k, "mode": mode, "score": "top-pixels"}
    try:
        det = Detector.load(model, gallery, device=f"cuda:{device_id}", **config)
        where = det.device
    except ModelError as exc:
        det = Detector.load(model, gallery, device="cpu", **config)
        det.scorer = CudaScorer(device_id=device_id)
        where = f"backbone: ONNX Runtime on the CPU ({str(exc).splitlines()[0]}); scoring: CudaScorer"
    try:
        first = det.predict(image)
        timings = [det.predict(image).timings for _ in range(repeats)]
    finally:
        det.close()
    stages = {s: float(np.median([t[s] for t in timings])) for s in timings[0]}
    stages["total"] = float(np.median([sum(t.values()) for t in timings]))
    return {"where": where, "stages": stages, "first_s": sum(first.timings.values()), "verdict": first.verdict}


def in_child(fn: str, **kwargs) -> dict:
    """``fn(**kwargs)`` of this module in a new Python process (this one's environment: the same
    stand-ins, if any); its JSON result."""
    call = json.dumps({"fn": fn, "kwargs": kwargs})
    p = subprocess.run([sys.executable, "-m", "spade_edge.bench.gpu", call], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"bench gpu: {fn} failed in its own process:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def end_to_end(
    b: Bench, k: int, repeats: int, modes: tuple[str, ...] = ("concat",), backbone: str = "wide_resnet50_2"
) -> dict:
    """One image end to end, per mode, with K = ``k``: the model and gallery made by :func:`e2e_files`,
    each mode predicted by :func:`e2e_predict`, each in a process of its own. Returns {mode: result},
    or ``{"skipped": why}`` where the packages to export and run a backbone are missing."""
    import importlib.util

    missing = [
        m for m in ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None
    ]
    if missing:
        return {"skipped": f"needs {', '.join(missing)} to export and run a backbone (pip install 'spade-edge[bench]')"}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = in_child("e2e_files", folder=tmp, k=k, backbone=backbone)
        for mode in modes:
            out[mode] = in_child("e2e_predict", **files, k=k, mode=mode, device_id=b.device_id, repeats=repeats)
    return out


# -- the run and its table -----------------------------------------------------------------------------


def run(
    device_id: int = 0,
    quick: bool = False,
    shapes: str = "real",
    repeats: int = 5,
    e2e: bool = True,
    echo=print,
) -> dict:
    """Everything ``bench gpu`` measures, in this process (module docstring: why one process)."""
    b = open_bench(device_id)
    info = device_info(b)
    echo(f"bench gpu on {info['device']} ...")
    gemm_n = 256 if (shapes == "tiny" or b.standin) else 8192
    r: dict[str, Any] = {
        "machine": info,
        "quick": quick,
        "repeats": repeats,
        "gemm_n": gemm_n,
        "fp16_gemm_tflops": fp16_gemm_rate(b, gemm_n),
        "rows": [],
    }
    b.free()
    for row in plan(quick, shapes):
        echo(f"scoring {row.label} ...")
        r["rows"].append(measure_row(b, row, repeats if row.k <= 5 or shapes == "tiny" else max(3, repeats // 2)))
        b.free()
    if e2e:
        echo("end to end ...")
        k = 2 if shapes == "tiny" else 5 if quick else 50
        backbone = "efficientnet_lite0" if shapes == "tiny" else "wide_resnet50_2"  # tiny: the road, in seconds
        modes = ("concat",) if quick or shapes == "tiny" else ("concat", "per-level")
        r["end_to_end"] = {"k": k, "backbone": backbone, **end_to_end(b, k, 3, modes, backbone)}
    return r


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def _memory(row: dict, ours: float) -> str:
    """The same scorer with every product through memory (``fused=False``), beside ours: the fusion's
    gain measured in the same run; '-' where that is the path ours took anyway."""
    s = row.get("memory_s")
    if s is None or row.get("memory_path") == row["ours_path"]:
        return "-"
    return f"{_ms(s)}, {row['memory_identical']:.3f}, {s / ours:.2f}x"


def markdown(r: dict) -> str:
    m = r["machine"]
    standin = m["standin"]
    lines = [
        f"Device: {m['device']} (device {m['device_id']}, compute {m['compute_capability']}, {m['sms']} SMs, "
        f"{m['memory_gib']} GiB); driver {m['driver']}, CUDA runtime {m['cuda_runtime']}; CuPy {m['cupy']}; "
        f"torch {m['torch']} (CUDA {m['torch_cuda']}), peer: {m['peer']}, TF32 {'on' if m['tf32'] else 'off'}",
        f"CPU: {m['cpu']}",
        "",
    ]
    if standin:
        lines += [
            "**Stand-in run**: CuPy is tests/standins' numpy imitation and the torch peer runs on the CPU. "
            "It checks the bench's road; its times are the CPU's, not a GPU's.",
            "",
        ]
    gemm = r["fp16_gemm_tflops"]
    lines += [
        f"fp16 GEMM rate of this device (torch.matmul, {r['gemm_n']}^3, measured in this run): {gemm:.3g} TFLOP/s",
        "",
        "One process for every figure (GPU work timed between device synchronisations; module docstring of "
        "spade_edge/bench/gpu.py: why). Seconds per image: median of the repeats after a warm-up. Same data "
        "for every method (fp16-exact values; gallery image 1 a copy of image 0, so every cell has exact "
        "ties): ours from the stored fp16 levels (made resident by the scorer's attach where it has one), "
        "the torch peers from the upsampled, concatenated rows already on the device, |g|^2 kept "
        "(addmm + topk, indices to the host). Rates count the naive FLOPs (concat: 2 P KP D; per-level: "
        f"each level's own) for every method. kappa = {KAPPA}. 'identical': share of the checked query "
        "rows whose neighbours equal a float64 search's (ties to the lower gallery index).",
        "",
        "| pixel scoring | shapes | GFLOP (naive) | ours ms | torch fp32 ms | torch fp16 ms | vs fp32 | vs fp16 | "
        "ours TFLOP/s | share of fp16 GEMM | launches | rescored rows | identical (ours) | identical (fp32, fp16) "
        "| checked rows | path | ours, products through memory: ms, identical, vs ours |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in r["rows"]:
        ours = row["ours_s"]
        rate = row["gflop"] / ours / 1e3

        def peer(label: str, row=row, ours=ours) -> tuple[str, str, str]:
            s = row.get(f"{label}_s")
            if s is None:
                return "failed", "-", "-"
            return _ms(s), f"{s / ours:.2f}x", f"{row[f'{label}_identical']:.3f}"

        f32, f16 = peer("torch_fp32"), peer("torch_fp16")
        launches = "-" if row["launches"] is None else str(row["launches"])
        rescored = "-" if row["rescored_rows"] is None else str(row["rescored_rows"])
        path = row["ours_path"] + ("" if row["ours_resident"] else "; gallery uploaded per search (not attached)")
        lines.append(
            f"| {row['row']} | {row['shape']} | {row['gflop']:.1f} | {_ms(ours)} | {f32[0]} | {f16[0]} | {f32[1]} | "
            f"{f16[1]} | {rate:.3g} | {rate / gemm:.0%} | {launches} | {rescored} | {row['ours_identical']:.3f} | "
            f"{f32[2]}, {f16[2]} | {row['checked_rows']} | {path} | {_memory(row, ours)} |"
        )
    errors = [f"{row['row']} {k[:-6]}: {v}" for row in r["rows"] for k, v in row.items() if k.endswith("_error")]
    if errors:
        lines += ["", "Peers that failed: " + "; ".join(errors)]
    e2e = r.get("end_to_end")
    if e2e:
        lines += [""]
        if "skipped" in e2e:
            lines.append(f"End to end: not measured ({e2e['skipped']}).")
        else:
            lines += [
                f"End to end, {e2e['backbone']} (random weights), K = {e2e['k']}, gallery stored fp16 with every "
                "pixel, "
                "one image per prediction (median of 3 after a first):",
                "",
                "| mode | where | preprocess ms | backbone ms | image kNN ms | pixel scoring ms | map ms | total ms | "
                "first predict ms |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for mode, e in e2e.items():
                if mode in ("k", "backbone"):
                    continue
                st = e["stages"]
                lines.append(
                    f"| {mode} | {e['where']} | {_ms(st.get('preprocess'))} | {_ms(st.get('backbone'))} | "
                    f"{_ms(st.get('image_knn'))} | {_ms(st.get('pixel_scoring'))} | {_ms(st.get('map'))} | "
                    f"{_ms(st['total'])} | {_ms(e['first_s'])} |"
                )
    return "\n".join(lines) + "\n"


def _child(call: str) -> None:
    """A child process of :func:`in_child`: run the call; its JSON is the last line on stdout (what
    the called code prints goes to stderr)."""
    c = json.loads(call)
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    result = globals()[c["fn"]](**c["kwargs"])
    real_stdout.write(json.dumps(result, default=str) + "\n")
    real_stdout.flush()


if __name__ == "__main__":  # a child process of in_child
    _child(sys.argv[1])
