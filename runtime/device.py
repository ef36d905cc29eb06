"""The one place where a device name becomes code: (model file, device) -> feature backend, pixel
scorer, and a sentence saying what was chosen and why.

Devices: ``cpu``; ``cuda[:N]`` (ONNX Runtime's CUDA provider, or a TensorRT engine, on GPU N);
``tensorrt[:N]`` (a TensorRT engine, or ONNX Runtime's TensorRT provider); ``auto`` (the best that
actually works here, with what it fell back from recorded). A ``.engine``/``.plan`` file always runs
on native TensorRT. The scorer follows the features: on the GPU where CuPy is installed (the CUDA
scorer), else on the CPU, which ``why`` then says. A device asked for by name is obtained or refused
with a clear error, never silently replaced by the CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .features.base import FeatureBackend
from .gpu import cupy_usable, gpu_available
from .scoring import PixelScorer, cpu_scorer

DEVICES = ("auto", "cpu", "cuda", "tensorrt")  # each GPU device also as 'cuda:N' / 'tensorrt:N'
ENGINE_SUFFIXES = (".engine", ".plan")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class Placement:
    """Where a model runs: its feature backend, its pixel scorer, and why."""

    backend: FeatureBackend
    scorer: PixelScorer
    device: str  # what runs the features: 'cpu', 'cuda' or 'tensorrt' (':N' for GPU N)
    why: str  # one sentence for the CLI, the log and /health
    fallback: str | None = None  # with 'auto': what was not obtained, and why


def parse_device(spec: str) -> tuple[str, int]:
    """'cuda:1' -> ('cuda', 1); 'cpu' -> ('cpu', 0). ValueError naming the accepted forms."""
    kind, _, index = str(spec).partition(":")
    ok = kind in DEVICES and (not index or (kind in ("cuda", "tensorrt") and index.isdigit()))
    if not ok:
        raise ValueError(f"device must be one of auto, cpu, cuda[:N], tensorrt[:N]; got {spec!r}")
    return kind, int(index or 0)


def is_engine(model: str | os.PathLike) -> bool:
    return Path(model).suffix.lower() in ENGINE_SUFFIXES


def ort_providers() -> list[str]:
    """The execution providers this onnxruntime was built with (not proof that they run)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime

    return onnxruntime.get_available_providers()


def provider_list(
    kind: str, device_id: int = 0, fp16: bool = False, cache_dir: str | os.PathLike | None = None
) -> list:
    """ONNX Runtime providers for ``kind``, best first, the CPU last for nodes a GPU provider leaves."""
    cuda = (PROVIDERS["cuda"], {"device_id": device_id})
    if kind == "cpu":
        return [PROVIDERS["cpu"]]
    if kind == "cuda":
        return [cuda, PROVIDERS["cpu"]]
    # the engine cache makes every start and reload after the first skip the minutes-long build
    opts: dict[str, int | bool | str] = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_int8_enable": False,
        "trt_engine_cache_enable": cache_dir is not None,
    }
    if cache_dir is not None:
        opts.update(
            trt_engine_cache_path=str(cache_dir), trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir)
        )
    return [(PROVIDERS["tensorrt"], opts), cuda, PROVIDERS["cpu"]]


def engine_cache_dir(model: str | os.PathLike) -> Path:
    """Where ORT's TensorRT provider keeps its engines for ``model``: beside it (``<model>.trt-cache``),
    or under ``$SPADE_EDGE_CACHE/trt`` where the model's folder is read-only."""
    model = Path(model).resolve()
    beside = model.with_name(model.name + ".trt-cache")
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    base = Path(os.environ.get("SPADE_EDGE_CACHE", Path.home() / ".cache" / "spade-edge"))
    other = base / "trt" / f"{model.stem}-{hashlib.sha256(str(model).encode()).hexdigest()[:12]}"
    other.mkdir(parents=True, exist_ok=True)
    return other


def _gpu_scorer(device_id: int) -> tuple[PixelScorer, str]:
    """The CUDA scorer on ``device_id`` where CuPy runs (pycuda alone has no scorer: features then
    come back to the host and are scored there), and how to say it."""
    ok, why = cupy_usable(device_id)
    if ok:
        from .scoring.cuda import CudaScorer

        return CudaScorer(device_id=device_id), "the CUDA scorer"
    scorer = cpu_scorer()
    return scorer, f"the {scorer.name} scorer on the CPU ({why})"


def _need_gpu(device_id: int, what: str) -> str:
    ok, why = gpu_available(device_id)
    if not ok:
        raise ModelError(f"{what} needs CUDA device {device_id}: {why}")
    return why


def _engine(model: Path, kind: str, device_id: int) -> Placement:
    if kind == "cpu":
        raise ModelError(
            f"{model}: a TensorRT engine runs on an NVIDIA GPU; for --device cpu pass the ONNX model it was built from"
        )
    gpu = _need_gpu(device_id, f"{model} (a TensorRT engine)")
    from .features.tensorrt import TensorRTBackend

    backend = TensorRTBackend(model, device=device_id)
    scorer, scoring = _gpu_scorer(device_id)
    return Placement(
        backend, scorer, backend.device, f"TensorRT engine {model.name} on {gpu} (device {device_id}), {scoring}"
    )


def _onnx(model: Path, kind: str, device_id: int, threads: int | None, fp16: bool) -> Placement:
    """ONNX Runtime with ``kind``'s provider, refused unless the session really got it."""
    from .features.onnxruntime import OnnxRuntimeBackend, session_from_onnx, warn_if_int8_saturates

    if kind == "cpu":
        backend = OnnxRuntimeBackend(
            session_from_onnx(model, provider_list("cpu"), threads, extra="cpu"), os.fspath(model), "cpu"
        )
        warn_if_int8_saturates(backend.info, os.fspath(model))
        scorer = cpu_scorer()
        return Placement(backend, scorer, "cpu", f"ONNX Runtime on the CPU, {scorer.name} scorer")
    wanted = PROVIDERS[kind]
    if wanted not in ort_providers():
        raise ModelError(
            f"this onnxruntime has no {wanted}: install onnxruntime-gpu (pip install "
            "'spade-edge[gpu]', or NVIDIA's Jetson wheel), or use --device cpu"
        )
    gpu = _need_gpu(device_id, f"--device {kind}")
    cache = engine_cache_dir(model) if kind == "tensorrt" else None
    session = session_from_onnx(model, provider_list(kind, device_id, fp16, cache), threads, extra="gpu")
    got = session.get_providers()
    if wanted not in got:  # compiled in, but its libraries (CUDA, cuDNN, TensorRT) did not load
        raise ModelError(
            f"{model}: ONNX Runtime could not start its {wanted} on {gpu} (the session runs on "
            f"{', '.join(got)}): are the CUDA/cuDNN/TensorRT libraries of this onnxruntime-gpu "
            "installed? The log above names the missing library"
        )
    label = kind if device_id == 0 else f"{kind}:{device_id}"
    detail = f", fp16, engine cache {cache}" if fp16 and cache else (f", engine cache {cache}" if cache else "")
    scorer, scoring = _gpu_scorer(device_id)
    return Placement(
        OnnxRuntimeBackend(session, os.fspath(model), label),
        scorer,
        label,
        f"ONNX Runtime {wanted}{detail} on {gpu} (device {device_id}), {scoring}",
    )


def place(model: str | os.PathLike, device: str = "auto", threads: int | None = None, fp16: bool = False) -> Placement:
    """Open ``model`` on ``device`` (see the module docstring): its backend, scorer and why.

    ``threads`` bounds ONNX Runtime's CPU threads; ``fp16`` lets ONNX Runtime's TensorRT provider
    run an fp32 model in half precision. Raises ModelError when a named device cannot be had."""
    kind, device_id = parse_device(device)
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"{model}: no such model file; export one with 'spade-edge export'")
    if kind != "auto":
        return _engine(model, kind, device_id) if is_engine(model) else _onnx(model, kind, device_id, threads, fp16)
    if is_engine(model):
        return _engine(model, "tensorrt", device_id)
    missed = []  # 'auto': the best that actually starts, each miss recorded
    if not {PROVIDERS["tensorrt"], PROVIDERS["cuda"]} & set(ort_providers()):
        missed.append("this onnxruntime has no GPU provider")
    for candidate in ("tensorrt", "cuda") if not missed else ():
        try:
            placed = _onnx(model, candidate, device_id, threads, fp16)
        except ModelError as exc:
            missed.append(f"{candidate}: {exc}")
            continue
        placed.fallback = "; ".join(missed) or None
        return placed
    placed = _onnx(model, "cpu", 0, threads, fp16)
    placed.fallback = "; ".join(missed)
    placed.why += f" (auto: {placed.fallback})"
    return placed
