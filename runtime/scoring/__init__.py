"""Pixel scorers: numpy on the CPU (with the AMX screen where the CPU has it); CUDA kernels come
with the GPU runtime."""
import os

from .base import PixelScorer, TopK
from .numpy import NumpyScorer


def scorer_for(device: str = "cpu") -> PixelScorer:
    """The pixel scorer for ``device``: 'cpu' (the AMX screen where available, else numpy; set
    ``SPADE_EDGE_AMX=0`` for numpy alone) or 'cuda' (CuPy and the top-kappa kernel)."""
    if device in ("cpu", "auto"):
        if os.environ.get("SPADE_EDGE_AMX", "1") != "0":
            from . import amx

            if amx.available()[0]:
                return amx.AmxScorer()
        return NumpyScorer()
    if device == "cuda":
        from .cuda import CudaScorer

        return CudaScorer()
    raise ValueError(f"no pixel scorer for device {device!r}; use 'cpu' or 'cuda'")


__all__ = ["PixelScorer", "TopK", "NumpyScorer", "scorer_for"]
