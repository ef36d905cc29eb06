"""The fake CUDA machine behind the CuPy, pycuda and TensorRT stand-ins: one module, so that the
three agree on devices, contexts, memory and streams as the real packages do through one driver.

What it models, as CUDA does:

- Devices: ``SPADE_STANDIN_GPUS`` of them (default 1; read once, as CUDA reads the hardware once),
  all alike: "Stand-in GPU (numpy)", compute capability 8.7 (an Orin).
- Contexts, current per host thread: each thread has a driver context stack (pycuda's push/pop)
  and a runtime "current device" (CuPy's ``Device.use()``, ``cudaSetDevice``), default 0. A
  runtime-API call (CuPy, TensorRT) on a thread whose stack is empty makes the primary context of
  the thread's current device current, as the CUDA runtime does; a driver-API call (pycuda) does
  not: without a pushed context it fails with "invalid device context".
- Memory: every device or pinned allocation is real host memory (numpy), 512-byte aligned as
  CuPy's pool and cuMemAlloc give it, registered by address range with the context it belongs to,
  and unregistered when it is freed, so pointer-based calls can be checked: the address must be
  live memory of the right kind, of the current context, and large enough.
- Streams: work queued on a stream runs, in order, when the stream is synchronized (or when later
  work on the null stream or a synchronous copy has to wait for it). Forgetting to synchronize
  before reading a result therefore reads stale memory here too. Work on the null stream (handle 0)
  runs at once, after the blocking streams of its context, as the legacy default stream does.
  An error in queued work is raised by the synchronize that runs it.

Stricter than CUDA, on purpose (each would be a bug in spade-edge's one-device-per-backend use):
memory of another context is refused even where unified addressing or peer access would let a
copy through.

Not modelled: timing, concurrency between streams (queues run in the synchronizing thread),
memory limits, events, graphs.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

STANDIN = True
ALIGNMENT = 512  # CuPy's pool rounds to 512 bytes; cuMemAlloc aligns to at least 256
GPU_NAME = "Stand-in GPU (numpy)"
COMPUTE_CAPABILITY = (8, 7)  # Jetson Orin
TOTAL_MEMORY = 8 << 30


def _gpu_count() -> int:
    text = os.environ.get("SPADE_STANDIN_GPUS", "1")
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"SPADE_STANDIN_GPUS must be a number of GPUs, got {text!r}") from None
    if n < 0:
        raise ValueError(f"SPADE_STANDIN_GPUS cannot be negative, got {n}")
    return n


GPU_COUNT = _gpu_count()


# ---------------------------------------------------------------------------- errors

# key: (cudaError_t name, CUresult name, description); the numbers are the same in both APIs
ERRORS = {
    1: ("cudaErrorInvalidValue", "CUDA_ERROR_INVALID_VALUE", "invalid argument"),
    3: ("cudaErrorInitializationError", "CUDA_ERROR_NOT_INITIALIZED", "initialization error"),
    100: ("cudaErrorNoDevice", "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"),
    101: ("cudaErrorInvalidDevice", "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"),
    201: ("cudaErrorDeviceUninitialized", "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"),
    400: ("cudaErrorInvalidResourceHandle", "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"),
    500: ("cudaErrorSymbolNotFound", "CUDA_ERROR_NOT_FOUND", "named symbol not found"),
    700: ("cudaErrorIllegalAddress", "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"),
}
INVALID_VALUE, NOT_INITIALIZED, NO_DEVICE, INVALID_DEVICE = 1, 3, 100, 101
INVALID_CONTEXT, INVALID_HANDLE, NOT_FOUND, ILLEGAL_ADDRESS = 201, 400, 500, 700


class CudaError(Exception):
    """A CUDA error code and what the stand-in saw; each package turns it into its own exception
    (CuPy's CUDARuntimeError, pycuda's LogicError, a TensorRT log line)."""

    def __init__(self, status: int, detail: str = ""):
        self.status, self.detail = status, detail
        self.runtime_name, self.driver_name, self.description = ERRORS[status]
        super().__init__(f"{self.runtime_name}: {self.description}" + (f"\n[stand-in] {detail}" if detail else ""))


# ---------------------------------------------------------------------------- devices and contexts


def check_device(device: int) -> None:
    if GPU_COUNT == 0:
        raise CudaError(NO_DEVICE, "SPADE_STANDIN_GPUS=0")
    if not isinstance(device, (int, np.integer)) or not 0 <= device < GPU_COUNT:
        raise CudaError(INVALID_DEVICE, f"device {device!r}, this machine has {GPU_COUNT}")


_handles = itertools.count(0x7A000000, 0x100)  # fake handle values: nonzero, recognisable


class Context:
    """A CUDA context: the primary one of its device (what the runtime API, CuPy and TensorRT use,
    and pycuda's retain_primary_context) or one made by pycuda's make_context."""

    def __init__(self, device: int, primary: bool):
        self.device, self.primary = device, primary
        self.handle = next(_handles)
        self.alive = True

    def __repr__(self) -> str:
        kind = "primary context" if self.primary else "context"
        return f"<stand-in {kind} of device {self.device}>"


PRIMARY = [Context(i, True) for i in range(GPU_COUNT)]


class _Thread(threading.local):
    def __init__(self):
        self.stack: list[Context] = []  # driver context stack, top last
        self.device = 0  # the runtime's current device (cudaSetDevice)


_thread = _Thread()


def current_context() -> Context | None:
    """The driver API's view (cuCtxGetCurrent): the top of this thread's stack, or None."""
    return _thread.stack[-1] if _thread.stack else None


def runtime_context() -> Context:
    """The runtime API's view: the current context, or else the primary context of the thread's
    current device, made current now (what cudaSetDevice / the first runtime call does)."""
    if GPU_COUNT == 0:
        raise CudaError(NO_DEVICE, "SPADE_STANDIN_GPUS=0")
    if not _thread.stack:
        _thread.stack.append(PRIMARY[_thread.device])
    top = _thread.stack[-1]
    if not top.alive:
        raise CudaError(INVALID_CONTEXT, f"{top} was destroyed")
    return top


def set_device(device: int) -> None:
    """cudaSetDevice: the primary context of ``device`` replaces the top of the stack."""
    check_device(device)
    _thread.device = device
    if _thread.stack:
        _thread.stack[-1] = PRIMARY[device]
    else:
        _thread.stack.append(PRIMARY[device])


def get_device() -> int:
    """cudaGetDevice: the device of the current context, else the thread's runtime device."""
    if GPU_COUNT == 0:
        raise CudaError(NO_DEVICE, "SPADE_STANDIN_GPUS=0")
    return _thread.stack[-1].device if _thread.stack else _thread.device


def push_context(ctx: Context) -> None:
    if not ctx.alive:
        raise CudaError(INVALID_CONTEXT, f"{ctx} was destroyed")
    _thread.stack.append(ctx)


def pop_context() -> Context:
    if not _thread.stack:
        raise CudaError(INVALID_CONTEXT, "no context is current in this thread")
    return _thread.stack.pop()


def describe_current() -> str:
    """For error messages: what is current in the calling thread."""
    ctx = current_context()
    where = threading.current_thread().name
    return f"{ctx} is current in thread {where!r}" if ctx else f"no context is current in thread {where!r}"


# ---------------------------------------------------------------------------- memory


@dataclass
class Allocation:
    start: int
    nbytes: int
    context: Context | None  # None for pinned host memory (usable from every context)
    kind: str  # "device" or "pinned"
    serial: int = field(default=0)

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    def __str__(self) -> str:
        owner = f"device {self.context.device}" if self.context is not None else "the host"
        return f"{self.kind} allocation 0x{self.start:x}+{self.nbytes} of {owner}"


_lock = threading.RLock()
_starts: list[int] = []  # sorted start addresses of live allocations
_allocations: dict[int, Allocation] = {}
_serials = itertools.count(1)


def register(owner: object, start: int, nbytes: int, context: Context | None, kind: str) -> Allocation:
    """Record [start, start + nbytes) as live memory until ``owner`` (the numpy array that holds
    it) is garbage collected or :func:`unregister` is called."""
    alloc = Allocation(start, nbytes, context, kind, next(_serials))
    with _lock:
        old = _allocations.get(start)
        if old is not None and old.nbytes == 0:  # zero-size allocations may share an address
            _remove(old)
        if start not in _allocations:
            bisect.insort(_starts, start)
        _allocations[start] = alloc
    weakref.finalize(owner, _unregister_serial, start, alloc.serial)
    return alloc


def _remove(alloc: Allocation) -> None:
    del _allocations[alloc.start]
    _starts.pop(bisect.bisect_left(_starts, alloc.start))


def _unregister_serial(start: int, serial: int) -> None:
    with _lock:
        alloc = _allocations.get(start)
        if alloc is not None and alloc.serial == serial:
            _remove(alloc)


def unregister(alloc: Allocation) -> None:
    _unregister_serial(alloc.start, alloc.serial)


def find(ptr: int) -> Allocation | None:
    """The live allocation that contains address ``ptr``."""
    with _lock:
        i = bisect.bisect_right(_starts, ptr) - 1
        if i < 0:
            return None
        alloc = _allocations[_starts[i]]
        return alloc if ptr < alloc.end or (alloc.nbytes == 0 and ptr == alloc.start) else None


def allocate(nbytes: int, context: Context | None, kind: str = "device") -> np.ndarray:
    """``nbytes`` of aligned, registered memory as a uint8 numpy array (the memory lives as long
    as the array or a view of it). Like fresh GPU memory it is not zeroed: it is filled with 0xFF
    bytes (NaN as float, -1 as signed integers), so reading what was never written shows."""
    raw = np.full(int(nbytes) + ALIGNMENT, 0xFF, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    buf = raw[offset : offset + int(nbytes)]
    register(raw, raw.ctypes.data + offset, int(nbytes), context, kind)
    return buf


def check_device_memory(ptr: int, nbytes: int, context: Context, what: str, foreign: int = INVALID_VALUE) -> Allocation:
    """``ptr`` .. ``ptr + nbytes`` must lie in one live device allocation of ``context``; raises
    CudaError(INVALID_VALUE) for anything else, or ``foreign`` for memory of another context."""
    ptr = int(ptr)
    alloc = find(ptr)
    if alloc is None:
        raise CudaError(
            INVALID_VALUE,
            f"{what} 0x{ptr:x} is not live device memory (never allocated through the "
            "stand-ins, freed, or a host address)",
        )
    if alloc.kind != "device":
        raise CudaError(INVALID_VALUE, f"{what} 0x{ptr:x} is {alloc}, not device memory")
    if ptr + nbytes > alloc.end:
        raise CudaError(INVALID_VALUE, f"{what} 0x{ptr:x}+{nbytes} runs past the end of its {alloc}")
    if alloc.context is not context:
        raise CudaError(
            foreign,
            f"{what} 0x{ptr:x} is memory of {alloc.context}, but {context} is the one in use ({describe_current()})",
        )
    return alloc


def check_host_memory(ptr: int, nbytes: int, what: str) -> Allocation | None:
    """``ptr`` must not be device memory; returns its pinned allocation, or None for pageable
    memory (which the stand-in cannot check further: the caller must pass a valid address)."""
    ptr = int(ptr)
    alloc = find(ptr)
    if alloc is None:
        return None
    if alloc.kind != "pinned":
        raise CudaError(INVALID_VALUE, f"{what} 0x{ptr:x} is {alloc}, not host memory")
    if ptr + nbytes > alloc.end:
        raise CudaError(INVALID_VALUE, f"{what} 0x{ptr:x}+{nbytes} runs past the end of its {alloc}")
    return alloc


def still_live(alloc: Allocation | None, what: str) -> None:
    """Queued work checks, when it runs, that the memory it was given has not been freed since."""
    if alloc is None:
        return
    with _lock:
        if _allocations.get(alloc.start) is not alloc:
            raise CudaError(ILLEGAL_ADDRESS, f"{what}: {alloc} was freed before the queued work ran")


def memmove(dst: int, src: int, nbytes: int) -> None:
    if nbytes:
        ctypes.memmove(int(dst), int(src), int(nbytes))


# ---------------------------------------------------------------------------- streams


class Stream:
    """A CUDA stream: a queue of work, run in order when synchronized."""

    def __init__(self, context: Context, blocking: bool):
        self.context, self.blocking = context, blocking
        self.handle = next(_handles)
        self._queue: list[tuple[Callable[[], None], str]] = []
        self._run_lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<stand-in stream 0x{self.handle:x} of {self.context}>"

    def enqueue(self, work: Callable[[], None], what: str) -> None:
        with self._run_lock:
            self._queue.append((work, what))

    @property
    def pending(self) -> int:
        return len(self._queue)

    def synchronize(self) -> None:
        """Run the queued work; the first error drops the rest and is raised (as the sticky
        error a real synchronize reports)."""
        with self._run_lock:
            queue, self._queue = self._queue, []
            for work, what in queue:
                try:
                    work()
                except CudaError:
                    raise
                except Exception as exc:  # a bug inside the queued work: report it as CUDA would, but keep the cause
                    raise CudaError(ILLEGAL_ADDRESS, f"{what} failed: {type(exc).__name__}: {exc}") from exc


_streams: dict[int, Stream] = {}


def create_stream(context: Context, blocking: bool = True) -> Stream:
    stream = Stream(context, blocking)
    with _lock:
        _streams[stream.handle] = stream
    return stream


def destroy_stream(stream: Stream) -> None:
    """cudaStreamDestroy: queued work still completes (errors in it have no one to go to)."""
    with _lock:
        _streams.pop(stream.handle, None)
    try:
        stream.synchronize()
    except CudaError:
        pass


def stream_for(handle: int, context: Context, what: str) -> Stream | None:
    """The live stream with ``handle`` (None for 0, the null stream), which must belong to
    ``context``; raises CudaError(INVALID_HANDLE) otherwise."""
    if not isinstance(handle, (int, np.integer)) or isinstance(handle, bool):
        raise TypeError(f"{what}: a stream handle is an int, got {type(handle).__name__}")
    if handle == 0:
        return None
    with _lock:
        stream = _streams.get(int(handle))
    if stream is None:
        raise CudaError(INVALID_HANDLE, f"{what}: 0x{int(handle):x} is not a live CUDA stream")
    if stream.context is not context:
        raise CudaError(
            INVALID_HANDLE, f"{what}: {stream} belongs to {stream.context}, not to {context} ({describe_current()})"
        )
    return stream


def wait_null_stream(context: Context) -> None:
    """Work on the legacy null stream waits for every blocking stream of its context."""
    with _lock:
        blocking = [s for s in _streams.values() if s.context is context and s.blocking]
    for s in blocking:
        s.synchronize()


def submit(stream: Stream | None, context: Context, work: Callable[[], None], what: str) -> None:
    """Queue ``work`` on ``stream``, or run it now on the null stream (``stream`` None)."""
    if stream is None:
        wait_null_stream(context)
        work()
    else:
        stream.enqueue(work, what)


def synchronize_context(context: Context) -> None:
    """cudaDeviceSynchronize / cuCtxSynchronize."""
    with _lock:
        mine = [s for s in _streams.values() if s.context is context]
    for s in mine:
        s.synchronize()


# ---------------------------------------------------------------------------- what was done

# counts of what the stand-ins did, for tests that check a caller's own accounting: "kernels" (RawKernel
# and pycuda launches), "gemm" (cuBLAS calls), "ops" (CuPy array operations that launch a kernel on a
# GPU), "h2d_copies" / "h2d_bytes" (host-to-device transfers of any kind)
counters: dict[str, int] = {}


def count(what: str, n: int = 1) -> None:
    with _lock:
        counters[what] = counters.get(what, 0) + int(n)


def count_h2d(nbytes: int) -> None:
    count("h2d_copies")
    count("h2d_bytes", nbytes)


# one machine per process, however this module was reached (top-level name or tests.standins.*)
sys.modules.setdefault("_standin_cuda", sys.modules[__name__])
