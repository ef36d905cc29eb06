"""Which device runs the detector: 'cpu', 'cuda' (ONNX Runtime CUDA provider + CUDA scorer),
'tensorrt' (TensorRT engine or ONNX Runtime's TensorRT provider + CUDA scorer), or 'auto'."""
from __future__ import annotations

import importlib.util

DEVICES = ("auto", "cpu", "cuda", "tensorrt")


def gpu_available() -> tuple[bool, str]:
    """(True, name) when CuPy sees a CUDA device, else (False, why not)."""
    if importlib.util.find_spec("cupy") is None:
        return False, "CuPy is not installed (pip install 'spade-edge[gpu]')"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return False, f"no usable CUDA device ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if n == 0:
        return False, "no CUDA device"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    return True, props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def ort_providers() -> list[str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime

    return onnxruntime.get_available_providers()


def resolve_device(requested: str = "auto") -> tuple[str, str]:
    """The device to use and a sentence saying why (``auto`` picks the best available)."""
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    if requested != "auto":
        return requested, f"{requested} (asked for)"
    ok, what = gpu_available()
    if not ok:
        return "cpu", f"cpu: {what}"
    providers = ort_providers()
    if "TensorrtExecutionProvider" in providers or importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt", f"tensorrt on {what}"
    return "cuda", f"cuda on {what}"
