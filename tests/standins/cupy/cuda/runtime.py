"""``cupy.cuda.runtime`` stand-in: device queries and pointer-based copies on the fake machine.

Faithful: the names, signatures and constants spade-edge uses; ``CUDARuntimeError`` with
``status`` and the message's first line as CuPy writes it ("cudaErrorInvalidDevice: invalid device
ordinal"; a second line says what the stand-in saw); the current device per thread; no device at
all (``SPADE_STANDIN_GPUS=0``) makes every call raise, as a machine without a usable GPU does.

Checks a real copy makes, or that would fault on a GPU (every one raises CUDARuntimeError): the
device side of a copy must be live device memory of the current device, large enough; the host
side must not be device memory; the stream must be a live stream of the current device.
Stricter than CUDA: memory of another device is refused even where unified addressing would
copy it.

``memcpyAsync`` is asynchronous as on a GPU when the host side is pinned memory (cupyx.empty_pinned,
pycuda's pagelocked_empty): the copy happens when the stream is synchronized. With pageable host
memory CUDA copies synchronously, and so does the stand-in.
"""

from __future__ import annotations

from contextlib import contextmanager

from .._machine import machine

STANDIN = True
memcpyHostToHost = 0
memcpyHostToDevice = 1
memcpyDeviceToHost = 2
memcpyDeviceToDevice = 3
memcpyDefault = 4
# cudaDataType_t, as CuPy's runtime module has them (cuBLAS GemmEx takes them)
CUDA_R_32F, CUDA_R_64F, CUDA_R_16F, CUDA_R_8I = 0, 1, 2, 3
_KINDS = {0: "HostToHost", 1: "HostToDevice", 2: "DeviceToHost", 3: "DeviceToDevice", 4: "Default"}


class CUDARuntimeError(RuntimeError):
    """As ``cupy_backends.cuda.api.runtime.CUDARuntimeError``: ``status`` is the cudaError_t."""

    def __init__(self, status: int, detail: str = ""):
        self.status = status
        name, _, description = machine.ERRORS[status]
        super().__init__(f"{name}: {description}" + (f"\n[stand-in] {detail}" if detail else ""))

    def __reduce__(self):
        return (type(self), (self.status,))


@contextmanager
def errors():
    """Turn the machine's CudaError into CUDARuntimeError (the runtime API's exception)."""
    try:
        yield
    except machine.CudaError as exc:
        raise CUDARuntimeError(exc.status, exc.detail) from None


def current_context():
    with errors():
        return machine.runtime_context()


def getDeviceCount() -> int:
    if machine.GPU_COUNT == 0:
        raise CUDARuntimeError(machine.NO_DEVICE, "SPADE_STANDIN_GPUS=0")
    return machine.GPU_COUNT


def getDeviceProperties(device: int) -> dict:
    with errors():
        machine.check_device(device)
    major, minor = machine.COMPUTE_CAPABILITY
    return {
        "name": machine.GPU_NAME.encode(),
        "major": major,
        "minor": minor,
        "totalGlobalMem": machine.TOTAL_MEMORY,
        "multiProcessorCount": 16,
        "integrated": 1,
        "warpSize": 32,
        "maxThreadsPerBlock": 1024,
        "canMapHostMemory": 1,
        "unifiedAddressing": 1,
    }


def getDevice() -> int:
    with errors():
        return machine.get_device()


def setDevice(device: int) -> None:
    with errors():
        machine.set_device(device)


def deviceSynchronize() -> None:
    with errors():
        machine.synchronize_context(machine.runtime_context())


def _plan(dst: int, src: int, size: int, kind: int, ctx):
    """Check a copy's two sides; returns their allocations (None for pageable host memory)."""
    if kind not in _KINDS:
        raise machine.CudaError(machine.INVALID_VALUE, f"cudaMemcpyKind {kind!r}")
    if kind == memcpyDefault:  # inferred from the addresses, as unified addressing does
        d, s = machine.find(int(dst)), machine.find(int(src))
        dst_dev, src_dev = d is not None and d.kind == "device", s is not None and s.kind == "device"
    else:
        dst_dev, src_dev = (
            kind in (memcpyHostToDevice, memcpyDeviceToDevice),
            kind in (memcpyDeviceToHost, memcpyDeviceToDevice),
        )
    what = f"cudaMemcpy{_KINDS[kind]}"
    dst_alloc = (
        machine.check_device_memory(dst, size, ctx, f"{what} destination")
        if dst_dev
        else machine.check_host_memory(dst, size, f"{what} destination")
    )
    src_alloc = (
        machine.check_device_memory(src, size, ctx, f"{what} source")
        if src_dev
        else machine.check_host_memory(src, size, f"{what} source")
    )
    pageable = (not dst_dev and dst_alloc is None) or (not src_dev and src_alloc is None)
    if dst_dev and not src_dev:
        machine.count_h2d(size)
    return dst_alloc, src_alloc, pageable, what


def _copy(dst, src, size, dst_alloc, src_alloc, what):
    def work():
        machine.still_live(dst_alloc, what)
        machine.still_live(src_alloc, what)
        machine.memmove(dst, src, size)

    return work


def memcpy(dst: int, src: int, size: int, kind: int) -> None:
    """cudaMemcpy: ordered after the null stream's work, done when it returns."""
    with errors():
        ctx = machine.runtime_context()
        if size:
            dst_alloc, src_alloc, _, what = _plan(dst, src, int(size), kind, ctx)
            machine.submit(None, ctx, _copy(dst, src, int(size), dst_alloc, src_alloc, what), what)


def memcpyAsync(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    """cudaMemcpyAsync on the stream with handle ``stream`` (0: the null stream)."""
    with errors():
        ctx = machine.runtime_context()
        s = machine.stream_for(stream, ctx, "cudaMemcpyAsync")
        if not size:
            return
        dst_alloc, src_alloc, pageable, what = _plan(dst, src, int(size), kind, ctx)
        work = _copy(dst, src, int(size), dst_alloc, src_alloc, what)
        if pageable and s is not None:  # CUDA stages pageable memory: the copy is done on return
            s.synchronize()
            work()
        else:
            machine.submit(s, ctx, work, what)
