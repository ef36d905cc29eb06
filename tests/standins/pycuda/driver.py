"""``pycuda.driver`` stand-in: the CUDA driver API on the fake machine (tests/standins/_standin_cuda.py).

Faithful, because it is where driver-API code goes wrong:
- ``init()`` first, or every call raises LogicError "... failed: initialization error";
- contexts are current per host thread (a stack: ``push()``, the static ``Context.pop()`` that pops
  the calling thread's top context, whatever it is, ``Context.get_current()``);
  ``Device.retain_primary_context()`` returns the device's primary context (the one the runtime API,
  CuPy and TensorRT use) without making it current; ``make_context()`` makes a new one, current;
- every allocation, copy and stream creation needs a context current in the calling thread, else
  LogicError "cuMemcpyHtoDAsync failed: invalid device context" (the driver API, unlike the
  runtime API, never makes one current by itself); the exception classes and the message's first
  line are pycuda's (a second line says what the stand-in saw);
- device pointers are real addresses of registered host memory (``int(mem_alloc(n))``); a copy to
  or from memory that is not live device memory of the current context, or too small, raises
  LogicError "... invalid argument"; a stream of another context "invalid resource handle";
- asynchronous copies from and to page-locked memory run when the stream is synchronized.

Stricter than CUDA: memory of another context is refused even where unified addressing would let
the copy through. Not provided: ``pycuda.autoinit`` (spade-edge must not depend on it),
events, textures, ``gpuarray``; ``pycuda.compiler.SourceModule`` is in compiler.py.
"""

from __future__ import annotations

import weakref

import numpy as np

from ._machine import machine

STANDIN = True
_initialised = False


class Error(Exception):
    """pycuda._driver.Error: the base of pycuda's CUDA exceptions."""


class LogicError(Error):
    pass


class LaunchError(Error):
    pass


class MemoryError(Error):
    pass


class RuntimeError(Error):
    pass


_CLASSES = {machine.NO_DEVICE: RuntimeError, machine.ILLEGAL_ADDRESS: LaunchError}


def _fail(function: str, exc: machine.CudaError):
    cls = _CLASSES.get(exc.status, LogicError)
    return cls(f"{function} failed: {exc.description}" + (f"\n[stand-in] {exc.detail}" if exc.detail else ""))


class _Call:
    """``with _Call("cuMemAlloc") as call:`` turns the machine's CudaError into pycuda's exception
    named after the driver function; ``call.context()`` is the current context or the error a
    driver call without one gets."""

    def __init__(self, function: str, needs_init: bool = True):
        self.function = function
        if needs_init and not _initialised:
            raise LogicError(f"{function} failed: initialization error\n[stand-in] pycuda.driver.init() was not called")

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, machine.CudaError):
            raise _fail(self.function, exc) from None
        return False

    def context(self) -> machine.Context:
        ctx = machine.current_context()
        if ctx is None:
            raise _fail(self.function, machine.CudaError(machine.INVALID_CONTEXT, machine.describe_current()))
        if not ctx.alive:
            raise _fail(self.function, machine.CudaError(machine.INVALID_CONTEXT, f"{ctx} was destroyed"))
        return ctx


def init(flags: int = 0) -> None:
    global _initialised
    if machine.GPU_COUNT == 0:
        raise RuntimeError("cuInit failed: no CUDA-capable device is detected\n[stand-in] SPADE_STANDIN_GPUS=0")
    _initialised = True


# ---------------------------------------------------------------------------- devices and contexts


class Device:
    def __init__(self, number: int):
        with _Call("cuDeviceGet"):
            machine.check_device(number)
        self.number = int(number)

    @staticmethod
    def count() -> int:
        _Call("cuDeviceGetCount")
        return machine.GPU_COUNT

    def name(self) -> str:
        return machine.GPU_NAME

    def compute_capability(self) -> tuple[int, int]:
        return machine.COMPUTE_CAPABILITY

    def total_memory(self) -> int:
        return machine.TOTAL_MEMORY

    def retain_primary_context(self) -> Context:
        return Context(machine.PRIMARY[self.number])

    def make_context(self, flags: int = 0) -> Context:
        ctx = Context(machine.Context(self.number, primary=False))
        ctx.push()
        return ctx

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and other.number == self.number

    def __hash__(self) -> int:
        return hash(("Device", self.number))

    def __repr__(self) -> str:
        return f"<pycuda.driver.Device {self.number}>"


class Context:
    """A handle on a machine context (several handles may name the same context)."""

    def __init__(self, ctx: machine.Context):
        self._ctx = ctx
        self._detached = False

    @property
    def handle(self) -> int:
        return self._ctx.handle

    def push(self) -> None:
        with _Call("cuCtxPushCurrent"):
            if self._detached:
                raise machine.CudaError(machine.INVALID_CONTEXT, "this Context was detached")
            machine.push_context(self._ctx)

    @staticmethod
    def pop() -> None:
        """Pops the calling thread's current context, whichever it is (pycuda's is static too)."""
        with _Call("cuCtxPopCurrent"):
            machine.pop_context()

    @staticmethod
    def get_current() -> Context | None:
        ctx = machine.current_context()
        return None if ctx is None else Context(ctx)

    @staticmethod
    def get_device() -> Device:
        with _Call("cuCtxGetDevice") as call:
            return Device(call.context().device)

    @staticmethod
    def synchronize() -> None:
        with _Call("cuCtxSynchronize") as call:
            machine.synchronize_context(call.context())

    def detach(self) -> None:
        """Release this handle; if its context is current in this thread, it is popped first."""
        with _Call("cuCtxDetach"):
            if machine.current_context() is self._ctx:
                machine.pop_context()
            if not self._ctx.primary:
                self._ctx.alive = False
            self._detached = True

    def __eq__(self, other) -> bool:
        return isinstance(other, Context) and other._ctx is self._ctx

    def __hash__(self) -> int:
        return hash(self._ctx.handle)

    def __repr__(self) -> str:
        return f"<pycuda.driver.Context {self._ctx}>"


# ---------------------------------------------------------------------------- streams


class Stream:
    def __init__(self, flags: int = 0):
        with _Call("cuStreamCreate") as call:
            self._stream = machine.create_stream(call.context(), blocking=not flags & 1)  # 1: CU_STREAM_NON_BLOCKING
        self.handle = self._stream.handle
        weakref.finalize(self, machine.destroy_stream, self._stream)

    def synchronize(self) -> None:
        with _Call("cuStreamSynchronize"):
            self._stream.synchronize()

    def is_done(self) -> bool:
        return self._stream.pending == 0

    def __repr__(self) -> str:
        return f"<pycuda.driver.Stream 0x{self.handle:x}>"


# ---------------------------------------------------------------------------- memory


class DeviceAllocation:
    """``mem_alloc``'s result: ``int()`` is the address; freed by ``free()`` or garbage collection."""

    def __init__(self, buf: np.ndarray):
        self._buf = buf
        self._ptr = buf.ctypes.data
        self._alloc = machine.find(self._ptr)

    def __int__(self) -> int:  # also once freed, as pycuda: using it then is the caller's bug
        return self._ptr

    __index__ = __int__

    def free(self) -> None:
        if self._buf is not None:
            machine.unregister(self._alloc)
            self._buf = None

    def __repr__(self) -> str:
        return f"<pycuda.driver.DeviceAllocation 0x{self._ptr:x}>"


def mem_alloc(nbytes: int) -> DeviceAllocation:
    with _Call("cuMemAlloc") as call:
        ctx = call.context()
        if int(nbytes) <= 0:
            raise machine.CudaError(machine.INVALID_VALUE, f"{nbytes} bytes")
        return DeviceAllocation(machine.allocate(int(nbytes), ctx))


def pagelocked_empty(shape, dtype, order="C", mem_flags=0) -> np.ndarray:
    with _Call("cuMemHostAlloc") as call:
        call.context()  # page-locked memory is allocated through a context, so it needs one
    dtype = np.dtype(dtype)
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    buf = machine.allocate(max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize), None, kind="pinned")
    return np.ndarray(shape, dtype, buffer=buf, order=order)


def pagelocked_zeros(shape, dtype, order="C", mem_flags=0) -> np.ndarray:
    out = pagelocked_empty(shape, dtype, order, mem_flags)
    out[...] = 0
    return out


def _host(buffer, writable: bool) -> np.ndarray:
    """The host side of a copy: a contiguous buffer (as pycuda requires), as a byte array."""
    arr = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, np.uint8)
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        raise BufferError("ndarray is not contiguous")
    if writable and not arr.flags.writeable:
        raise BufferError("the destination buffer is read-only")
    return arr


def _copy(function: str, dst: int, src: int, nbytes: int, device_side: str, host: np.ndarray, stream, sync: bool):
    with _Call(function) as call:
        ctx = call.context()
        s = None if stream is None else machine.stream_for(stream.handle, ctx, function)
        dev_ptr = dst if device_side == "dst" else src
        dev_alloc = machine.check_device_memory(dev_ptr, nbytes, ctx, f"{function} {device_side}")
        pinned = machine.check_host_memory(host.ctypes.data, nbytes, f"{function} host buffer")
        if device_side == "dst":
            machine.count_h2d(nbytes)

        def work(keep_alive=host):  # the host array lives until the queued copy has run
            machine.still_live(dev_alloc, function)
            machine.still_live(pinned, function)
            machine.memmove(dst, src, nbytes)

        if sync or (pinned is None and s is not None):  # pageable memory: CUDA copies before returning
            if s is not None:
                s.synchronize()
            machine.submit(None, ctx, work, function)
        else:
            machine.submit(s, ctx, work, function)


def memcpy_htod_async(dest, src, stream: Stream | None = None) -> None:
    host = _host(src, writable=False)
    _copy("cuMemcpyHtoDAsync", int(dest), host.ctypes.data, host.nbytes, "dst", host, stream, sync=False)


def memcpy_dtoh_async(dest, src, stream: Stream | None = None) -> None:
    host = _host(dest, writable=True)
    _copy("cuMemcpyDtoHAsync", host.ctypes.data, int(src), host.nbytes, "src", host, stream, sync=False)


def memcpy_htod(dest, src) -> None:
    host = _host(src, writable=False)
    _copy("cuMemcpyHtoD", int(dest), host.ctypes.data, host.nbytes, "dst", host, None, sync=True)


def memcpy_dtoh(dest, src) -> None:
    host = _host(dest, writable=True)
    _copy("cuMemcpyDtoH", host.ctypes.data, int(src), host.nbytes, "src", host, None, sync=True)
