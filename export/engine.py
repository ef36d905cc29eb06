"""ONNX -> TensorRT engine, with a JSON sidecar that carries everything that invalidates it.

TensorRT 10 and 11 part ways on precision, and only there (:func:`build_plan`):

- TensorRT 11 builds every network strongly typed: precision is the model's own (an FP16 ONNX for
  fp16, an INT8 Q/DQ ONNX for int8; ``calibration/``). It has no FP16/INT8 builder flags and no
  EXPLICIT_BATCH flag, and a mismatched request is refused rather than rewritten.
- TensorRT 10 (JetPack 6 ships 10.3): explicit batch; ``BuilderFlag.FP16`` lets an fp32 model run in
  half precision, and a Q/DQ int8 model builds with ``BuilderFlag.INT8`` set.

Every TensorRT name this package uses is listed below, by the path that reaches it;
``tests/export/test_tensorrt_api.py`` checks the lists against the real bindings of each version.

An engine is tied to its ONNX file, its TensorRT version and its GPU: ``<engine>.json`` records them
with the build options, and :func:`check_engine` refuses an engine whose record does not match.
This module imports neither torch nor onnx nor TensorRT at import time: the device can run it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import mmap
import os
import shlex
import sys
from functools import lru_cache
from pathlib import Path

from spade_edge.runtime.errors import ModelError, SpadeError, require
from spade_edge.runtime.gpu import gpu_identity
from spade_edge.runtime.modelinfo import ModelInfo

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_MB = 1024  # ample for these convnets; a Jetson shares this memory with the CPU
SIDECAR_FORMAT = 1

# TensorRT names used on every version (attributes of the module, or members of its classes)
TRT_NAMES = (
    "__version__", "ILogger", "ILogger.Severity", "ILogger.log",
    "Builder", "Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "OnnxParser", "OnnxParser.parse_from_file", "OnnxParser.num_errors", "OnnxParser.get_error",
    "NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType.WORKSPACE",
    "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_flag", "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize", "IOptimizationProfile.set_shape",
    # runtime/features/tensorrt.py
    "Runtime", "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.create_execution_context", "TensorIOMode.INPUT", "TensorIOMode.OUTPUT",
    "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3", "nptype",
)
# reached only through _plan_trt10 / _plan_trt11 (the names a plan returns are resolved against these)
TRT10_NAMES = ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "BuilderFlag.FP16", "BuilderFlag.INT8")
TRT11_NAMES = ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",)


class EngineError(ModelError):
    """An engine that cannot be built, or must not be used (stale, or from another TensorRT or GPU)."""


# ---------------------------------------------------------------------------- TensorRT versions

def _trt():
    return require("tensorrt", "trt", "Building or running a TensorRT engine")


def parse_version(text: str):
    """A comparable version (``packaging``: "10.16" > "10.3", which string comparison gets wrong)."""
    from packaging.version import Version

    return Version(str(text))


@lru_cache(maxsize=1)
def tensorrt_version():
    """The installed TensorRT's version, detected once."""
    return parse_version(_trt().__version__)


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What one TensorRT version needs for a precision: flag names (resolved on the real module) and
    the equivalent trtexec options."""

    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    trtexec_flags: tuple[str, ...]


def _plan_trt10(precision: str, model_precision: str) -> BuildPlan:
    """TensorRT 10: weakly typed, reduced precision allowed by builder flags. An INT8 Q/DQ model also
    gets FP16: its layers kept in float (pre-processing, the leading convolutions, the outputs) would
    otherwise run in fp32 while the rest runs int8."""
    flags = {("fp32", "fp32"): (), ("fp16", "fp32"): ("FP16",), ("fp16", "fp16"): ("FP16",),
             ("int8", "int8"): ("INT8", "FP16")}
    if (precision, model_precision) not in flags:
        hint = ("TensorRT has no implicit INT8 calibration here: calibrate first ('spade-edge calibrate "
                "--precision int8') and build the Q/DQ model" if precision == "int8" else
                f"build the {precision} engine from the fp32 model" if precision != "fp32" else
                f"ask for --precision {model_precision}, or build from the fp32 model")
        raise EngineError(f"a {precision} engine cannot be built from a {model_precision} model: {hint}")
    chosen = flags[(precision, model_precision)]
    return BuildPlan(("NetworkDefinitionCreationFlag.EXPLICIT_BATCH",), tuple(f"BuilderFlag.{f}" for f in chosen),
                     tuple(f"--{f.lower()}" for f in chosen))


def _plan_trt11(precision: str, model_precision: str) -> BuildPlan:
    """TensorRT 11: strongly typed, precision is the model's; no precision flags exist."""
    if precision != model_precision:
        make = {"fp16": "'spade-edge calibrate --precision fp16'", "int8": "'spade-edge calibrate --precision int8'",
                "fp32": "'spade-edge export'"}[precision]
        raise EngineError(f"TensorRT 11 builds strongly typed networks, so the precision comes from the model: this "
                          f"model is {model_precision}, not {precision}. Make a {precision} model with {make} and "
                          f"build from it, or ask for --precision {model_precision}")
    return BuildPlan(("NetworkDefinitionCreationFlag.STRONGLY_TYPED",), (), ("--stronglyTyped",))


def build_plan(precision: str, model_precision: str, version=None) -> BuildPlan:
    """The one place where TensorRT 10 and 11 part ways (``version``: default the installed one)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    version = tensorrt_version() if version is None else version
    if version.major < 10:
        raise EngineError(f"TensorRT {version} is too old: spade-edge needs TensorRT 10.3 or later (JetPack 6)")
    plan = _plan_trt11 if version.major >= 11 else _plan_trt10
    return plan(precision, model_precision)


def _resolve(trt, dotted: str):
    obj = trt
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def make_logger(trt, name: str = "tensorrt"):
    """A ``trt.ILogger`` that forwards to Python logging and keeps errors for exception messages
    (the subclass is defined here so that importing this module never imports TensorRT)."""
    levels = (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)  # TensorRT's order
    pylog = logging.getLogger(name)

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = levels[min(int(severity), len(levels) - 1)]
            if level >= logging.ERROR:
                self.errors.append(msg)
            pylog.log(level, "%s", msg)

    return Logger()


# ---------------------------------------------------------------------------- model and files

def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, payload) of each length-delimited field in a protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield key >> 3, pos, pos + n
            pos += n
        else:
            raise ValueError(f"protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``ModelProto.metadata_props`` (field 14) read from the protobuf wire format without the onnx
    package (the device need not have it) and without reading the weights into memory."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            props = {}
            for field, a, b in _fields(buf, 0, len(buf)):
                if field == 14:
                    entry = {k: bytes(buf[s:e]).decode() for k, s, e in _fields(buf, a, b)}
                    props[entry.get(1, "")] = entry.get(2, "")
            return props
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc


def model_info_from_onnx(path: str | os.PathLike) -> ModelInfo:
    return ModelInfo.from_metadata(onnx_metadata(path), os.fspath(path))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- sidecar

def sidecar_path(engine: str | os.PathLike) -> Path:
    return Path(os.fspath(engine) + ".json")


def write_sidecar(engine: str | os.PathLike, onnx_path: str | os.PathLike, precision: str, build: dict,
                  trt_version=None, gpu: dict | None = None) -> dict:
    """Record what the engine at ``engine`` was built from, with and for (``<engine>.json``)."""
    engine, onnx_path = Path(engine), Path(onnx_path)
    info = model_info_from_onnx(onnx_path)
    engine_info = dataclasses.replace(info, precision=precision)  # what the runtime reads: the engine's precision
    record = {
        "format": SIDECAR_FORMAT,
        "engine": {"file": engine.name, "sha256": file_sha256(engine), "precision": precision},
        "onnx": {"file": onnx_path.name, "sha256": file_sha256(onnx_path)},
        "model": {"backbone": info.backbone, "fingerprint": info.fingerprint, "precision": info.precision},
        "model_info": json.loads(engine_info.to_json()),
        "tensorrt": str(tensorrt_version() if trt_version is None else trt_version),
        "gpu": gpu_identity() if gpu is None else dict(gpu),
        "build": dict(build),
    }
    _atomic_write(sidecar_path(engine), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def read_sidecar(engine: str | os.PathLike) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise EngineError(f"{engine}: no sidecar {path.name}; engines are only used with their build record "
                          "(build with 'python -m spade_edge.export.engine build' or jetson/build-engine.sh)")
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise EngineError(f"{path}: unreadable sidecar ({exc}); rebuild the engine") from exc
    if record.get("format") != SIDECAR_FORMAT:
        raise EngineError(f"{path}: unknown sidecar format {record.get('format')!r}; rebuild the engine")
    return record


def check_engine(engine_path: str | os.PathLike, onnx_path: str | os.PathLike | None = None, *,
                 trt_version=None, gpu: dict | None = None, device: int = 0) -> dict:
    """The engine's sidecar record, after refusing an engine that is not the one recorded, was built
    from another ONNX file than ``onnx_path`` (when given), or for another TensorRT or GPU than
    this one (``trt_version``, ``gpu``: default detected, CUDA device ``device``)."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise EngineError(f"{engine_path}: no such engine file")
    rec = read_sidecar(engine_path)
    rebuild = "rebuild the engine on this machine (jetson/build-engine.sh)"
    if file_sha256(engine_path) != rec["engine"]["sha256"]:
        raise EngineError(f"{engine_path}: the file is not the engine its sidecar records (checksum differs); {rebuild}")
    if onnx_path is not None and file_sha256(onnx_path) != rec["onnx"]["sha256"]:
        raise EngineError(f"{engine_path} was built from another model than {onnx_path} (ONNX SHA-256 differs: "
                          f"built from {rec['onnx']['file']} {rec['onnx']['sha256'][:19]}...); {rebuild}")
    running = str(tensorrt_version() if trt_version is None else trt_version)
    if running != rec["tensorrt"]:
        raise EngineError(f"{engine_path} was built with TensorRT {rec['tensorrt']}, this is TensorRT {running}: "
                          f"engines do not move between TensorRT versions; {rebuild}")
    here = gpu_identity(device) if gpu is None else gpu
    built = rec["gpu"]
    if (here["name"], here["compute_capability"]) != (built["name"], built["compute_capability"]):
        raise EngineError(f"{engine_path} was built for {built['name']} (compute capability "
                          f"{built['compute_capability']}), this GPU is {here['name']} (compute capability "
                          f"{here['compute_capability']}): engines do not move between GPUs; {rebuild}")
    return rec


# ---------------------------------------------------------------------------- building

def _shape(info: ModelInfo, n: int) -> tuple[int, int, int, int]:
    return (n, info.input_size, info.input_size, 3)


def _build_options(precision: str, max_batch: int, workspace_mb: int, timing_cache, plan: BuildPlan, tool: str) -> dict:
    return {"tool": tool, "precision": precision, "max_batch": int(max_batch), "workspace_mb": int(workspace_mb),
            "timing_cache": None if timing_cache is None else os.fspath(timing_cache),
            "flags": list(plan.network_flags + plan.builder_flags)}


def engine_from_onnx(onnx_path: str | os.PathLike, out: str | os.PathLike, precision: str = "fp32",
                     max_batch: int = DEFAULT_MAX_BATCH, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                     timing_cache: str | os.PathLike | None = None) -> Path:
    """Build a TensorRT engine for batches 1..``max_batch`` (optimised for batch 1) from a
    spade-edge ONNX model; writes ``out`` and ``<out>.json``. ``timing_cache``: a file read before
    and written after the build, so later builds skip kernel timing."""
    onnx_path, out = Path(onnx_path), Path(out)
    if max_batch < 1 or workspace_mb < 1:
        raise ValueError("max_batch and workspace_mb must be >= 1")
    info = model_info_from_onnx(onnx_path)
    trt = _trt()
    plan = build_plan(precision, info.precision)
    logger = make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        raise EngineError(f"TensorRT could not create a builder: no usable CUDA GPU or driver? ({exc})") from exc
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(_resolve(trt, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser refused the model:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in plan.builder_flags:
        config.set_flag(_resolve(trt, name))
    profile = builder.create_optimization_profile()
    # tuned for one image at a time (the service's and the line's batch), batches up to max_batch allowed
    profile.set_shape(info.input_name, _shape(info, 1), _shape(info, 1), _shape(info, max_batch))
    config.add_optimization_profile(profile)
    cache_file = None if timing_cache is None else Path(timing_cache)
    old = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(old), False):
        log.warning("timing cache %s is from another TensorRT or GPU: starting a new one", cache_file)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}: " + "; ".join(logger.errors[-5:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, memoryview(serialized))
    if cache_file is not None:
        _atomic_write(cache_file, memoryview(config.get_timing_cache().serialize()))
    write_sidecar(out, onnx_path, precision,
                  _build_options(precision, max_batch, workspace_mb, timing_cache, plan, "tensorrt-python"))
    return out


def trtexec_args(onnx: str | os.PathLike, out: str | os.PathLike, precision: str = "fp32",
                 max_batch: int = DEFAULT_MAX_BATCH, workspace_mb: int = DEFAULT_WORKSPACE_MB,
                 timing_cache: str | os.PathLike | None = None, *, version=None) -> list[str]:
    """The trtexec arguments that build what :func:`engine_from_onnx` builds."""
    info = model_info_from_onnx(onnx)
    plan = build_plan(precision, info.precision, version)
    shape = lambda n: f"{info.input_name}:" + "x".join(map(str, _shape(info, n)))
    args = ["trtexec", f"--onnx={os.fspath(onnx)}", f"--saveEngine={os.fspath(out)}", f"--minShapes={shape(1)}",
            f"--optShapes={shape(1)}", f"--maxShapes={shape(max_batch)}",
            f"--memPoolSize=workspace:{int(workspace_mb)}M", *plan.trtexec_flags]
    if timing_cache is not None:
        args.append(f"--timingCacheFile={os.fspath(timing_cache)}")
    return args


def trtexec_command(onnx, out, precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
                    workspace_mb: int = DEFAULT_WORKSPACE_MB, timing_cache=None, *, version=None) -> str:
    """The equivalent trtexec command line (quoted for a POSIX shell)."""
    return shlex.join(trtexec_args(onnx, out, precision, max_batch, workspace_mb, timing_cache, version=version))


# ---------------------------------------------------------------------------- what TensorRT's ONNX parser takes

# ONNX operators TensorRT's parser supports ("Y" in onnx-tensorrt docs/operators.md for TensorRT 10.x),
# leaving out the ones added after 10.3, the version JetPack 6 ships (Attention, RotaryEmbedding,
# RMSNormalization, TensorScatter, ...). Restrictions that matter to these models are checked below.
TRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid HardSwish Hardmax Identity
If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
ONNX_OPSETS = (9, 20)  # the range TensorRT 10.0-10.3 documents (later versions accept more)
MAX_ELEMENTS = 2**31 - 1  # TensorRT's limit on the elements of one tensor
_CONSTANT_INPUT = {"ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceL1": 1,
                   "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1, "ReduceSumSquare": 1, "Squeeze": 1,
                   "Unsqueeze": 1, "TopK": 1}  # inputs TensorRT needs known when building


def tensorrt_onnx_problems(model, max_batch: int) -> list[str]:
    """Why TensorRT's ONNX parser would refuse ``model`` (a path or ``onnx.ModelProto``, modified in
    place) at batch ``max_batch``; empty when it would not: operator support, data types (uint8
    only at the input and straight into a Cast; int8 Q/DQ with zero points 0) and shapes (static
    but for the batch, no tensor over 2^31-1 elements)."""
    onnx = require("onnx", "export", "Checking a model for TensorRT")
    from onnx import TensorProto, numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    g = model.graph
    problems = []
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not ONNX_OPSETS[0] <= op.version <= ONNX_OPSETS[1]:
            problems.append(f"opset {op.version} is outside TensorRT 10's range {ONNX_OPSETS}")
    init = {i.name: i for i in g.initializer}
    constants = set(init) | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    for n in g.node:
        where = f"{n.op_type} node {n.name or n.output[0]!r}"
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {n.domain!r} needs a TensorRT plugin")
        elif n.op_type not in TRT_ONNX_OPS:
            problems.append(f"{where}: operator not supported by TensorRT's ONNX parser")
        k = _CONSTANT_INPUT.get(n.op_type)
        if k is not None and len(n.input) > k and n.input[k] and n.input[k] not in constants:
            problems.append(f"{where}: input {n.input[k]!r} must be a constant for TensorRT")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2]:
            zp = init.get(n.input[2])
            if zp is None or numpy_helper.to_array(zp).any():
                problems.append(f"{where}: zero point must be a constant 0 (symmetric quantization)")
    for inp in g.input:
        dims = inp.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = max_batch
    del g.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        return problems + [f"shape inference failed at batch {max_batch}: {exc}"]
    g = model.graph
    types = {v.name: v.type.tensor_type for v in [*g.input, *g.value_info, *g.output]}
    inputs = {i.name for i in g.input}
    for name, t in types.items():
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if None in dims or not t.HasField("shape"):
            problems.append(f"tensor {name!r}: shape {dims} not static at batch {max_batch}")
        elif _volume(dims) > MAX_ELEMENTS:
            problems.append(f"tensor {name!r}: {_volume(dims)} elements at batch {max_batch}, over TensorRT's 2^31-1")
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    for n in g.node:
        for o in n.output:
            if o in types and o not in outputs and types[o].elem_type == TensorProto.UINT8:
                problems.append(f"tensor {o!r} ({n.op_type}): uint8 is allowed only as a network input or output")
        if n.op_type == "DequantizeLinear":
            x = n.input[0]
            dtype = init[x].data_type if x in init else types[x].elem_type if x in types else TensorProto.INT8
            if dtype != TensorProto.INT8:
                problems.append(f"DequantizeLinear node {n.name!r}: input is {TensorProto.DataType.Name(dtype)}, "
                                "TensorRT dequantizes only INT8 here (keep biases in float: QuantizeBias=False)")
    for name in inputs:
        if types[name].elem_type == TensorProto.UINT8:
            for c in consumers.get(name, []):
                to = next((a.i for a in c.attribute if a.name == "to"), None)
                if c.op_type != "Cast" or to not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                    problems.append(f"uint8 input {name!r} feeds a {c.op_type} node ({c.name!r}): TensorRT takes "
                                    "uint8 only straight into a Cast to float or half")
    for i in g.initializer:
        if _volume(i.dims) > MAX_ELEMENTS:
            problems.append(f"initializer {i.name!r}: over 2^31-1 elements")
    return problems


def _volume(dims) -> int:
    v = 1
    for d in dims:
        v *= int(d)
    return v


# ---------------------------------------------------------------------------- command line

def _add_build_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    p.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB)
    p.add_argument("--timing-cache", default=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spade_edge.export.engine", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an engine with the TensorRT Python API")
    t = sub.add_parser("trtexec-args", help="print the equivalent trtexec arguments, one per line")
    s = sub.add_parser("sidecar", help="write <engine>.json for an engine built elsewhere (trtexec)")
    c = sub.add_parser("check", help="refuse an engine that does not match its ONNX, TensorRT or GPU")
    for p in (b, t):
        p.add_argument("onnx")
        p.add_argument("out")
        _add_build_options(p)
    t.add_argument("--tensorrt-version", default=None, help="the TensorRT the command is for (default: installed)")
    s.add_argument("engine")
    s.add_argument("--onnx", required=True)
    s.add_argument("--tool", default="trtexec")
    _add_build_options(s)
    c.add_argument("engine")
    c.add_argument("--onnx", default=None)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            print(engine_from_onnx(a.onnx, a.out, a.precision, a.max_batch, a.workspace_mb, a.timing_cache))
        elif a.cmd == "trtexec-args":
            version = None if a.tensorrt_version is None else parse_version(a.tensorrt_version)
            print("\n".join(trtexec_args(a.onnx, a.out, a.precision, a.max_batch, a.workspace_mb, a.timing_cache,
                                         version=version)))
        elif a.cmd == "sidecar":
            info = model_info_from_onnx(a.onnx)
            plan = build_plan(a.precision, info.precision)
            write_sidecar(a.engine, a.onnx, a.precision,
                          _build_options(a.precision, a.max_batch, a.workspace_mb, a.timing_cache, plan, a.tool))
            print(sidecar_path(a.engine))
        else:
            rec = check_engine(a.engine, a.onnx)
            print(f"{a.engine}: ok ({rec['engine']['precision']}, TensorRT {rec['tensorrt']}, {rec['gpu']['name']})")
    except (SpadeError, ValueError) as exc:  # refusals and missing extras: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
