"""FP16 model for strongly typed TensorRT (and any FP16-capable runtime): weights and
activations in half precision, the uint8 input and float32 outputs kept."""

from __future__ import annotations

import os

from spade_edge.runtime.errors import require

from .common import read_info, save_with_info


def fp16_from_onnx(model_path: str | os.PathLike, out: str | os.PathLike):
    """Convert an fp32 spade-edge model to FP16 (I/O types kept); returns its :class:`ModelInfo`."""
    onnx = require("onnx", "export", "FP16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(os.fspath(model_path))
    info = read_info(model)
    if info.precision != "fp32":
        raise ValueError(f"{model_path} is already {info.precision}; convert the fp32 model")
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    return save_with_info(half, info, "fp16", {"method": "fp16", "io": "uint8 in, float32 out"}, out)
