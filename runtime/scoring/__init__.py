"""Pixel scorers: numpy on the CPU (with the AMX screen where the CPU has it); the CUDA scorer comes
with the GPU runtime. Which one serves a model is runtime/device.py's choice."""

import os

from .base import (
    SPARE,
    Candidates,
    GalleryPyramids,
    GalleryRows,
    GalleryView,
    PixelScorer,
    TopK,
    keep,
    merge,
    smallest,
)
from .numpy import NumpyScorer


def cpu_scorer() -> PixelScorer:
    """The fastest exact scorer of this CPU: the AMX screen where available, else numpy (set
    ``SPADE_EDGE_AMX=0`` for numpy alone)."""
    if os.environ.get("SPADE_EDGE_AMX", "1") != "0":
        from . import amx

        if amx.available()[0]:
            return amx.AmxScorer()
    return NumpyScorer()


__all__ = [
    "SPARE",
    "Candidates",
    "GalleryPyramids",
    "GalleryRows",
    "GalleryView",
    "NumpyScorer",
    "PixelScorer",
    "TopK",
    "cpu_scorer",
    "keep",
    "merge",
    "smallest",
]
