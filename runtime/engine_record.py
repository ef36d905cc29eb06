"""What ties a TensorRT engine to where it may run: its sidecar ``<engine>.json``, read and checked.

An engine is built for one ONNX file, one TensorRT version and one GPU. Whoever builds it (the
Python build or trtexec plus ``spade-edge engine sidecar``) records them with the build options;
:func:`check_engine` refuses an engine whose record does not match the file, the model, the
TensorRT installed or the GPU present, before TensorRT is asked to deserialize it. Also here, as
the device needs them: the installed TensorRT's version, compared as a version, and the
``trt.ILogger`` that forwards to Python logging.

Imports neither TensorRT nor onnx at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from .errors import ModelError, require
from .gpu import gpu_identity

SIDECAR_FORMAT = 1
REBUILD = "rebuild the engine on this machine (jetson/build-engine.sh or 'spade-edge build-engine')"


class EngineError(ModelError):
    """An engine that cannot be built, or must not be used (stale, or from another TensorRT or GPU)."""


def _trt():
    return require("tensorrt", "trt", "Building or running a TensorRT engine")


def parse_version(text: str):
    """A comparable version (``packaging``: "10.16" > "10.3", which string comparison gets wrong)."""
    from packaging.version import Version

    return Version(str(text))


@lru_cache(maxsize=1)
def tensorrt_version():
    """The installed TensorRT's version, detected once."""
    return parse_version(_trt().__version__)


def make_logger(trt, name: str = "tensorrt"):
    """A ``trt.ILogger`` that forwards to Python logging and keeps errors for exception messages
    (the subclass is defined here so that importing this module never imports TensorRT)."""
    levels = (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)  # TensorRT's order
    pylog = logging.getLogger(name)

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = levels[min(int(severity), len(levels) - 1)]
            if level >= logging.ERROR:
                self.errors.append(msg)
            pylog.log(level, "%s", msg)

    return Logger()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sidecar_path(engine: str | os.PathLike) -> Path:
    return Path(os.fspath(engine) + ".json")


def read_sidecar(engine: str | os.PathLike) -> dict:
    path = sidecar_path(engine)
    if not path.is_file():
        raise EngineError(
            f"{engine}: no sidecar {path.name}; engines are only used with their build record "
            "(build with 'spade-edge build-engine' or jetson/build-engine.sh)"
        )
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise EngineError(f"{path}: unreadable sidecar ({exc}); rebuild the engine") from exc
    if record.get("format") != SIDECAR_FORMAT:
        raise EngineError(f"{path}: unknown sidecar format {record.get('format')!r}; rebuild the engine")
    return record


def check_engine(
    engine_path: str | os.PathLike,
    onnx_path: str | os.PathLike | None = None,
    *,
    trt_version=None,
    gpu: dict | None = None,
    device: int = 0,
) -> dict:
    """The engine's sidecar record, after refusing an engine that is not the one recorded, was built
    from another ONNX file than ``onnx_path`` (when given), or for another TensorRT or GPU than
    this one (``trt_version``, ``gpu``: default detected, CUDA device ``device``)."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise EngineError(f"{engine_path}: no such engine file")
    rec = read_sidecar(engine_path)
    if file_sha256(engine_path) != rec["engine"]["sha256"]:
        raise EngineError(
            f"{engine_path}: the file is not the engine its sidecar records (checksum differs); {REBUILD}"
        )
    if onnx_path is not None and file_sha256(onnx_path) != rec["onnx"]["sha256"]:
        raise EngineError(
            f"{engine_path} was built from another model than {onnx_path} (ONNX SHA-256 differs: "
            f"built from {rec['onnx']['file']} {rec['onnx']['sha256'][:19]}...); {REBUILD}"
        )
    running = str(tensorrt_version() if trt_version is None else trt_version)
    if running != rec["tensorrt"]:
        raise EngineError(
            f"{engine_path} was built with TensorRT {rec['tensorrt']}, this is TensorRT {running}: "
            f"engines do not move between TensorRT versions; {REBUILD}"
        )
    here = gpu_identity(device) if gpu is None else gpu
    built = rec["gpu"]
    if (here["name"], here["compute_capability"]) != (built["name"], built["compute_capability"]):
        raise EngineError(
            f"{engine_path} was built for {built['name']} (compute capability "
            f"{built['compute_capability']}), this GPU is {here['name']} (compute capability "
            f"{here['compute_capability']}): engines do not move between GPUs; {REBUILD}"
        )
    return rec
