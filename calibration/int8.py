"""Static INT8 quantization into explicit Q/DQ form (what TensorRT 10/11 and ONNX Runtime accept):
symmetric int8 activations (zero point 0), per-channel symmetric int8 weights, calibrated on
normal images. The pre-processing at the head of the graph (cast, normalise, transpose) and the
nodes that produce the outputs stay in float; chosen layers, or the N most sensitive ones, can
be kept in float too."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from spade_edge.runtime.errors import require
from spade_edge.runtime.images import Preprocess

from .common import read_info, save_with_info
from .reader import make_reader

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass(frozen=True)
class Int8Options:
    method: str = "minmax"
    percentile: float = 99.999
    exclude: tuple[str, ...] = ()  # node names kept in float
    auto_exclude: int = 0  # keep this many of the most sensitive Conv nodes in float
    sensitivity_images: int = 8

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        if self.auto_exclude < 0:
            raise ValueError("auto_exclude must be >= 0")


@dataclass
class Int8Result:
    info: object
    excluded: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)  # Conv node -> SQNR (dB) of its output, low = sensitive


def preprocessing_nodes(model) -> list[str]:
    """Nodes that run before any Conv (cast, normalisation, layout): kept in float."""
    produced_after_conv: set[str] = set()
    head = []
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        after = node.op_type == "Conv" or any(i in produced_after_conv for i in node.input)
        if after:
            produced_after_conv.update(node.output)
        else:
            head.append(node.name)
    return head


def output_nodes(model) -> list[str]:
    """Nodes whose result is a model output: the pyramid taps and the pooled vector. They run in
    float: their outputs go straight to the scorer, so rounding them would cost accuracy and save
    no time."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if outputs & set(n.output)]


def _quantize(pre_path: Path, out: Path, reader, opts: Int8Options, exclude: list[str]) -> None:
    q = require("onnxruntime.quantization", "cpu", "INT8 calibration")
    # int32 biases cannot be dequantized by TensorRT's parser: keep them in float
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    if opts.method == "percentile":
        extra["CalibPercentile"] = opts.percentile
    q.quantize_static(
        str(pre_path), str(out), reader, quant_format=q.QuantFormat.QDQ, per_channel=True,
        activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
        calibrate_method=getattr(q.CalibrationMethod, METHODS[opts.method]),
        nodes_to_exclude=exclude, extra_options=extra,
    )


def conv_sensitivity(float_path: Path, qdq_path: Path, reader, model) -> dict[str, float]:
    """SQNR (dB) that quantization leaves on each Conv's output, measured on calibration images:
    the local error of each Q/DQ pair (low SQNR = quantizing this layer hurts most)."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    with tempfile.TemporaryDirectory() as tmp:
        aug_f, aug_q = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        dbg.modify_model_output_intermediate_tensors(str(float_path), str(aug_f), op_types_for_saving=["Conv"])
        dbg.modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q), op_types_for_saving=["Conv"])
        fa = dbg.collect_activations(str(aug_f), reader, execution_providers=["CPUExecutionProvider"])
        reader.rewind()
        qa = dbg.collect_activations(str(aug_q), reader, execution_providers=["CPUExecutionProvider"])
    errors = dbg.compute_activation_error(dbg.create_activation_matching(qa, fa))
    out_of = {o: n.name for n in model.graph.node if n.op_type == "Conv" for o in n.output}
    return {out_of[t]: float(e["qdq_err"]) for t, e in errors.items() if t in out_of and "qdq_err" in e}


def int8_from_onnx(model_path: str | os.PathLike, images: list[Path], out: str | os.PathLike,
                   opts: Int8Options = Int8Options(), preprocess: Preprocess | None = None,
                   show_progress: bool = True) -> Int8Result:
    """Calibrate ``model_path`` (fp32 spade-edge ONNX) on ``images`` and write the Q/DQ model to ``out``."""
    onnx = require("onnx", "export", "INT8 calibration")
    q = require("onnxruntime.quantization", "cpu", "INT8 calibration")
    model = onnx.load(os.fspath(model_path))
    info = read_info(model)
    if info.precision != "fp32":
        raise ValueError(f"{model_path} is already {info.precision}; calibrate the fp32 model")
    preprocess = preprocess or Preprocess(info.input_size)
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        q.quant_pre_process(os.fspath(model_path), str(pre), skip_symbolic_shape=True)
        pre_model = onnx.load(str(pre))
        exclude = preprocessing_nodes(pre_model) + output_nodes(pre_model) + list(opts.exclude)
        unknown = set(opts.exclude) - {n.name for n in pre_model.graph.node}
        if unknown:
            raise ValueError(f"no node named {sorted(unknown)[:3]} in the model; 'spade-edge calibrate --list-nodes' lists them")
        staged = Path(tmp) / "int8.onnx"
        reader = make_reader(images, preprocess, info.input_name, show_progress)
        _quantize(pre, staged, reader, opts, exclude)
        result = Int8Result(None)
        if opts.auto_exclude:
            probe = make_reader(images[: opts.sensitivity_images], preprocess, info.input_name, show=False)
            result.sensitivity = conv_sensitivity(pre, staged, probe, pre_model)
            worst = sorted(result.sensitivity, key=result.sensitivity.get)[: opts.auto_exclude]
            result.excluded = worst
            reader.rewind()
            _quantize(pre, staged, reader, opts, exclude + worst)
        result.excluded = list(opts.exclude) + result.excluded
        details = {"method": opts.method, "images": len(images), "activations": "int8 symmetric",
                   "weights": "int8 symmetric per channel", "kept_float": result.excluded}
        if opts.method == "percentile":
            details["percentile"] = opts.percentile
        result.info = save_with_info(onnx.load(str(staged)), info, "int8", details, out)
    return result


def list_nodes(model_path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, op type) of every node: what ``exclude`` accepts."""
    onnx = require("onnx", "export", "Listing model nodes")
    return [(n.name, n.op_type) for n in onnx.load(os.fspath(model_path), load_external_data=False).graph.node]
