"""Pixel scorers (numpy on the CPU; CUDA kernels come with the GPU runtime)."""
from .base import PixelScorer, TopK
from .numpy import NumpyScorer


def scorer_for(device: str = "cpu") -> PixelScorer:
    """The pixel scorer for ``device``: 'cpu' (numpy) or 'cuda' (CuPy and the top-kappa kernel)."""
    if device in ("cpu", "auto"):
        return NumpyScorer()
    if device == "cuda":
        from .cuda import CudaScorer

        return CudaScorer()
    raise ValueError(f"no pixel scorer for device {device!r}; use 'cpu' or 'cuda'")


__all__ = ["PixelScorer", "TopK", "NumpyScorer", "scorer_for"]
