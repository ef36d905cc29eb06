"""ONNX -> TensorRT engine, with a JSON sidecar that carries everything that invalidates it.

:func:`engine_from_onnx` builds with the TensorRT Python API along the installed version's
:func:`~spade_edge.export.trt_plans.build_plan`; :func:`write_sidecar` records what the engine was
built from, with and for (also for an engine trtexec built: ``spade-edge engine sidecar``). The
runtime reads and checks the record (:mod:`spade_edge.runtime.engine_record`).
This module imports neither torch nor onnx nor TensorRT at import time: the device can run it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

from spade_edge.runtime import engine_record
from spade_edge.runtime.engine_record import SIDECAR_FORMAT, EngineError, file_sha256, make_logger, sidecar_path
from spade_edge.runtime.errors import require
from spade_edge.runtime.modelinfo import model_info_from_onnx

from .trt_plans import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_MB, BuildPlan, build_plan, input_shape, resolve

log = logging.getLogger(__name__)

__all__ = ["EngineError", "build_options", "engine_from_onnx", "write_sidecar"]


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_options(precision: str, max_batch: int, workspace_mb: int, timing_cache, plan: BuildPlan, tool: str) -> dict:
    """The sidecar's ``build`` record."""
    return {
        "tool": tool,
        "precision": precision,
        "max_batch": int(max_batch),
        "workspace_mb": int(workspace_mb),
        "timing_cache": None if timing_cache is None else os.fspath(timing_cache),
        "flags": list(plan.network_flags + plan.builder_flags),
    }


def write_sidecar(
    engine: str | os.PathLike,
    onnx_path: str | os.PathLike,
    precision: str,
    build: dict,
    trt_version=None,
    gpu: dict | None = None,
) -> dict:
    """Record what the engine at ``engine`` was built from, with and for (``<engine>.json``):
    ``trt_version`` and ``gpu`` default to the installed TensorRT and CUDA device 0."""
    engine, onnx_path = Path(engine), Path(onnx_path)
    info = model_info_from_onnx(onnx_path)
    engine_info = dataclasses.replace(info, precision=precision)  # what the runtime reads: the engine's precision
    record = {
        "format": SIDECAR_FORMAT,
        "engine": {"file": engine.name, "sha256": file_sha256(engine), "precision": precision},
        "onnx": {"file": onnx_path.name, "sha256": file_sha256(onnx_path)},
        "model": {"backbone": info.backbone, "fingerprint": info.fingerprint, "precision": info.precision},
        "model_info": json.loads(engine_info.to_json()),
        "tensorrt": str(engine_record.tensorrt_version() if trt_version is None else trt_version),
        "gpu": engine_record.gpu_identity() if gpu is None else dict(gpu),
        "build": dict(build),
    }
    _atomic_write(sidecar_path(engine), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def engine_from_onnx(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | os.PathLike | None = None,
) -> Path:
    """Build a TensorRT engine for batches 1..``max_batch`` (optimised for batch 1) from a
    spade-edge ONNX model; writes ``out`` and ``<out>.json``. ``timing_cache``: a file read before
    and written after the build, so later builds skip kernel timing."""
    onnx_path, out = Path(onnx_path), Path(out)
    if max_batch < 1 or workspace_mb < 1:
        raise ValueError("max_batch and workspace_mb must be >= 1")
    info = model_info_from_onnx(onnx_path)
    trt = require("tensorrt", "trt", "Building a TensorRT engine")
    plan = build_plan(precision, info.precision)
    logger = make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        raise EngineError(f"TensorRT could not create a builder: no usable CUDA GPU or driver? ({exc})") from exc
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(resolve(trt, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser refused the model:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in plan.builder_flags:
        config.set_flag(resolve(trt, name))
    profile = builder.create_optimization_profile()
    # tuned for one image at a time (the service's and the line's batch), batches up to max_batch allowed
    profile.set_shape(info.input_name, input_shape(info, 1), input_shape(info, 1), input_shape(info, max_batch))
    config.add_optimization_profile(profile)
    cache_file = None if timing_cache is None else Path(timing_cache)
    old = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    cache = config.create_timing_cache(old)  # None: bytes that are no timing cache
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("timing cache %s is unreadable or from another TensorRT or GPU: starting a new one", cache_file)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path}: " + "; ".join(logger.errors[-5:]))
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, memoryview(serialized))
    if cache_file is not None:
        _atomic_write(cache_file, memoryview(config.get_timing_cache().serialize()))
    write_sidecar(
        out,
        onnx_path,
        precision,
        build_options(precision, max_batch, workspace_mb, timing_cache, plan, "tensorrt-python"),
    )
    return out
