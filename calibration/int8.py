"""Static INT8 quantization into explicit Q/DQ form (what TensorRT 10/11 and ONNX Runtime accept):
symmetric int8 activations (zero point 0), per-channel symmetric int8 weights, calibrated on
normal images. Weights use 7 bits of the int8 range by default: x86 CPUs without VNNI (AVX2-only
machines, most industrial PCs) sum u8 x s8 products in saturating 16-bit pairs, which full-range
weights overflow (runtime/cpu.py); 7-bit weights give the same result on every CPU and GPU. The pre-processing at the head of the graph (cast, normalise, transpose) and the
nodes that produce the outputs stay in float; chosen layers, or the N most sensitive ones, can
be kept in float too."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spade_edge.runtime import cpu
from spade_edge.runtime.errors import require
from spade_edge.runtime.images import Preprocess

from .common import read_info, save_with_info
from .qdq_pairs import unique_qdq_pairs
from .reader import make_reader

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass(frozen=True)
class Int8Options:
    method: str = "minmax"
    percentile: float = 99.999
    exclude: tuple[str, ...] = ()  # node names kept in float
    auto_exclude: int = 0  # keep this many of the most sensitive Conv nodes in float
    sensitivity_images: int = 8
    # keep the fewest leading Conv layers in float that hold every output's mean feature cosine at
    # this value on the probe images (0: off). The early, high-resolution layers are where int8
    # error is amplified by everything after them (docs/results.md, calibration)
    target_cosine: float = 0.0
    # 7: weights in [-64, 64], exact on every CPU; 8: the full range, exact only where int8 products
    # accumulate in 32 bits (VNNI, AMX, Arm, GPUs): for a model that only TensorRT will run
    weight_bits: int = 7

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        if self.auto_exclude < 0:
            raise ValueError("auto_exclude must be >= 0")
        if not 0 <= self.target_cosine < 1:
            raise ValueError("target_cosine must be in [0, 1)")
        if self.weight_bits not in (7, 8):
            raise ValueError("weight_bits must be 7 (exact on every CPU) or 8 (exact with VNNI, AMX, Arm or a GPU)")


@dataclass
class Int8Result:
    info: object
    excluded: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)  # Conv node -> SQNR (dB) of its output, low = sensitive
    leading_float: int = 0  # leading Conv layers kept in float for target_cosine
    probe_cosine: dict[str, float] = field(default_factory=dict)  # output -> mean cosine on the probe images


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
    extra: dict[str, bool | float] = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    if opts.method == "percentile":
        extra["CalibPercentile"] = opts.percentile
    q.quantize_static(
        str(pre_path),
        str(out),
        reader,
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QInt8,
        weight_type=q.QuantType.QInt8,
        calibrate_method=getattr(q.CalibrationMethod, METHODS[opts.method]),
        nodes_to_exclude=exclude,
        extra_options=extra,
        reduce_range=opts.weight_bits == 7,
    )


ACTIVATIONS = ("Clip", "Relu")  # fused with the Conv before them: quantized, or kept in float, together


def fused_activations(model) -> dict[str, str]:
    """Conv name -> the name of the activation that consumes its output alone (ReLU6 is a Clip)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = {}
    for n in model.graph.node:
        users = consumers.get(n.output[0], []) if n.op_type == "Conv" else []
        if len(users) == 1 and users[0].op_type in ACTIVATIONS:
            out[n.name] = users[0].name
    return out


def with_activations(convs, fused: dict[str, str]) -> list[str]:
    """Conv names, each followed by the activation fused with it (:func:`fused_activations`)."""
    return [x for c in convs for x in (c, fused.get(c)) if x]


def conv_sensitivity(float_path: Path, qdq_path: Path, reader, model) -> dict[str, float]:
    """SQNR (dB) that quantization leaves on each Conv's quantized output, measured on calibration
    images (low SQNR = quantizing this layer hurts most). A Conv followed by its activation is
    quantized after the activation, so that is where its error is read."""
    from onnxruntime.quantization import qdq_loss_debug as dbg

    with tempfile.TemporaryDirectory() as tmp:
        aug_f, aug_q = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        ops = ["Conv", *ACTIVATIONS]
        dbg.modify_model_output_intermediate_tensors(str(float_path), str(aug_f), op_types_for_saving=ops)
        dbg.modify_model_output_intermediate_tensors(str(qdq_path), str(aug_q), op_types_for_saving=ops)
        fa = dbg.collect_activations(str(aug_f), reader, execution_providers=["CPUExecutionProvider"])
        reader.rewind()
        qa = dbg.collect_activations(str(aug_q), reader, execution_providers=["CPUExecutionProvider"])
    errors = dbg.compute_activation_error(dbg.create_activation_matching(qa, fa))
    names = {n.name: n for n in model.graph.node}
    fused = fused_activations(model)
    tensor = {c: names[fused.get(c, c)].output[0] for c, n in names.items() if n.op_type == "Conv"}
    return {c: float(errors[t]["qdq_err"]) for c, t in tensor.items() if "qdq_err" in errors.get(t, {})}


def output_cosine(float_path: Path, qdq_path: Path, reader) -> dict[str, float]:
    """Per model output: mean cosine similarity of the quantized model's pixel features to the
    float model's, over the reader's images."""
    import onnxruntime as ort

    from .drift import _rows

    sf, sq = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (float_path, qdq_path))
    names = [o.name for o in sf.get_outputs()]
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    reader.rewind()
    while (batch := reader.get_next()) is not None:
        for n, a, b in zip(names, sf.run(names, batch), sq.run(names, batch)):
            ra, rb = _rows(a).astype(np.float64), _rows(b).astype(np.float64)
            c = (ra * rb).sum(1) / np.maximum(np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1), 1e-12)
            total[n], count[n] = total.get(n, 0.0) + float(c.sum()), count.get(n, 0) + len(c)
    return {n: total[n] / count[n] for n in total}


def _leading_float(
    pre: Path, staged: Path, reader, probe, opts: Int8Options, exclude: list[str], model, result: Int8Result
) -> list[str]:
    """The fewest leading Conv layers (with their activations) kept in float for which every output
    keeps ``opts.target_cosine`` on the probe images: a bisection, the model re-quantized per step."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    fused = fused_activations(model)

    def lead(n: int) -> list[str]:
        return with_activations([c for c in convs[:n] if c not in exclude], fused)

    measured: dict[int, dict[str, float]] = {}  # n -> cosines; the staged file holds the latest n
    latest = None

    def quantized_cosine(n: int) -> dict[str, float]:
        nonlocal latest
        reader.rewind()
        _quantize(pre, staged, reader, opts, exclude + lead(n))
        measured[n], latest = output_cosine(pre, staged, probe), n
        return measured[n]

    lo, hi = -1, len(convs)  # lo fails (none tried yet), hi passes (everything in float)
    while hi - lo > 1:
        mid = 0 if lo < 0 else (lo + hi) // 2  # "nothing in float" first
        if min(quantized_cosine(mid).values()) >= opts.target_cosine:
            hi = mid
        else:
            lo = mid
    if latest != hi:
        quantized_cosine(hi)
    result.leading_float, result.probe_cosine = hi, measured[hi]
    return lead(hi)


def int8_from_onnx(
    model_path: str | os.PathLike,
    images: list[Path],
    out: str | os.PathLike,
    opts: Int8Options = Int8Options(),
    preprocess: Preprocess | None = None,
    show_progress: bool = True,
) -> Int8Result:
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
            raise ValueError(
                f"no node named {sorted(unknown)[:3]} in the model; 'spade-edge calibrate --list-nodes' lists them"
            )
        staged = Path(tmp) / "int8.onnx"
        reader = make_reader(images, preprocess, info.input_name, show_progress)
        _quantize(pre, staged, reader, opts, exclude)
        result = Int8Result(None)
        if opts.auto_exclude:
            probe = make_reader(images[: opts.sensitivity_images], preprocess, info.input_name, show=False)
            result.sensitivity = conv_sensitivity(pre, staged, probe, pre_model)
            worst = sorted(result.sensitivity, key=result.sensitivity.__getitem__)[: opts.auto_exclude]
            result.excluded = with_activations(worst, fused_activations(pre_model))
            reader.rewind()
            _quantize(pre, staged, reader, opts, exclude + result.excluded)
        if opts.target_cosine:
            probe = make_reader(images[: opts.sensitivity_images], preprocess, info.input_name, show=False)
            result.excluded += _leading_float(
                pre, staged, reader, probe, opts, exclude + result.excluded, pre_model, result
            )
        result.excluded = list(opts.exclude) + result.excluded
        details = {
            "method": opts.method,
            "images": len(images),
            "activations": "int8 symmetric",
            "weights": f"int8 symmetric per channel, {opts.weight_bits}-bit range",
            "weight_bits": opts.weight_bits,
            "kept_float": result.excluded,
            "measured_on": cpu.measured_on(),
        }
        if opts.target_cosine:
            details.update(
                target_cosine=opts.target_cosine,
                leading_float=result.leading_float,
                probe_cosine={k: round(v, 4) for k, v in result.probe_cosine.items()},
            )
        if opts.method == "percentile":
            details["percentile"] = opts.percentile
        final = onnx.load(str(staged))
        details["qdq_pairs_added"] = unique_qdq_pairs(final)  # so that ONNX Runtime's CPU kernels fuse every layer
        result.info = save_with_info(final, info, "int8", details, out)
    return result


def list_nodes(model_path: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, op type) of every node: what ``exclude`` accepts."""
    onnx = require("onnx", "export", "Listing model nodes")
    return [(n.name, n.op_type) for n in onnx.load(os.fspath(model_path), load_external_data=False).graph.node]
