"""The description an exported model carries in its ONNX metadata.

Export writes it, the runtime reads it: nothing about the backbone is hard-coded on the device.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .errors import ModelError

METADATA_KEY = "spade_edge"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Level:
    """One level of the pixel pyramid: an output named ``name`` of shape (N, channels, H/stride, W/stride)."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class ModelInfo:
    """What a spade-edge ONNX model is: backbone, I/O, normalisation, pyramid, fingerprint."""

    backbone: str
    input_size: int  # square input, pixels
    levels: tuple[Level, ...]
    global_name: str
    global_channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str
    input_name: str = "image"
    input_layout: str = "NHWC"  # uint8; cast, normalisation and transpose run inside the graph
    precision: str = "fp32"
    extra: dict = field(default_factory=dict)

    def grid(self, level: Level) -> tuple[int, int]:
        """Feature grid (rows, cols) of ``level`` at the model's input size."""
        n = -(-self.input_size // level.stride)
        return n, n

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT_VERSION
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelInfo":
        d = json.loads(text)
        if d.pop("format", None) != FORMAT_VERSION:
            raise ModelError("model metadata has an unknown spade-edge format version; re-export it")
        d["levels"] = tuple(Level(**lv) for lv in d["levels"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    @classmethod
    def from_metadata(cls, metadata: dict, source: str = "model") -> "ModelInfo":
        """Read from an ONNX ``metadata_props`` mapping (as ONNX Runtime returns it)."""
        if METADATA_KEY not in metadata:
            raise ModelError(
                f"{source} carries no spade-edge description in its ONNX metadata; "
                "export it with 'spade-edge export'"
            )
        return cls.from_json(metadata[METADATA_KEY])
