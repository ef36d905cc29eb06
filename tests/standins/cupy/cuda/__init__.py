"""``cupy.cuda`` stand-in: devices, streams, the runtime API, and the driver/compiler exceptions."""

from . import compiler, cublas, device, driver, runtime
from .device import Device
from .stream import Stream, get_current_stream

STANDIN = True

__all__ = ["Device", "Stream", "compiler", "cublas", "device", "driver", "get_current_stream", "runtime"]
