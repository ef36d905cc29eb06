"""What a TensorRT version needs to build an engine of a given precision, and every TensorRT name
spade-edge uses.

TensorRT 10 and 11 part ways on precision, and only there (:func:`build_plan`):

- TensorRT 11 builds every network strongly typed: precision is the model's own (an FP16 ONNX for
  fp16, an INT8 Q/DQ ONNX for int8; ``calibration/``). It has no FP16/INT8 builder flags and no
  EXPLICIT_BATCH flag, and a mismatched request is refused rather than rewritten.
- TensorRT 10 (JetPack 6 ships 10.3): explicit batch; ``BuilderFlag.FP16`` lets an fp32 model run in
  half precision, and a Q/DQ int8 model builds with ``BuilderFlag.INT8`` set.

Every TensorRT name this package and the runtime use is listed below, by the path that reaches it;
``tests/export/test_tensorrt_api.py`` checks the lists against the real bindings of each version.
Plain data and string logic: the Python build (``engine.py``) and the trtexec command line
(``trtexec.py``) share it, so both builds agree.
"""

from __future__ import annotations

import dataclasses

from spade_edge.runtime import engine_record
from spade_edge.runtime.engine_record import EngineError
from spade_edge.runtime.modelinfo import ModelInfo

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 8
DEFAULT_WORKSPACE_MB = 1024  # ample for these convnets; a Jetson shares this memory with the CPU

# TensorRT names used on every version (attributes of the module, or members of its classes)
TRT_NAMES = (
    "__version__",
    "ILogger",
    "ILogger.Severity",
    "ILogger.log",
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "OnnxParser",
    "OnnxParser.parse_from_file",
    "OnnxParser.num_errors",
    "OnnxParser.get_error",
    "NetworkDefinitionCreationFlag",
    "BuilderFlag",
    "MemoryPoolType.WORKSPACE",
    "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.set_flag",
    "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache",
    "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize",
    "IOptimizationProfile.set_shape",
    # runtime/features/tensorrt.py
    "Runtime",
    "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.create_execution_context",
    "TensorIOMode.INPUT",
    "TensorIOMode.OUTPUT",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
    "nptype",
)
# reached only through _plan_trt10 / _plan_trt11 (the names a plan returns are resolved against these)
TRT10_NAMES = ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "BuilderFlag.FP16", "BuilderFlag.INT8")
TRT11_NAMES = ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",)


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
    flags = {
        ("fp32", "fp32"): (),
        ("fp16", "fp32"): ("FP16",),
        ("fp16", "fp16"): ("FP16",),
        ("int8", "int8"): ("INT8", "FP16"),
    }
    if (precision, model_precision) not in flags:
        hint = (
            "TensorRT has no implicit INT8 calibration here: calibrate first ('spade-edge calibrate "
            "--precision int8') and build the Q/DQ model"
            if precision == "int8"
            else f"build the {precision} engine from the fp32 model"
            if precision != "fp32"
            else f"ask for --precision {model_precision}, or build from the fp32 model"
        )
        raise EngineError(f"a {precision} engine cannot be built from a {model_precision} model: {hint}")
    chosen = flags[(precision, model_precision)]
    return BuildPlan(
        ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH",),
        tuple(f"BuilderFlag.{f}" for f in chosen),
        tuple(f"--{f.lower()}" for f in chosen),
    )


def _plan_trt11(precision: str, model_precision: str) -> BuildPlan:
    """TensorRT 11: strongly typed, precision is the model's; no precision flags exist."""
    if precision != model_precision:
        make = {
            "fp16": "'spade-edge calibrate --precision fp16'",
            "int8": "'spade-edge calibrate --precision int8'",
            "fp32": "'spade-edge export'",
        }[precision]
        raise EngineError(
            f"TensorRT 11 builds strongly typed networks, so the precision comes from the model: this "
            f"model is {model_precision}, not {precision}. Make a {precision} model with {make} and "
            f"build from it, or ask for --precision {model_precision}"
        )
    return BuildPlan(("NetworkDefinitionCreationFlag.STRONGLY_TYPED",), (), ("--stronglyTyped",))


def build_plan(precision: str, model_precision: str, version=None) -> BuildPlan:
    """The one place where TensorRT 10 and 11 part ways (``version``: default the installed one)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    version = engine_record.tensorrt_version() if version is None else version
    if version.major < 10:
        raise EngineError(f"TensorRT {version} is too old: spade-edge needs TensorRT 10.3 or later (JetPack 6)")
    plan = _plan_trt11 if version.major >= 11 else _plan_trt10
    return plan(precision, model_precision)


def resolve(trt, dotted: str):
    """``trt.A.B`` for ``dotted`` "A.B" (a name a plan returns)."""
    obj = trt
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def input_shape(info: ModelInfo, batch: int) -> tuple[int, int, int, int]:
    """The model's input shape (uint8 NHWC) at ``batch`` images: the optimization profile's corners."""
    return (batch, info.input_size, info.input_size, 3)
