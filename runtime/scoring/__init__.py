"""Pixel scorers: on the CPU the AMX screen where the CPU has it, else the fused kernels of its best
instruction-set level (AVX-512, AVX2+FMA, NEON, portable C), else numpy; the CUDA scorer comes with
the GPU runtime. Which one serves a model is runtime/device.py's choice."""

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
    """The fastest exact scorer of this CPU: the AMX screen where available, else the fused kernel of
    the best level that compiles here (:mod:`.fused`), else numpy. ``SPADE_EDGE_CPU_LEVEL`` caps the
    level (``amx``, ``avx512``, ``avx2``, ``portable``; ``neon`` on Arm; ``numpy``): any cap but
    ``amx`` leaves AMX out. ``SPADE_EDGE_AMX=0`` leaves AMX out too."""
    from . import fused

    cap = os.environ.get(fused.LEVEL_ENV, "").strip().lower()
    if os.environ.get("SPADE_EDGE_AMX", "1") != "0" and cap in ("", "amx"):
        from . import amx

        if amx.available()[0]:
            return amx.AmxScorer()
    if fused.best()[0] is not None:
        return fused.FusedScorer()
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
