"""``cupy.cuda`` stand-in: devices, streams, the runtime API, and the driver/compiler exceptions;
``get_cuda_path()``: the stand-in machine's CUDA toolkit (tests/standins/toolkit, placeholder headers
that the stand-in NVRTC's include search finds, see cupy/_rawmodule.py)."""

from pathlib import Path

from . import compiler, cublas, device, driver, runtime
from .device import Device
from .stream import Stream, get_current_stream

STANDIN = True
TOOLKIT = Path(__file__).resolve().parents[2] / "toolkit"


def get_cuda_path() -> str:
    """As CuPy's: the CUDA toolkit's root folder."""
    return str(TOOLKIT)


__all__ = [
    "Device",
    "Stream",
    "compiler",
    "cublas",
    "device",
    "driver",
    "get_cuda_path",
    "get_current_stream",
    "runtime",
]
