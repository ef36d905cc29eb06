"""``cupyx`` stand-in: pinned (page-locked) host memory, as numpy arrays.

Faithful: ``empty_pinned`` / ``zeros_pinned`` return plain numpy arrays (as CuPy does) whose memory
the fake machine knows as pinned host memory, so asynchronous copies from and to them are
asynchronous, and using them where device memory is expected is refused. Allocating needs a usable
device (CUDARuntimeError otherwise), as cudaHostAlloc does.
"""

from __future__ import annotations

import importlib

import numpy as np

from ._machine import machine

# the CuPy stand-in beside this package, however this one was reached
_runtime = importlib.import_module(
    "cupy.cuda.runtime" if __name__ == "cupyx" else __name__.rpartition(".")[0] + ".cupy.cuda.runtime"
)

STANDIN = True


def empty_pinned(shape, dtype=float, order="C") -> np.ndarray:
    with _runtime.errors():
        machine.runtime_context()  # CuPy allocates pinned memory through the runtime: it needs a device
    dtype = np.dtype(dtype)
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    buf = machine.allocate(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, None, kind="pinned")
    return np.ndarray(shape, dtype, buffer=buf, order=order)


def zeros_pinned(shape, dtype=float, order="C") -> np.ndarray:
    out = empty_pinned(shape, dtype, order)
    out[...] = 0
    return out


__all__ = ["empty_pinned", "zeros_pinned"]
