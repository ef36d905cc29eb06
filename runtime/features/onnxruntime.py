"""ONNX Runtime feature backend (the CPU, CUDA and TensorRT providers alike: runtime/device.py
chooses the providers)."""

from __future__ import annotations

import os
import warnings

import numpy as np

from .. import cpu
from ..errors import ModelError, require
from ..fingerprint import check_model_file
from ..modelinfo import ModelInfo
from .base import FeatureBackend


def session_from_onnx(path: str | os.PathLike, providers: list, threads: int | None = None, extra: str = "cpu"):
    """An ``onnxruntime.InferenceSession`` for ``path`` with ``providers`` (runtime/device.py chooses
    them and checks what the session really got); ``extra``: the install extra to name if missing."""
    ort = require("onnxruntime", extra, "Running an ONNX model")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such model file; export one with 'spade-edge export'")
    check_model_file(path)  # the file is what export wrote: its digest recomputed (runtime/fingerprint.py)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=providers)
    except Exception as exc:
        raise ModelError(f"{path}: ONNX Runtime cannot load this model ({exc})") from exc


def warn_if_int8_saturates(info: ModelInfo, source: str) -> None:
    """Warn when this CPU's INT8 products can overflow this model's weights (runtime/cpu.py): an
    8-bit-weight model on x86 without VNNI gives features that the calibration report never saw.
    For sessions on the CPU provider (runtime/device.py calls it)."""
    if info.precision != "int8":
        return
    made = info.extra.get("calibration") or {}
    bits = made.get("weight_bits", 8)  # models from before the 7-bit default used the full range
    kernel, exact = cpu.int8_kernel()
    if bits <= 7 or exact:
        return
    where = made.get("measured_on", {}).get("int8_kernel", "another CPU")
    warnings.warn(
        f"{source}: INT8 model with {bits}-bit weights on a CPU whose INT8 products run on {kernel}: "
        f"features can differ from those measured at calibration (on {where}); re-calibrate with "
        "'spade-edge calibrate --weight-bits 7' for a model that is exact on this CPU",
        UserWarning,
        stacklevel=3,
    )


class OnnxRuntimeBackend(FeatureBackend):
    """Feature extraction through an ONNX Runtime session (handed in, as in Polygraphy; made by
    runtime/device.py). ``device``: where the session runs, as runtime/device.py names it."""

    name = "onnxruntime"

    def __init__(self, session, source: str = "model", device: str = "cpu"):
        self.session, self.device = session, device
        meta = session.get_modelmeta().custom_metadata_map
        self.info = ModelInfo.from_metadata(meta, source)
        self._outputs = [o.name for o in session.get_outputs()]

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self._outputs, {self.info.input_name: batch})
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self.session = None
