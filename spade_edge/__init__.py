"""spade-edge: SPADE visual anomaly inspection, exported for the edge.

The Python API (no torch needed)::

    from spade_edge import Detector
    det = Detector.load("model.onnx", "parts.gallery")
    p = det.predict("part.png")          # p.score, p.verdict, p.anomaly_map, p.correspondence
"""

__version__ = "0.1.0"

_LAZY = {
    "Detector": "spade_edge.runtime.detector",
    "Prediction": "spade_edge.runtime.detector",
    "Gallery": "spade_edge.runtime.gallery",
    "SpadeConfig": "spade_edge.runtime.spade",
    "gallery_from_images": "spade_edge.runtime.build",
}


def __getattr__(name):  # PEP 562: keep `import spade_edge` light
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spade_edge' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
