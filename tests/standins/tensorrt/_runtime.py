"""The runtime side: ``Runtime``, ``ICudaEngine``, ``IExecutionContext`` -- what
runtime/features/tensorrt.py calls. The engine runs its ONNX model with ONNX Runtime, reading the
inputs from and writing the outputs to the tensor addresses (real host memory of the fake machine).

Faithful, with TensorRT's answers (None / False and an error logged, never an exception):
- ``deserialize_cuda_engine`` refuses bytes that are no engine, an engine of another TensorRT
  version (engines do not move between versions) or GPU; the engine belongs to the CUDA context
  current at deserialization (the runtime API's: see _standin_cuda.py);
- name-based I/O: ``num_io_tensors``, ``get_tensor_name/mode/dtype/shape`` (-1 for dynamic
  dimensions), ``get_tensor_profile_shape`` -> [min, opt, max]; ``set_input_shape`` is False
  outside the profile; output shapes follow the input shapes;
- ``set_tensor_address``: False for an unknown name or an address not 256-byte aligned (the
  alignment TensorRT's header requires);
- ``execute_async_v3(stream_handle)`` takes an int handle (a Stream object: TypeError, as
  pybind11), and fails when the calling thread's current context is not the engine's (another
  device current, or another context pushed), when the stream is not a live stream of that
  context, when an input shape or a tensor address is missing; the work is queued on the stream and
  runs when it is synchronized (handle 0, the default stream: at once, with TensorRT's warning).

Stricter than TensorRT, which would read or write out of bounds or race instead: every address
must be live device memory of the engine's context, large enough for the tensor at its current
shape; an execution context may not be enqueued from two threads at once, nor on a second stream
while its work on the first is still queued.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from . import _plan
from ._builder import Dims, gpu_identity
from ._enums import VERSION, DataType, TensorIOMode, nptype
from ._logger import check_logger, error, warning
from ._machine import machine

ADDRESS_ALIGNMENT = 256


class Runtime:
    def __init__(self, logger):
        check_logger(logger, "Runtime")
        if machine.GPU_COUNT == 0:
            error(logger, f"CUDA initialization failure with error: {machine.NO_DEVICE}")
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine) -> ICudaEngine | None:
        where = "IRuntime::deserializeCudaEngine"
        try:
            ctx = machine.runtime_context()
        except machine.CudaError as exc:
            error(self.logger, f"{where}: Error Code 1: Cuda Runtime ({exc.description})")
            return None
        try:
            header, onnx = _plan.unpack_engine(bytes(memoryview(serialized_engine)))
        except ValueError as exc:
            error(self.logger, f"{where}: Error Code 1: Serialization ({exc})")
            return None
        if _plan.version_key(header["tensorrt"]) != _plan.version_key(VERSION):
            error(
                self.logger,
                f"{where}: Error Code 1: Serialization (Serialization assertion stdVersionRead == "
                f"kSERIALIZATION_VERSION failed.Version tag does not match. Note: Current Version: "
                f"{VERSION}, Serialized Engine Version: {header['tensorrt']})",
            )
            return None
        here = gpu_identity()
        if header["gpu"]["compute_capability"] != here["compute_capability"]:
            error(
                self.logger,
                f"{where}: Error Code 1: Serialization (The engine plan file is generated on an "
                f"incompatible device, expecting compute {header['gpu']['compute_capability']} got "
                f"compute {here['compute_capability']}, please rebuild.)",
            )
            return None
        return ICudaEngine(header, onnx, ctx, self.logger)


class ICudaEngine:
    def __init__(self, header: dict, onnx: bytes, context: machine.Context, logger):
        self._header, self._context, self._logger = header, context, logger
        self._session = _plan.session(onnx)
        self._io = {t["name"]: (TensorIOMode.INPUT, t) for t in header["inputs"]}
        self._io.update({t["name"]: (TensorIOMode.OUTPUT, t) for t in header["outputs"]})
        self._names = list(self._io)
        self._shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}  # input shapes -> output shapes
        self._shapes_lock = threading.Lock()

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self._header["profiles"]))

    @property
    def name(self) -> str:
        return "stand-in engine"

    def get_tensor_name(self, index: int) -> str | None:
        if not 0 <= index < len(self._names):
            error(
                self._logger,
                f"ICudaEngine::getIOTensorName: Error Code 3: API Usage Error (index {index} out of "
                f"range [0, {len(self._names)}))",
            )
            return None
        return self._names[index]

    def get_tensor_mode(self, name: str):
        return self._io[name][0] if name in self._io else TensorIOMode.NONE

    def _tensor(self, name: str, where: str) -> dict | None:
        if name not in self._io:
            error(self._logger, f"{where}: Error Code 3: API Usage Error (no input or output tensor named {name!r})")
            return None
        return self._io[name][1]

    def get_tensor_dtype(self, name: str):
        t = self._tensor(name, "ICudaEngine::getTensorDataType")
        return DataType.FLOAT if t is None else DataType[t["dtype"]]

    def get_tensor_shape(self, name: str) -> Dims:
        t = self._tensor(name, "ICudaEngine::getTensorShape")
        return Dims(()) if t is None else Dims(t["shape"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        profiles = self._header["profiles"]
        if self.get_tensor_mode(name) != TensorIOMode.INPUT or not 0 <= profile_index < max(1, len(profiles)):
            error(
                self._logger,
                f"ICudaEngine::getProfileShape: Error Code 3: API Usage Error ({name!r} is not an "
                f"input, or profile {profile_index} does not exist)",
            )
            return []
        if profiles and name in profiles[profile_index]:
            return [Dims(d) for d in profiles[profile_index][name]]
        static = Dims(self._io[name][1]["shape"])  # a static input: the same shape three times
        return [static, static, static]

    def create_execution_context(self) -> IExecutionContext | None:
        try:
            ctx = machine.runtime_context()
        except machine.CudaError as exc:
            error(self._logger, f"ICudaEngine::createExecutionContext: Error Code 1: Cuda Runtime ({exc.description})")
            return None
        if ctx is not self._context:
            error(
                self._logger,
                f"ICudaEngine::createExecutionContext: Error Code 1: Cuda Runtime (invalid resource "
                f"handle)\n[stand-in] the engine belongs to {self._context}; "
                f"{machine.describe_current()}",
            )
            return None
        return IExecutionContext(self)

    def output_shapes(self, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The outputs' shapes for these input shapes (a dry run, remembered)."""
        key = tuple(sorted(inputs.items()))
        with self._shapes_lock:
            if key not in self._shapes:
                self._shapes[key] = _plan.dry_run(
                    self._session, self._header["inputs"], inputs, lambda n: nptype(DataType[n])
                )
            return self._shapes[key]


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self._engine = engine
        self._logger = engine._logger
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._addresses: dict[str, int] = {}
        self._enqueue = threading.Lock()
        self._queued_on = None  # the machine stream holding this context's unfinished work
        self._queued = 0

    @property
    def engine(self) -> ICudaEngine:
        return self._engine

    def set_input_shape(self, name: str, shape) -> bool:
        where = "IExecutionContext::setInputShape"
        if self._engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            error(self._logger, f"{where}: Error Code 3: API Usage Error ({name!r} is not an input tensor)")
            return False
        shape = tuple(int(d) for d in shape)
        lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            error(
                self._logger,
                f"{where}: Error Code 3: API Usage Error (Parameter check failed, condition: "
                f"shape {shape} of {name!r} within the optimization profile's [{tuple(lo)}, {tuple(hi)}])",
            )
            return False
        self._shapes[name] = shape
        return True

    def _input_shapes(self) -> dict[str, tuple[int, ...]] | None:
        shapes = {}
        for t in self._engine._header["inputs"]:
            shape = self._shapes.get(t["name"], tuple(t["shape"]))
            if -1 in shape:
                return None
            shapes[t["name"]] = shape
        return shapes

    def get_tensor_shape(self, name: str) -> Dims:
        mode = self._engine.get_tensor_mode(name)
        if mode == TensorIOMode.INPUT:
            return Dims(self._shapes.get(name, self._engine.get_tensor_shape(name)))
        if mode == TensorIOMode.OUTPUT:
            inputs = self._input_shapes()
            return (
                self._engine.get_tensor_shape(name)
                if inputs is None
                else Dims(self._engine.output_shapes(inputs)[name])
            )
        error(self._logger, f"IExecutionContext::getTensorShape: Error Code 3: API Usage Error (no tensor {name!r})")
        return Dims(())

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if not isinstance(memory, (int, np.integer)):
            raise TypeError(f"set_tensor_address(): incompatible function arguments: memory {memory!r} is not an int")
        where = "IExecutionContext::setTensorAddress"
        if self._engine.get_tensor_mode(name) == TensorIOMode.NONE:
            error(self._logger, f"{where}: Error Code 3: API Usage Error (no input or output tensor named {name!r})")
            return False
        if int(memory) % ADDRESS_ALIGNMENT:
            error(
                self._logger,
                f"{where}: Error Code 3: API Usage Error (Parameter check failed, condition: address "
                f"0x{int(memory):x} of tensor {name!r} is {ADDRESS_ALIGNMENT}-byte aligned)",
            )
            return False
        self._addresses[name] = int(memory)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        if not isinstance(stream_handle, (int, np.integer)) or isinstance(stream_handle, bool):
            raise TypeError(
                "execute_async_v3(): incompatible function arguments. The following argument types are "
                "supported:\n    1. (self: tensorrt.IExecutionContext, stream_handle: int) -> bool\n\n"
                f"Invoked with: {stream_handle!r}"
            )
        if not self._enqueue.acquire(blocking=False):
            error(
                self._logger,
                "IExecutionContext::enqueueV3: Error Code 1: Internal Error\n[stand-in] this execution "
                "context is being enqueued from another thread at the same time",
            )
            return False
        try:
            problem = self._enqueue_v3(int(stream_handle))
        finally:
            self._enqueue.release()
        if problem:
            error(self._logger, f"IExecutionContext::enqueueV3: {problem}")
            return False
        return True

    def _enqueue_v3(self, handle: int) -> str | None:
        """Check everything TensorRT (or the GPU) would trip over, then queue the inference."""
        engine = self._engine
        try:
            ctx = machine.runtime_context()
        except machine.CudaError as exc:
            return f"Error Code 1: Cuda Runtime ({exc.description})"
        if ctx is not engine._context:
            return (
                f"Error Code 1: Cuda Runtime (invalid resource handle)\n[stand-in] the engine belongs to "
                f"{engine._context}, but {ctx} is the runtime's context in thread "
                f"{threading.current_thread().name!r}: make the engine's device current (cudaSetDevice / "
                "cupy.cuda.Device.use) or push its context (pycuda) in the calling thread"
            )
        try:
            stream = machine.stream_for(handle, ctx, "enqueueV3")
        except machine.CudaError as exc:
            return f"Error Code 1: Cuda Runtime ({exc.description})\n[stand-in] {exc.detail}"
        if stream is None:
            warning(
                self._logger,
                "Using default stream in enqueueV3() may lead to performance issues due to additional "
                "calls to cudaStreamSynchronize() by TensorRT to ensure correct synchronization. "
                "Please use non-default stream instead.",
            )
        if self._queued and self._queued_on is not stream:
            return (
                "Error Code 1: Internal Error\n[stand-in] this execution context still has an inference queued on "
                f"{self._queued_on}: synchronize it before enqueueing on another stream"
            )
        inputs = self._input_shapes()
        if inputs is None:
            missing = [t["name"] for t in engine._header["inputs"] if -1 in self.get_tensor_shape(t["name"])]
            return (
                f"Error Code 3: API Usage Error (Parameter check failed, condition: all input shapes specified; "
                f"{missing} are not: call set_input_shape)"
            )
        shapes = {**inputs, **engine.output_shapes(inputs)}
        plan = []
        for name in engine._names:
            mode, t = engine._io[name]
            address = self._addresses.get(name, 0)
            kind = "input" if mode == TensorIOMode.INPUT else "output"
            if not address:
                return (
                    f"Error Code 3: API Usage Error (Parameter check failed. Neither address or allocator is set "
                    f"for {kind} tensor {name}. Call setTensorAddress before enqueue/execute.)"
                )
            dtype = np.dtype(nptype(DataType[t["dtype"]]))
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * dtype.itemsize
            try:
                alloc = machine.check_device_memory(
                    address, nbytes, ctx, f"{kind} tensor {name!r} address", foreign=machine.ILLEGAL_ADDRESS
                )
            except machine.CudaError as exc:
                return f"Error Code 1: Cuda Runtime ({exc.description})\n[stand-in] {exc.detail}"
            plan.append((name, mode, address, shapes[name], dtype, nbytes, alloc))
        self._queued_on = stream
        self._queued += 1
        try:
            machine.submit(stream, ctx, lambda: self._run(plan), "TensorRT inference")
        except Exception as exc:  # noqa: BLE001 (on the default stream it ran at once, and failed)
            return f"Error Code 1: Cuda Runtime ({type(exc).__name__}: {exc})"
        return None

    def _run(self, plan) -> None:
        """The queued inference: read the inputs, run ONNX Runtime, write the outputs."""
        try:
            feeds, outs = {}, []
            for name, mode, address, shape, dtype, nbytes, alloc in plan:
                machine.still_live(alloc, f"TensorRT tensor {name!r}")
                if mode == TensorIOMode.INPUT:
                    raw = (ctypes.c_uint8 * nbytes).from_address(address)
                    feeds[name] = np.frombuffer(raw, dtype).reshape(shape).copy()
                else:
                    outs.append((name, address, shape, dtype, nbytes))
            results = self._engine._session.run([o[0] for o in outs], feeds)
            for (name, address, shape, dtype, nbytes), y in zip(outs, results):
                if tuple(y.shape) != tuple(shape) or y.dtype != dtype:
                    raise RuntimeError(f"output {name!r} came out {y.dtype}{y.shape}, expected {dtype}{shape}")
                y = np.ascontiguousarray(y)
                machine.memmove(address, y.ctypes.data, nbytes)
        finally:
            self._queued -= 1
