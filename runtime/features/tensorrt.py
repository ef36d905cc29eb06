"""Native TensorRT feature backend: a serialized engine run with ``execute_async_v3`` and named I/O
tensors. Device buffers come from CuPy (pycuda where CuPy is absent), host buffers are pinned, and
one CUDA stream carries copy-in, inference and copy-out. CUDA's current device (CuPy) and context
(pycuda) belong to a thread: every call makes them current in the thread it runs in (the service's
worker, a line adapter's), so loading, inference and closing may each happen on another thread.
The engine has no ONNX metadata: its :class:`ModelInfo` comes from the sidecar ``<engine>.json``,
after :func:`~spade_edge.runtime.engine_record.check_engine` has refused a stale engine.

TensorRT, CuPy and pycuda are imported when a backend is made, never at module import.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..engine_record import check_engine, make_logger
from ..errors import ModelError, require
from ..modelinfo import ModelInfo
from .base import FeatureBackend


class _CupyCuda:
    """Device memory, pinned host memory and one stream, through CuPy."""

    def __init__(self, device: int):
        self.cp = require("cupy", "gpu", "The TensorRT backend")
        self.device_id = device
        with self.activate():
            self.stream = self.cp.cuda.Stream(non_blocking=True)
        self.handle = self.stream.ptr

    @contextmanager
    def activate(self):
        """This device current in the calling thread (CuPy keeps the current device per thread)."""
        with self.cp.cuda.Device(self.device_id):
            yield

    def free(self, buf) -> None:
        """Device memory goes back to CuPy's pool when its array is dropped."""

    def device(self, nbytes: int):
        buf = self.cp.empty(nbytes, dtype=self.cp.uint8)
        return buf, buf.data.ptr

    def pinned(self, shape, dtype) -> np.ndarray:
        import cupyx

        return cupyx.empty_pinned(tuple(shape), dtype)

    def to_device(self, ptr: int, host: np.ndarray, nbytes: int) -> None:
        rt = self.cp.cuda.runtime
        rt.memcpyAsync(ptr, host.ctypes.data, nbytes, rt.memcpyHostToDevice, self.handle)

    def to_host(self, host: np.ndarray, ptr: int, nbytes: int) -> None:
        rt = self.cp.cuda.runtime
        rt.memcpyAsync(host.ctypes.data, ptr, nbytes, rt.memcpyDeviceToHost, self.handle)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.stream = None


class _PycudaCuda:
    """The same through pycuda, in the device's primary context (the one TensorRT uses)."""

    def __init__(self, device: int):
        self.cuda = cuda = require("pycuda.driver", "pycuda", "The TensorRT backend without CuPy")
        cuda.init()
        self.context = cuda.Device(device).retain_primary_context()
        with self.activate():
            self.stream = cuda.Stream()
        self.handle = self.stream.handle

    @contextmanager
    def activate(self):
        """The context current in the calling thread for the duration (CUDA contexts are per thread)."""
        self.context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def free(self, buf) -> None:
        buf.free()

    def device(self, nbytes: int):
        buf = self.cuda.mem_alloc(nbytes)
        return buf, int(buf)

    def pinned(self, shape, dtype) -> np.ndarray:
        return self.cuda.pagelocked_empty(tuple(shape), dtype)

    def to_device(self, ptr: int, host: np.ndarray, nbytes: int) -> None:
        self.cuda.memcpy_htod_async(ptr, host.reshape(-1).view(np.uint8)[:nbytes], self.stream)

    def to_host(self, host: np.ndarray, ptr: int, nbytes: int) -> None:
        self.cuda.memcpy_dtoh_async(host.reshape(-1).view(np.uint8)[:nbytes], ptr, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        if self.context is not None:
            self.stream = None
            self.context.detach()  # releases the primary context retained at start
            self.context = None


def cuda_memory(device: int = 0) -> _CupyCuda | _PycudaCuda:
    """CuPy where installed, else pycuda."""
    import importlib.util

    if importlib.util.find_spec("cupy") is not None or importlib.util.find_spec("pycuda") is None:
        return _CupyCuda(device)
    return _PycudaCuda(device)


class TensorRTBackend(FeatureBackend):
    """Feature extraction through a TensorRT engine built by ``spade-edge build-engine`` or
    jetson/build-engine.sh. Batches larger than the engine's profile are run in slices."""

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, onnx_path: str | os.PathLike | None = None, device: int = 0):
        self._cuda: _CupyCuda | _PycudaCuda | None = None
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, tuple[Any, int]] = {}  # (buffer, device address)
        self.path = Path(engine_path)
        self.device = "tensorrt" if device == 0 else f"tensorrt:{device}"
        record = check_engine(self.path, onnx_path, device=device)
        self.info = ModelInfo.from_json(json.dumps(record["model_info"]))
        trt = require("tensorrt", "trt", "The TensorRT backend")
        self._cuda = cuda_memory(device)
        try:
            with self._cuda.activate():
                self._open(trt)
        except BaseException:
            self.close()
            raise

    def _open(self, trt) -> None:
        assert self._cuda is not None  # set by __init__ before it calls _open
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelError(
                f"{self.path}: TensorRT cannot deserialize this engine: " + "; ".join(self._logger.errors[-3:])
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        expected = {lv.name for lv in self.info.levels} | {self.info.global_name}
        if inputs != [self.info.input_name] or set(self._outputs) != expected:
            raise ModelError(
                f"{self.path}: engine tensors {inputs} -> {self._outputs} do not match its sidecar "
                f"({self.info.input_name} -> {sorted(expected)}); rebuild the engine"
            )
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.info.input_name, 0)[2][0])
        s = self.info.input_size
        if not self.context.set_input_shape(self.info.input_name, (self.max_batch, s, s, 3)):
            raise ModelError(f"{self.path}: the engine refuses input shape {(self.max_batch, s, s, 3)}")
        self._host, self._device = {}, {}
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            self._host[n] = self._cuda.pinned(shape, dtype)
            self._device[n] = self._cuda.device(self._host[n].nbytes)
            self.context.set_tensor_address(n, self._device[n][1])  # fixed addresses: set once

    @classmethod
    def from_path(cls, engine_path, onnx_path=None, device: int = 0) -> TensorRTBackend:
        return cls(engine_path, onnx_path, device)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        assert self._cuda is not None  # _infer checked
        name, n = self.info.input_name, len(batch)
        host_in = self._host[name]
        host_in[:n] = batch
        self._cuda.to_device(self._device[name][1], host_in, batch.nbytes)
        self.context.set_input_shape(name, batch.shape)
        if not self.context.execute_async_v3(self._cuda.handle):
            raise ModelError(f"{self.path}: TensorRT inference failed: " + "; ".join(self._logger.errors[-3:]))
        shapes = {}
        for o in self._outputs:
            shapes[o] = tuple(self.context.get_tensor_shape(o))
            nbytes = int(np.prod(shapes[o])) * self._host[o].itemsize
            self._cuda.to_host(self._host[o], self._device[o][1], nbytes)
        self._cuda.synchronize()
        # copies: the pinned buffers are reused by the next call
        return {
            o: self._host[o].reshape(-1)[: int(np.prod(shapes[o]))].reshape(shapes[o]).copy() for o in self._outputs
        }

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if len(batch) == 0:
            return {o: np.empty((0, *self._host[o].shape[1:]), self._host[o].dtype) for o in self._outputs}
        if self._cuda is None:
            raise ModelError(f"{self.path}: the backend is closed")
        with self._cuda.activate():
            parts = [self._run(batch[s : s + self.max_batch]) for s in range(0, len(batch), self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {o: np.concatenate([p[o] for p in parts]) for o in self._outputs}

    def close(self) -> None:
        """Free the engine and its buffers; from any thread, more than once."""
        if self._cuda is None:
            return
        with self._cuda.activate():
            self.context = self.engine = self._runtime = None
            for buf, _ in self._device.values():
                self._cuda.free(buf)
            self._device, self._host = {}, {}
        self._cuda.close()
        self._cuda = None
