"""ONNX Runtime feature backend (CPU here; the CUDA and TensorRT providers use the same class)."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ModelError, require
from ..modelinfo import ModelInfo
from .base import FeatureBackend

PROVIDERS = {"cpu": ["CPUExecutionProvider"]}


def session_from_onnx(path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for ``path`` on ``device``."""
    ort = require("onnxruntime", "cpu", "Running an ONNX model")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file; export one with 'spade-edge export'")
    if device not in PROVIDERS:
        raise ValueError(f"ONNX Runtime backend supports devices {sorted(PROVIDERS)}, not {device!r}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=PROVIDERS[device])
    except Exception as exc:
        raise ModelError(f"{path}: ONNX Runtime cannot load this model ({exc})") from exc


class OnnxRuntimeBackend(FeatureBackend):
    """Feature extraction through an ONNX Runtime session (handed in, as in Polygraphy)."""

    name = "onnxruntime"

    def __init__(self, session, source: str = "model"):
        self.session = session
        meta = session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, source)
        self._outputs = [o.name for o in session.get_outputs()]

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> "OnnxRuntimeBackend":
        return cls(session_from_onnx(path, device, threads), source=os.fspath(path))

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self._outputs, {self.info.input_name: batch})
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self.session = None
