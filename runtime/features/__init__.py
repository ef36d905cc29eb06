"""Feature backends: the exported extractor behind one interface."""
from __future__ import annotations

import os

from .base import FeatureBackend


def backend_from_model(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> FeatureBackend:
    """The feature backend for ``path`` on ``device`` ('cpu' or 'auto' in this build)."""
    from ..threads import set_threads
    from .onnxruntime import OnnxRuntimeBackend

    set_threads(threads)

    if device == "auto":
        device = "cpu"
    return OnnxRuntimeBackend.from_path(path, device=device, threads=threads)


__all__ = ["FeatureBackend", "backend_from_model"]
