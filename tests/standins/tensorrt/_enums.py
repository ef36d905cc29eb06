"""The version (``SPADE_STANDIN_TRT_VERSION``, default "10.3.0", JetPack 6's) and the enums, with
the members and values of the real bindings of that major version (read from tensorrt-cu12-bindings
10.3.0 and tensorrt-cu13-bindings 11.4.0.106; tests/test_standins.py compares them again).

The enums behave as pybind11's: ``int(x)`` and ``operator.index(x)`` work, ``x == 1`` is False
(only a member equals itself), members of one enum are ordered, ``1 << x`` is a TypeError.
"""

from __future__ import annotations

import enum
import os

import numpy as np

VERSION = os.environ.get("SPADE_STANDIN_TRT_VERSION", "10.3.0")
try:
    MAJOR = int(VERSION.split(".")[0])
except ValueError:
    raise ImportError(f"SPADE_STANDIN_TRT_VERSION must be a version such as 10.3.0, got {VERSION!r}") from None


class StandInEnum(enum.Enum):
    """A pybind11 enum (``py::enum_`` without ``py::arithmetic``)."""

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def _order(self, other, op):
        if type(other) is not type(self):
            return NotImplemented
        return op(self.value, other.value)

    def __lt__(self, other):
        return self._order(other, int.__lt__)

    def __le__(self, other):
        return self._order(other, int.__le__)

    def __gt__(self, other):
        return self._order(other, int.__gt__)

    def __ge__(self, other):
        return self._order(other, int.__ge__)

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


def _enum(name: str, members: dict[str, int]):
    return StandInEnum(name, members, module="tensorrt", qualname=name)


_COMMON = {
    "TensorIOMode": {"NONE": 0, "INPUT": 1, "OUTPUT": 2},
    "MemoryPoolType": {
        "WORKSPACE": 0,
        "DLA_MANAGED_SRAM": 1,
        "DLA_LOCAL_DRAM": 2,
        "DLA_GLOBAL_DRAM": 3,
        "TACTIC_DRAM": 4,
        "TACTIC_SHARED_MEMORY": 5,
    },
    "ErrorCode": {
        "SUCCESS": 0,
        "INTERNAL_ERROR": 1,
        "MEM_ALLOC_FAILED": 2,
        "MODEL_DESERIALIZE_FAILED": 3,
        "INVALID_VALUE": 4,
        "INVALID_GRAPH": 5,
        "INVALID_NODE": 6,
        "UNSUPPORTED_GRAPH": 7,
        "UNSUPPORTED_NODE": 8,
        "UNSUPPORTED_NODE_ATTR": 9,
        "UNSUPPORTED_NODE_INPUT": 10,
        "UNSUPPORTED_NODE_DATATYPE": 11,
        "UNSUPPORTED_NODE_DYNAMIC": 12,
        "UNSUPPORTED_NODE_SHAPE": 13,
    },
}
_BY_MAJOR = {
    10: {
        "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
        "BuilderFlag": {
            "FP16": 0,
            "INT8": 1,
            "DEBUG": 2,
            "GPU_FALLBACK": 3,
            "REFIT": 4,
            "DISABLE_TIMING_CACHE": 5,
            "TF32": 6,
            "SPARSE_WEIGHTS": 7,
            "SAFETY_SCOPE": 8,
            "OBEY_PRECISION_CONSTRAINTS": 9,
            "PREFER_PRECISION_CONSTRAINTS": 10,
            "DIRECT_IO": 11,
            "REJECT_EMPTY_ALGORITHMS": 12,
            "VERSION_COMPATIBLE": 13,
            "EXCLUDE_LEAN_RUNTIME": 14,
            "FP8": 15,
            "ERROR_ON_TIMING_CACHE_MISS": 16,
            "BF16": 17,
            "DISABLE_COMPILATION_CACHE": 18,
            "STRIP_PLAN": 19,
            "REFIT_IDENTICAL": 20,
            "WEIGHT_STREAMING": 21,
            "INT4": 22,
        },
        "DataType": {
            "FLOAT": 0,
            "HALF": 1,
            "INT8": 2,
            "INT32": 3,
            "BOOL": 4,
            "UINT8": 5,
            "FP8": 6,
            "BF16": 7,
            "INT64": 8,
            "INT4": 9,
        },
    },
    11: {  # strongly typed only: no EXPLICIT_BATCH, no precision flags
        "NetworkDefinitionCreationFlag": {
            "STRONGLY_TYPED": 0,
            "PREFER_JIT_PYTHON_PLUGINS": 1,
            "PREFER_AOT_PYTHON_PLUGINS": 2,
        },
        "BuilderFlag": {
            "DEBUG": 2,
            "GPU_FALLBACK": 3,
            "REFIT": 4,
            "DISABLE_TIMING_CACHE": 5,
            "TF32": 6,
            "SPARSE_WEIGHTS": 7,
            "SAFETY_SCOPE": 8,
            "DIRECT_IO": 11,
            "VERSION_COMPATIBLE": 12,
            "EXCLUDE_LEAN_RUNTIME": 13,
            "ERROR_ON_TIMING_CACHE_MISS": 15,
            "DISABLE_COMPILATION_CACHE": 17,
            "STRIP_PLAN": 18,
            "REFIT_IDENTICAL": 19,
            "WEIGHT_STREAMING": 20,
            "STRICT_NANS": 23,
        },
        "DataType": {
            "FLOAT": 0,
            "HALF": 1,
            "INT8": 2,
            "INT32": 3,
            "BOOL": 4,
            "UINT8": 5,
            "FP8": 6,
            "BF16": 7,
            "INT64": 8,
            "INT4": 9,
            "FP4": 10,
            "E8M0": 11,
        },
    },
}
_TABLE = {**_COMMON, **_BY_MAJOR[11 if MAJOR >= 11 else 10]}

TensorIOMode = _enum("TensorIOMode", _TABLE["TensorIOMode"])
MemoryPoolType = _enum("MemoryPoolType", _TABLE["MemoryPoolType"])
ErrorCode = _enum("ErrorCode", _TABLE["ErrorCode"])
NetworkDefinitionCreationFlag = _enum("NetworkDefinitionCreationFlag", _TABLE["NetworkDefinitionCreationFlag"])
BuilderFlag = _enum("BuilderFlag", _TABLE["BuilderFlag"])
DataType = _enum("DataType", _TABLE["DataType"])
Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

_NUMPY = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def nptype(trt_type):
    """The numpy type of a DataType; TypeError for those numpy lacks (BF16, FP8, INT4, ...)."""
    if not isinstance(trt_type, DataType):
        raise TypeError(f"nptype(): incompatible function arguments: expected tensorrt.DataType, got {trt_type!r}")
    if trt_type.name not in _NUMPY:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return _NUMPY[trt_type.name]
