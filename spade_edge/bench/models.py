"""Models the benchmarks use, exported once and cached outside the repository."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SPADE_EDGE_CACHE`` or ``~/.cache/spade-edge``."""
    return Path(os.environ.get("SPADE_EDGE_CACHE", Path.home() / ".cache" / "spade-edge"))


def lite0_onnx() -> Path:
    """EfficientNet-Lite0 (real ImageNet weights) as ONNX; exported on first use (needs torch)."""
    path = cache_dir() / "models" / "efficientnet_lite0.onnx"
    if not path.is_file():
        from spade_edge.export.backbones import create_backbone
        from spade_edge.export.onnx_export import onnx_from_backbone

        onnx_from_backbone(create_backbone("efficientnet_lite0"), "efficientnet_lite0", path)
    return path
