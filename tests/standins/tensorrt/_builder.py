"""The builder side: ``Builder``, ``OnnxParser``, ``IBuilderConfig``, ``IOptimizationProfile``,
``ITimingCache``, ``IHostMemory`` -- what ``spade_edge.export.engine.engine_from_onnx`` calls.

Faithful:
- ``Builder(logger)`` needs a usable GPU: without one, pybind11's TypeError "factory function
  returned nullptr";
- ``create_network(flags)`` takes the bit mask of the version's NetworkDefinitionCreationFlag
  values (another bit: error logged, None); in TensorRT 11 every network is strongly typed;
- the parser really reads the ONNX file (through ONNX Runtime): a file that is not an ONNX model
  fails with parser errors (``num_errors``, ``get_error(i)``);
- ``set_shape`` raises on min > opt > max as the bindings do; ``set_flag`` / ``set_memory_pool_limit``
  take the enums only (TypeError for a plain int, as pybind11);
- ``build_serialized_network`` returns None and logs an error for what TensorRT refuses: no
  network parsed, a dynamic input without a profile or with profile shapes that contradict its
  static dimensions, a profile for a tensor that is no input, precision flags on a strongly typed
  network, a network the runtime cannot run at the profile's shapes;
- timing caches belong to a TensorRT version and GPU: ``set_timing_cache`` refuses another's
  (returns False) unless ``ignore_mismatch``; a build adds to the cache it was given.

Not faithful: no layer is built or timed (the engine runs the ONNX model); the parser accepts
every operator ONNX Runtime runs (which operators TensorRT takes is the business of
export.trt_ops.tensorrt_onnx_problems); ``create_timing_cache`` of bytes that are no cache logs an error
and returns None (believed to be TensorRT's behaviour, not verified on a GPU).
"""

from __future__ import annotations

import os

from . import _plan
from ._enums import (
    MAJOR,
    VERSION,
    BuilderFlag,
    DataType,
    ErrorCode,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
)
from ._enums import nptype as _nptype
from ._logger import check_logger, error, warning
from ._machine import machine

_STRONG = "STRONGLY_TYPED"
_PRECISION_FLAGS = {"FP16", "INT8", "BF16", "FP8", "INT4"}


def gpu_identity() -> dict:
    return {"name": machine.GPU_NAME, "compute_capability": "{}.{}".format(*machine.COMPUTE_CAPABILITY)}


class Dims(tuple):
    """``trt.Dims``: a tuple of ints (equal to the plain tuple)."""


class IHostMemory(bytes):
    """Serialized engine or cache: bytes with ``nbytes`` and ``dtype``, usable as a buffer."""

    @property
    def nbytes(self) -> int:
        return len(self)

    @property
    def dtype(self):
        return DataType.UINT8


class ParserError:
    def __init__(self, code, desc: str, node: int = -1, func: str = "parseGraph"):
        self._code, self._desc, self._node, self._func = code, desc, node, func

    def code(self):
        return self._code

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def func(self) -> str:
        return self._func

    def node_name(self) -> str:
        return ""

    def node_operator(self) -> str:
        return ""

    def __str__(self) -> str:
        return f"In node {self._node} with name:  and operator:  ({self._func}): {self._code.name}: {self._desc}"


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags = flags
        self.strongly_typed = MAJOR >= 11 or bool(flags & (1 << NetworkDefinitionCreationFlag[_STRONG].value))
        self.onnx: bytes | None = None
        self.inputs: list[dict] = []
        self.outputs: list[dict] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_flag(self, flag) -> bool:
        return bool(self.flags & (1 << int(flag)))


class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger):
        if not isinstance(network, INetworkDefinition):
            raise TypeError(f"OnnxParser(): incompatible constructor arguments: network {network!r}")
        check_logger(logger, "OnnxParser")
        self._network, self._logger = network, logger
        self._errors: list[ParserError] = []

    def _fail(self, code, desc: str) -> bool:
        self._errors.append(ParserError(code, desc))
        error(self._logger, f"ModelImporter.cpp: Failed to parse ONNX model: {desc}")
        return False

    def parse(self, model, path: str | None = None) -> bool:
        if self._network.onnx is not None:
            return self._fail(ErrorCode.INVALID_GRAPH, "the network already holds a parsed model")
        data = bytes(model)
        try:
            sess = _plan.session(data)
        except Exception as exc:  # noqa: BLE001 (InvalidProtobuf, InvalidGraph, NotImplemented, ...)
            return self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, str(exc).strip().splitlines()[0])
        try:
            inputs, outputs = _plan.tensors(sess)
        except KeyError as exc:
            return self._fail(ErrorCode.UNSUPPORTED_NODE_DATATYPE, exc.args[0])
        self._network.onnx, self._network.inputs, self._network.outputs = data, inputs, outputs
        return True

    def parse_from_file(self, model: str) -> bool:
        try:
            with open(os.fspath(model), "rb") as f:
                data = f.read()
        except OSError as exc:
            return self._fail(ErrorCode.MODEL_DESERIALIZE_FAILED, f"Failed to open file: {model} ({exc.strerror})")
        return self.parse(data, os.fspath(model))

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError | None:
        return self._errors[index] if 0 <= index < len(self._errors) else None

    def clear_errors(self) -> None:
        self._errors.clear()


class IOptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple[Dims, Dims, Dims]] = {}

    def set_shape(self, input: str, min, opt, max) -> None:
        lo, mid, hi = (Dims(int(d) for d in s) for s in (min, opt, max))
        if not len(lo) == len(mid) == len(hi):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")
        for which, bad in (
            ("min", any(d < 0 for d in lo)),
            ("opt", any(a > b for a, b in zip(lo, mid))),
            ("max", any(a > b for a, b in zip(mid, hi))),
        ):
            if bad:
                raise RuntimeError(f"Shape provided for {which} is inconsistent with other shapes.")
        self.shapes[input] = (lo, mid, hi)

    def get_shape(self, input: str) -> list[Dims]:
        return list(self.shapes.get(input, ()))


class ITimingCache:
    def __init__(self, record: dict):
        self.record = record

    def serialize(self) -> IHostMemory:
        return IHostMemory(_plan.pack_cache(self.record))

    def reset(self) -> bool:
        self.record["entries"] = 0
        return True

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not ignore_mismatch and _owner(input_cache.record) != _owner(self.record):
            return False
        self.record["entries"] += input_cache.record["entries"]
        return True


def _owner(record: dict) -> tuple:
    return _plan.version_key(record["tensorrt"]), record["gpu"]["compute_capability"]


def _new_cache() -> ITimingCache:
    return ITimingCache({"tensorrt": VERSION, "gpu": gpu_identity(), "entries": 0})


class IBuilderConfig:
    def __init__(self, logger):
        self._logger = logger
        self._pools: dict = {}
        self._flags: set = set()
        self.profiles: list[IOptimizationProfile] = []
        self._cache: ITimingCache | None = None

    def set_memory_pool_limit(self, pool, pool_size: int) -> None:
        if not isinstance(pool, MemoryPoolType):
            raise TypeError(f"set_memory_pool_limit(): incompatible function arguments: pool {pool!r}")
        self._pools[pool] = int(pool_size)

    def get_memory_pool_limit(self, pool) -> int:
        return self._pools.get(pool, machine.TOTAL_MEMORY if pool == MemoryPoolType.WORKSPACE else 0)

    def set_flag(self, flag) -> None:
        if not isinstance(flag, BuilderFlag):
            raise TypeError(f"set_flag(): incompatible function arguments: flag {flag!r} is not a tensorrt.BuilderFlag")
        self._flags.add(flag)

    def clear_flag(self, flag) -> None:
        self._flags.discard(flag)

    def get_flag(self, flag) -> bool:
        return flag in self._flags

    @property
    def flags(self) -> int:
        return sum(1 << f.value for f in self._flags)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        if not isinstance(profile, IOptimizationProfile):
            raise TypeError(f"add_optimization_profile(): incompatible function arguments: {profile!r}")
        if not profile.shapes:
            error(
                self._logger,
                "IBuilderConfig::addOptimizationProfile: Error Code 3: API Usage Error (the profile has no shapes)",
            )
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def create_timing_cache(self, serialized_timing_cache) -> ITimingCache | None:
        data = bytes(serialized_timing_cache)
        if not data:
            return _new_cache()
        try:
            return ITimingCache(_plan.unpack_cache(data))
        except ValueError as exc:
            error(self._logger, f"IBuilderConfig::createTimingCache: Error Code 1: Serialization ({exc})")
            return None

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, ITimingCache):
            raise TypeError(f"set_timing_cache(): incompatible function arguments: cache {cache!r}")
        if not ignore_mismatch and _owner(cache.record) != _owner(_new_cache().record):
            warning(
                self._logger,
                f"the timing cache is from TensorRT {cache.record['tensorrt']} on "
                f"{cache.record['gpu']['name']}: not used",
            )
            return False
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        return self._cache


class Builder:
    def __init__(self, logger):
        check_logger(logger, "Builder")
        try:
            self._context = machine.runtime_context()
        except machine.CudaError as exc:
            error(logger, f"CUDA initialization failure with error: {exc.status}")
            raise TypeError("pybind11::init(): factory function returned nullptr") from None
        self.logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition | None:
        valid = sum(1 << m.value for m in NetworkDefinitionCreationFlag)
        if not isinstance(flags, int) or flags & ~valid:
            error(
                self.logger,
                f"Builder::createNetworkV2: Error Code 3: API Usage Error (Parameter check failed, "
                f"condition: flags {flags!r} are not NetworkDefinitionCreationFlag bits of TensorRT "
                f"{VERSION})",
            )
            return None
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig(self.logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        if not isinstance(network, INetworkDefinition) or not isinstance(config, IBuilderConfig):
            raise TypeError("build_serialized_network(): incompatible function arguments")
        problem = _refusal(network, config)
        if problem is None:
            try:
                header = _header(network, config)
            except Exception as exc:  # noqa: BLE001 (the network does not run at the profile's shapes)
                problem = (
                    f"Error Code 10: Internal Error (Could not find any implementation for the network at the "
                    f"profile's shapes: {type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
                )
        if problem is not None:
            error(self.logger, f"Builder::buildSerializedNetwork: {problem}")
            return None
        cache = config.get_timing_cache()
        if cache is not None and not config.get_flag(BuilderFlag.DISABLE_TIMING_CACHE):
            cache.record["entries"] += 1
        return IHostMemory(_plan.pack_engine(header, network.onnx))


def _refusal(network: INetworkDefinition, config: IBuilderConfig) -> str | None:
    """Why TensorRT would not build this, or None."""
    if network.onnx is None or not network.outputs:
        return "Error Code 4: API Usage Error (Network must have at least one output)"
    precision = sorted(f.name for f in config._flags if f.name in _PRECISION_FLAGS)
    if network.strongly_typed and precision:
        return (
            f"Error Code 3: API Usage Error (BuilderFlag {', '.join(precision)} is not allowed for a strongly "
            "typed network: its precision is the model's own)"
        )
    inputs = {i["name"]: i["shape"] for i in network.inputs}
    dynamic = [n for n, s in inputs.items() if -1 in s]
    if dynamic and not config.profiles:
        return (
            "Error Code 4: API Usage Error (Network has dynamic or shape inputs, but no optimization profile has "
            "been defined.)"
        )
    for k, profile in enumerate(config.profiles):
        for name in profile.shapes:
            if name not in inputs:
                return f"Error Code 4: API Usage Error (Optimization profile {k} has shapes for {name!r}, no network input)"
        for name in dynamic:
            if name not in profile.shapes:
                return (
                    f"Error Code 4: API Usage Error (Optimization profile {k} is missing values for dynamic input "
                    f"{name!r})"
                )
        for name, dims in profile.shapes.items():
            declared = inputs[name]
            for which, shape in zip(("min", "opt", "max"), dims):
                if len(shape) != len(declared) or any(d != -1 and d != s for d, s in zip(declared, shape)):
                    return (
                        f"Error Code 4: API Usage Error (Optimization profile {k}: {which} dimensions {tuple(shape)} "
                        f"of input {name!r} are inconsistent with the network's {tuple(declared)})"
                    )
    return None


def _header(network: INetworkDefinition, config: IBuilderConfig) -> dict:
    """The engine's record; runs the network at the profile's min and max shapes to learn the
    outputs' dimensions (those that change with the input are -1, as TensorRT reports them)."""
    sess = _plan.session(network.onnx)
    profiles = [{n: [list(d) for d in dims] for n, dims in p.shapes.items()} for p in config.profiles]
    static = {i["name"]: tuple(i["shape"]) for i in network.inputs}
    first = profiles[0] if profiles else {}
    at_min = _plan.dry_run(
        sess, network.inputs, {n: tuple(first[n][0]) if n in first else s for n, s in static.items()}, _nptype_by_name
    )
    at_max = _plan.dry_run(
        sess, network.inputs, {n: tuple(first[n][2]) if n in first else s for n, s in static.items()}, _nptype_by_name
    )
    outputs = [
        {**o, "shape": [a if a == b else -1 for a, b in zip(at_min[o["name"]], at_max[o["name"]])]}
        for o in network.outputs
    ]
    return {
        "format": 1,
        "tensorrt": VERSION,
        "gpu": gpu_identity(),
        "profiles": profiles,
        "inputs": network.inputs,
        "outputs": outputs,
        "strongly_typed": network.strongly_typed,
        "network_flags": [m.name for m in NetworkDefinitionCreationFlag if network.get_flag(m)],
        "builder_flags": sorted(f.name for f in config._flags),
        "workspace": config.get_memory_pool_limit(MemoryPoolType.WORKSPACE),
    }


def _nptype_by_name(name: str):
    return _nptype(DataType[name])
