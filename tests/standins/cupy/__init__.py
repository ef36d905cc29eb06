"""CuPy stand-in for spade-edge's tests (tests/standins/__init__.py says how to put it in place).

Arrays are numpy arrays in the host memory of a fake CUDA machine (tests/standins/_standin_cuda.py)
that keeps CUDA's rules: devices and the current device per thread, memory that belongs to one
device, streams whose work runs when synchronized. Kernels (``RawModule``) are compiled from
their CUDA source as C++ with the repository's CPU shim and run for every thread.

The subset is what spade-edge uses (runtime/scoring/cuda.py, runtime/features/tensorrt.py,
runtime/device.py, runtime/gpu.py) plus a little; see each module's docstring for what is
faithful and what is not. Anything else is absent, so that code using it fails here first.
"""

from __future__ import annotations

import numpy as np

from . import cuda
from ._machine import machine
from ._ndarray import adopt, host_view, ndarray, on_current_device
from ._ndarray import empty as _empty
from ._rawmodule import RawKernel, RawModule
from .cuda.runtime import current_context

STANDIN = True
__version__ = "14.2.0"

bool_ = np.bool_
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
float16, float32, float64 = np.float16, np.float32, np.float64
inf, nan, newaxis = np.inf, np.nan, np.newaxis


def _device_arrays(values, what: str):
    """CuPy's functions take device arrays only (numpy arrays: TypeError), all on the current device."""
    for v in values:
        if not isinstance(v, ndarray):
            raise TypeError(f"Unsupported type {type(v)}")
    return on_current_device(values, what)


# ---------------------------------------------------------------------------- making arrays


def asarray(a, dtype=None, order=None, *, blocking=False) -> ndarray:
    """``a`` on the current device: the same array when it is already there (and of ``dtype``),
    else a copy (host data is uploaded; an array of another device is copied across)."""
    ctx = current_context()
    if isinstance(a, ndarray):
        if a._context is ctx and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        if a._context is ctx:
            return a.astype(dtype)
        cuda.stream.after_current_stream(a._context)
        return adopt(np.asarray(host_view(a), dtype=dtype), ctx)
    host = np.asarray(a, dtype=dtype, order=order)
    machine.count_h2d(host.nbytes)
    return adopt(host, ctx)


def array(obj, dtype=None, copy=True, order="K", ndmin=0) -> ndarray:
    if isinstance(obj, ndarray) and not copy:
        return asarray(obj, dtype)
    host = np.array(host_view(obj), dtype=dtype, order=order, ndmin=ndmin)
    if isinstance(obj, ndarray):
        machine.count("ops")
    else:
        machine.count_h2d(host.nbytes)
    return adopt(host, current_context())


def ascontiguousarray(a, dtype=None) -> ndarray:
    if isinstance(a, ndarray):
        if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        ctx = on_current_device([a], "ascontiguousarray")
        machine.count("ops")
        return adopt(np.ascontiguousarray(host_view(a), dtype=dtype), ctx)
    return asarray(np.ascontiguousarray(a, dtype=dtype))


def empty(shape, dtype=float, order="C") -> ndarray:
    return _empty(shape, dtype, current_context(), order)


def zeros(shape, dtype=float, order="C") -> ndarray:
    out = empty(shape, dtype, order)
    host_view(out)[...] = 0
    machine.count("ops")
    return out


def ones(shape, dtype=float, order="C") -> ndarray:
    out = empty(shape, dtype, order)
    host_view(out)[...] = 1
    machine.count("ops")
    return out


def full(shape, fill_value, dtype=None, order="C") -> ndarray:
    out = empty(shape, np.array(fill_value).dtype if dtype is None else dtype, order)
    host_view(out)[...] = fill_value
    machine.count("ops")
    return out


# ---------------------------------------------------------------------------- computing


def matmul(a, b, out=None) -> ndarray:
    _device_arrays([a, b], "matmul")
    machine.count("gemm")
    return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)


def concatenate(tup, axis=0, out=None, dtype=None) -> ndarray:
    ctx = _device_arrays(list(tup), "concatenate")
    machine.count("ops")
    result = np.concatenate([host_view(a) for a in tup], axis=axis, dtype=dtype)
    if out is not None:
        out[...] = adopt(result, ctx)
        return out
    return adopt(result, ctx)


def stack(tup, axis=0, out=None, dtype=None) -> ndarray:
    ctx = _device_arrays(list(tup), "stack")
    machine.count("ops")
    result = np.stack([host_view(a) for a in tup], axis=axis, dtype=dtype)
    if out is not None:
        out[...] = adopt(result, ctx)
        return out
    return adopt(result, ctx)


def take_along_axis(a, indices, axis) -> ndarray:
    ctx = _device_arrays([a, indices], "take_along_axis")
    machine.count("ops")
    return adopt(np.take_along_axis(host_view(a), host_view(indices), axis), ctx)


def argsort(a, axis=-1, kind=None) -> ndarray:
    """Stable, whatever ``kind`` says (CuPy's argsort always is)."""
    ctx = _device_arrays([a], "argsort")
    machine.count("ops")
    return adopt(np.argsort(host_view(a), axis=axis, kind="stable"), ctx)


def asnumpy(a, stream=None, order="C", out=None, blocking=True) -> np.ndarray:
    """A numpy copy of a device array (from whichever device holds it, as CuPy); anything else
    goes through ``numpy.asarray``."""
    if isinstance(a, ndarray):
        return a.get(stream, order, out, blocking)
    return np.asarray(a, order=order)


# numpy.<name>(device array) runs these (ndarray.__array_function__), as CuPy dispatches
NUMPY_FUNCTIONS = {
    np.concatenate: concatenate,
    np.stack: stack,
    np.take_along_axis: take_along_axis,
    np.argsort: argsort,
}

__all__ = [
    "RawKernel",
    "RawModule",
    "argsort",
    "array",
    "asarray",
    "ascontiguousarray",
    "asnumpy",
    "concatenate",
    "cuda",
    "empty",
    "full",
    "matmul",
    "ndarray",
    "ones",
    "stack",
    "take_along_axis",
    "zeros",
]
