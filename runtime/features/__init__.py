"""Feature backends: the exported extractor behind one interface."""

from __future__ import annotations

import os

from .base import FeatureBackend


def backend_from_model(
    path: str | os.PathLike, device: str = "cpu", threads: int | None = None, fp16: bool = False
) -> FeatureBackend:
    """The feature backend for ``path`` on ``device``, as :func:`spade_edge.runtime.device.place`
    chooses it (an ONNX model or a TensorRT engine; 'cpu', 'cuda[:N]', 'tensorrt[:N]' or 'auto')."""
    from ..device import place
    from ..threads import set_threads

    set_threads(threads)
    return place(path, device, threads, fp16).backend


__all__ = ["FeatureBackend", "backend_from_model"]
