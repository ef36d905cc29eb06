"""ONNX Runtime feature backend (CPU here; the CUDA and TensorRT providers use the same class)."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ModelError, require
from ..modelinfo import ModelInfo
from .base import FeatureBackend

def providers(device: str, device_id: int = 0, fp16: bool = False, cache_dir: str | None = None) -> list:
    """ONNX Runtime execution providers for ``device``, best first, CPU last as the fallback
    for any node a GPU provider does not take."""
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if device == "tensorrt":
        opts = {"device_id": device_id, "trt_fp16_enable": fp16, "trt_int8_enable": False,
                "trt_engine_cache_enable": cache_dir is not None}
        if cache_dir is not None:
            opts["trt_engine_cache_path"] = str(cache_dir)
            opts["trt_timing_cache_enable"] = True
            opts["trt_timing_cache_path"] = str(cache_dir)
        return [("TensorrtExecutionProvider", opts), cuda, "CPUExecutionProvider"]
    raise ValueError(f"ONNX Runtime backend supports devices cpu, cuda, tensorrt; not {device!r}")


def session_from_onnx(path: str | os.PathLike, device: str = "cpu", threads: int | None = None, device_id: int = 0,
                      fp16: bool = False, cache_dir: str | None = None):
    """An ``onnxruntime.InferenceSession`` for ``path`` on ``device`` (provider options: GPU
    ``device_id``, TensorRT ``fp16``, TensorRT engine/timing ``cache_dir``)."""
    ort = require("onnxruntime", "cpu" if device == "cpu" else "gpu", "Running an ONNX model")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file; export one with 'spade-edge export'")
    wanted = providers(device, device_id, fp16, cache_dir)
    names = [p[0] if isinstance(p, tuple) else p for p in wanted]
    missing = [n for n in names[:-1] if n not in ort.get_available_providers()]
    if missing:
        raise ModelError(f"this onnxruntime has no {', '.join(missing)}; install onnxruntime-gpu "
                         f"(pip install 'spade-edge[gpu]', or NVIDIA's Jetson wheel) or use --device cpu")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=wanted)
    except Exception as exc:
        raise ModelError(f"{path}: ONNX Runtime cannot load this model ({exc})") from exc


class OnnxRuntimeBackend(FeatureBackend):
    """Feature extraction through an ONNX Runtime session (handed in, as in Polygraphy)."""

    name = "onnxruntime"

    def __init__(self, session, source: str = "model", device: str = "cpu"):
        self.session, self.device = session, device
        meta = session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, source)
        self._outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> "OnnxRuntimeBackend":
        return cls(session_from_onnx(path, device, threads), source=os.fspath(path), device=device)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self._outputs, {self.info.input_name: batch})
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self.session = None
