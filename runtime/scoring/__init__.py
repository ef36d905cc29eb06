"""Pixel scorers (numpy on the CPU; CUDA kernels come with the GPU runtime)."""
from .base import PixelScorer, TopK
from .numpy import NumpyScorer


def scorer_for(device: str = "cpu") -> PixelScorer:
    """The pixel scorer for ``device``."""
    if device in ("cpu", "auto"):
        return NumpyScorer()
    raise ValueError(f"no pixel scorer for device {device!r} in this build; use 'cpu'")


__all__ = ["PixelScorer", "TopK", "NumpyScorer", "scorer_for"]
