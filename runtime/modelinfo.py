"""The description an exported model carries in its ONNX metadata.

Export writes it, the runtime reads it: nothing about the backbone is hard-coded on the device.
:func:`onnx_metadata` reads it from a model file without the onnx package (a device need not have
it): the protobuf wire format, memory-mapped, so the weights are never read.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    def from_json(cls, text: str, source: str = "model") -> ModelInfo:
        """Parse and check a description (:func:`parse_description`); ``source`` names the file in errors."""
        return parse_description(text, source)

    @classmethod
    def from_metadata(cls, metadata: dict, source: str = "model") -> ModelInfo:
        """Read from an ONNX ``metadata_props`` mapping (as ONNX Runtime returns it)."""
        if METADATA_KEY not in metadata:
            raise ModelError(
                f"{source} carries no spade-edge description in its ONNX metadata; export it with 'spade-edge export'"
            )
        return cls.from_json(metadata[METADATA_KEY], source)


# ---------------------------------------------------------------------------- checked parsing

_REQUIRED = {"backbone", "input_size", "levels", "global_name", "global_channels", "mean", "std", "fingerprint"}
_OPTIONAL = {"input_name", "input_layout", "precision", "extra"}
MAX_INPUT_SIZE = 8192
MAX_CHANNELS = 1 << 16


def _int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_description(text: str, source: str = "model") -> ModelInfo:
    """The :class:`ModelInfo` in ``text`` (the JSON export writes), every field checked: a clear
    :class:`ModelError` naming ``source`` and the field, never a bare TypeError or KeyError."""

    def bad(what: str) -> ModelError:
        return ModelError(
            f"{source}: the model's spade-edge description {what}; re-export the model "
            "('spade-edge export') or restore it"
        )

    try:
        d = json.loads(text)
    except (ValueError, RecursionError, TypeError) as exc:
        raise bad(f"is not JSON ({exc})") from exc
    if not isinstance(d, dict):
        raise bad("is not a JSON object")
    if d.get("format") != FORMAT_VERSION:
        raise bad(
            f"has an unknown spade-edge format version {d.get('format')!r} (field 'format', expected {FORMAT_VERSION})"
        )
    d = {k: v for k, v in d.items() if k != "format"}
    unknown = sorted(set(d) - _REQUIRED - _OPTIONAL)
    if unknown:
        raise bad(f"has unknown field(s) {', '.join(repr(k) for k in unknown[:5])}")
    missing = sorted(_REQUIRED - set(d))
    if missing:
        raise bad(f"lacks field(s) {', '.join(repr(k) for k in missing)}")
    for key in ("backbone", "global_name", "fingerprint", "input_name", "precision"):
        if key in d and not (isinstance(d[key], str) and d[key]):
            raise bad(f"field '{key}' must be a non-empty string, got {d[key]!r}")
    if d.get("input_layout", "NHWC") != "NHWC":
        raise bad(f"field 'input_layout' must be 'NHWC', got {d['input_layout']!r}")
    if not _int(d["input_size"], 1, MAX_INPUT_SIZE):
        raise bad(f"field 'input_size' must be an integer in [1, {MAX_INPUT_SIZE}], got {d['input_size']!r}")
    if not _int(d["global_channels"], 1, MAX_CHANNELS):
        raise bad(f"field 'global_channels' must be an integer in [1, {MAX_CHANNELS}], got {d['global_channels']!r}")
    for key, positive in (("mean", False), ("std", True)):
        v = d[key]
        if not (isinstance(v, list) and len(v) == 3 and all(_finite(x) and (x > 0 or not positive) for x in v)):
            raise bad(f"field '{key}' must be 3 finite numbers{' > 0' if positive else ''}, got {v!r}")
    if "extra" in d and not isinstance(d["extra"], dict):
        raise bad(f"field 'extra' must be an object, got {type(d['extra']).__name__}")
    levels = d["levels"]
    if not (isinstance(levels, list) and levels):
        raise bad("field 'levels' must be a non-empty list")
    names = set()
    for i, lv in enumerate(levels):
        if not (isinstance(lv, dict) and set(lv) == {"name", "channels", "stride"}):
            raise bad(f"field 'levels[{i}]' must be an object with name, channels and stride, got {lv!r}")
        if not (isinstance(lv["name"], str) and lv["name"]) or lv["name"] in names or lv["name"] == d["global_name"]:
            raise bad(f"field 'levels[{i}].name' must be a new non-empty string, got {lv['name']!r}")
        names.add(lv["name"])
        if not _int(lv["channels"], 1, MAX_CHANNELS):
            raise bad(f"field 'levels[{i}].channels' must be an integer in [1, {MAX_CHANNELS}], got {lv['channels']!r}")
        if not _int(lv["stride"], 1, d["input_size"]):
            raise bad(f"field 'levels[{i}].stride' must be an integer in [1, input_size], got {lv['stride']!r}")
    d["levels"] = tuple(Level(**lv) for lv in levels)
    d["mean"], d["std"] = tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"])
    return ModelInfo(**d)


# ---------------------------------------------------------------------------- from an ONNX file


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, payload) of each length-delimited field in a protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ValueError("truncated message")
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated message")
            yield key >> 3, pos, pos + n
            pos += n
        else:
            raise ValueError(f"protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``ModelProto.metadata_props`` (field 14) of the ONNX file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            props = {}
            for field_number, a, b in _fields(buf, 0, len(buf)):
                if field_number == 14:
                    entry = {k: bytes(buf[s:e]).decode() for k, s, e in _fields(buf, a, b)}
                    props[entry.get(1, "")] = entry.get(2, "")
            return props
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not an ONNX model ({exc})") from exc


def model_info_from_onnx(path: str | os.PathLike) -> ModelInfo:
    """The :class:`ModelInfo` of the ONNX file at ``path`` (no onnx, no ONNX Runtime needed), after
    checking that the file is what export wrote (its digest recomputed: runtime/fingerprint.py)."""
    from .fingerprint import check_model_file

    return check_model_file(path)
