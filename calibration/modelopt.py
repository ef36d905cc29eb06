"""NVIDIA ModelOpt as an alternative INT8 quantizer (optional extra ``modelopt``): same inputs,
same Q/DQ output form and metadata as the built-in ONNX Runtime path, calibrated on the CPU."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from spade_edge.runtime import cpu
from spade_edge.runtime.errors import require
from spade_edge.runtime.images import Preprocess

from .common import read_info, save_with_info
from .int8 import Int8Options, Int8Result, output_nodes, preprocessing_nodes
from .reader import make_reader

METHODS = {"minmax": "max", "entropy": "entropy"}


def int8_with_modelopt(
    model_path: str | os.PathLike,
    images: list[Path],
    out: str | os.PathLike,
    opts: Int8Options = Int8Options(),
    preprocess: Preprocess | None = None,
    show_progress: bool = True,
) -> Int8Result:
    """Quantize with ``modelopt.onnx.quantization.quantize`` (float kept as fp32, CPU calibration)."""
    onnx = require("onnx", "export", "INT8 calibration")
    mq = require("modelopt.onnx.quantization", "modelopt", "Quantizing with NVIDIA ModelOpt")
    if opts.method not in METHODS:
        raise ValueError(f"ModelOpt calibrates with {sorted(METHODS)}, not {opts.method!r}")
    if opts.auto_exclude:
        raise ValueError("--auto-exclude is measured with the built-in quantizer; pass --exclude names to ModelOpt")
    model = onnx.load(os.fspath(model_path))
    info = read_info(model)
    if info.precision != "fp32":
        raise ValueError(f"{model_path} is already {info.precision}; calibrate the fp32 model")
    preprocess = preprocess or Preprocess(info.input_size)
    exclude = preprocessing_nodes(model) + output_nodes(model) + list(opts.exclude)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "int8.onnx"
        mq.quantize(
            os.fspath(model_path),
            quantize_mode="int8",
            calibration_method=METHODS[opts.method],
            calibration_data_reader=make_reader(images, preprocess, info.input_name, show_progress),
            calibration_eps=["cpu"],
            nodes_to_exclude=exclude,
            high_precision_dtype="fp32",
            output_path=str(staged),
            log_level="ERROR",
        )
        # ModelOpt has no reduced weight range: its weights use all 8 bits whatever opts.weight_bits
        # says, and the runtime warns on CPUs that saturate them (runtime/cpu.py)
        details = {
            "method": opts.method,
            "images": len(images),
            "quantizer": "modelopt",
            "activations": "int8 symmetric",
            "weights": "int8 symmetric per channel, 8-bit range",
            "weight_bits": 8,
            "kept_float": list(opts.exclude),
            "measured_on": cpu.measured_on(),
        }
        return Int8Result(save_with_info(onnx.load(str(staged)), info, "int8", details, out), list(opts.exclude))
