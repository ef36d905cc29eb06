"""TensorRT stand-in: a builder and a runtime whose engines run the ONNX model with ONNX Runtime on
the CPU, on the fake CUDA machine shared with the CuPy and pycuda stand-ins.

``__version__`` is ``SPADE_STANDIN_TRT_VERSION`` (default "10.3.0", JetPack 6's); the module
exposes the names and enum values the real bindings of that major version have, as far as
spade-edge uses them (export.trt_plans.TRT_NAMES, TRT10_NAMES, TRT11_NAMES; tests/test_standins.py
compares them with the real bindings). See _builder.py and _runtime.py for what is faithful.
"""

from ._builder import (
    Builder,
    Dims,
    IBuilderConfig,
    IHostMemory,
    INetworkDefinition,
    IOptimizationProfile,
    ITimingCache,
    OnnxParser,
    ParserError,
)
from ._enums import VERSION as __version__
from ._enums import (
    BuilderFlag,
    DataType,
    ErrorCode,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    TensorIOMode,
    nptype,
)
from ._logger import ILogger, Logger
from ._runtime import ICudaEngine, IExecutionContext, Runtime

STANDIN = True

__all__ = [
    "Builder",
    "BuilderFlag",
    "DataType",
    "Dims",
    "ErrorCode",
    "IBuilderConfig",
    "ICudaEngine",
    "IExecutionContext",
    "IHostMemory",
    "ILogger",
    "INetworkDefinition",
    "IOptimizationProfile",
    "ITimingCache",
    "Logger",
    "MemoryPoolType",
    "NetworkDefinitionCreationFlag",
    "OnnxParser",
    "ParserError",
    "Runtime",
    "TensorIOMode",
    "__version__",
    "nptype",
]
