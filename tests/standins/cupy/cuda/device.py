"""``cupy.cuda.Device`` stand-in.

Faithful: ``Device(n)`` does not check ``n``; using it does (``use()``, ``with``, properties) and
raises CUDARuntimeError "cudaErrorInvalidDevice: invalid device ordinal" for a device that does not
exist. The current device belongs to the calling thread (default 0, as in CUDA and CuPy): ``use()``
changes it for this thread only and for good; ``with Device(n):`` changes it and restores the
previous one on exit. ``Device()`` is the calling thread's current device.
"""

from __future__ import annotations

import threading

from .._machine import machine
from .runtime import errors

_cublas_handles: dict[int, int] = {}
CUBLAS_HANDLE_BASE = 0x7B000000


def get_cublas_handle() -> int:
    """``cupy.cuda.device.get_cublas_handle()``: the cuBLAS handle of the current device (made on
    first use, one per device; cuBLAS refuses a handle used on another device's context)."""
    with errors():
        device = machine.get_device()
        machine.runtime_context()
    return _cublas_handles.setdefault(device, CUBLAS_HANDLE_BASE + 0x100 * device)


def cublas_handle_device(handle: int) -> int | None:
    """The device a stand-in cuBLAS handle belongs to (None: not a handle)."""
    for device, h in _cublas_handles.items():
        if h == handle:
            return device
    return None


class Device:
    _previous = threading.local()  # per thread: the devices to restore, one per open `with`

    def __init__(self, device: int | None = None):
        if device is None:
            with errors():
                device = machine.get_device()
        self.id = int(device)

    def use(self) -> None:
        with errors():
            machine.set_device(self.id)

    def __enter__(self):
        with errors():
            previous = machine.get_device()
            machine.set_device(self.id)
        stack = getattr(self._previous, "stack", None)
        if stack is None:
            stack = self._previous.stack = []
        stack.append(previous)
        return self

    def __exit__(self, *exc) -> None:
        with errors():
            machine.set_device(self._previous.stack.pop())

    @property
    def compute_capability(self) -> str:
        with errors():
            machine.check_device(self.id)
        return "{}{}".format(*machine.COMPUTE_CAPABILITY)

    def synchronize(self) -> None:
        with errors():
            machine.check_device(self.id)
            machine.synchronize_context(machine.PRIMARY[self.id])

    def __int__(self) -> int:
        return self.id

    __index__ = __int__

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("Device", self.id))

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"
