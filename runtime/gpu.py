"""Which NVIDIA GPU is here: name and compute capability of a CUDA device, asked of whatever is
installed (CuPy, else pycuda, else the driver's libcuda), with the reason when there is none."""

from __future__ import annotations

import ctypes
import logging

from .errors import ModelError

log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _cupy(device: int) -> dict:
    import cupy

    p = cupy.cuda.runtime.getDeviceProperties(device)
    name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    return {"name": name, "compute_capability": f"{p['major']}.{p['minor']}"}


def _pycuda(device: int) -> dict:
    import pycuda.driver as drv

    drv.init()
    d = drv.Device(device)
    return {"name": d.name(), "compute_capability": "{}.{}".format(*d.compute_capability())}


def _driver(device: int) -> dict:
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, major, minor, name = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), device) != 0:
        raise RuntimeError(f"the CUDA driver reports no usable device {device}")
    cuda.cuDeviceGetName(name, 256, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return {"name": name.value.decode(), "compute_capability": f"{major.value}.{minor.value}"}


def gpu_identity(device: int = 0) -> dict:
    """``{"name", "compute_capability"}`` of CUDA device ``device``; ModelError saying why not."""
    import importlib.util

    tried = []
    for label, module, ask in (("CuPy", "cupy", _cupy), ("pycuda", "pycuda", _pycuda), ("libcuda", None, _driver)):
        if module is not None and importlib.util.find_spec(module) is None:
            continue
        try:
            return ask(device)
        except Exception as exc:  # no driver, no such device, libraries missing at run time
            log.debug("%s sees no device %d: %s", label, device, exc)
            tried.append(f"{label}: {_first_line(exc)}")
    raise ModelError(f"no usable CUDA device {device} ({'; '.join(tried)})")


def gpu_available(device: int = 0) -> tuple[bool, str]:
    """(True, GPU name) when CUDA device ``device`` answers, else (False, why not)."""
    try:
        return True, gpu_identity(device)["name"]
    except ModelError as exc:
        return False, str(exc)


def cupy_usable(device: int = 0) -> tuple[bool, str]:
    """Whether CuPy is installed and sees CUDA device ``device`` (what the CUDA scorer needs)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed (pip install 'spade-edge[gpu]', or NVIDIA's Jetson wheel)"
    try:
        _cupy(device)
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable, and why
        return False, f"CuPy sees no CUDA device {device} ({_first_line(exc)})"
    return True, ""
