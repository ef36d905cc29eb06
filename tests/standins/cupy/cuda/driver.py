"""``cupy.cuda.driver`` stand-in: only the exception the driver API raises (kernel launches)."""

from __future__ import annotations

from contextlib import contextmanager

from .._machine import machine

STANDIN = True


class CUDADriverError(RuntimeError):
    """As CuPy's: ``status`` is the CUresult; the message's first line is "CUDA_ERROR_X: description"."""

    def __init__(self, status: int, detail: str = ""):
        self.status = status
        _, name, description = machine.ERRORS[status]
        super().__init__(f"{name}: {description}" + (f"\n[stand-in] {detail}" if detail else ""))


@contextmanager
def errors():
    try:
        yield
    except machine.CudaError as exc:
        raise CUDADriverError(exc.status, exc.detail) from None
