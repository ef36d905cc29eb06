"""The trtexec command line that builds what :func:`~spade_edge.export.engine.engine_from_onnx`
builds (jetson/build-engine.sh runs it on the device, then writes the sidecar with
``spade-edge engine sidecar``)."""

from __future__ import annotations

import os
import shlex

from spade_edge.runtime.modelinfo import model_info_from_onnx

from .trt_plans import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_MB, build_plan, input_shape


def trtexec_args(
    onnx: str | os.PathLike,
    out: str | os.PathLike,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | os.PathLike | None = None,
    *,
    version=None,
) -> list[str]:
    """The trtexec arguments (``version``: the TensorRT they are for, default the installed one)."""
    info = model_info_from_onnx(onnx)
    plan = build_plan(precision, info.precision, version)

    def shape(n: int) -> str:
        return f"{info.input_name}:" + "x".join(map(str, input_shape(info, n)))

    args = [
        "trtexec",
        f"--onnx={os.fspath(onnx)}",
        f"--saveEngine={os.fspath(out)}",
        f"--minShapes={shape(1)}",
        f"--optShapes={shape(1)}",
        f"--maxShapes={shape(max_batch)}",
        f"--memPoolSize=workspace:{int(workspace_mb)}M",
        *plan.trtexec_flags,
    ]
    if timing_cache is not None:
        args.append(f"--timingCacheFile={os.fspath(timing_cache)}")
    return args


def trtexec_command(
    onnx,
    out,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache=None,
    *,
    version=None,
) -> str:
    """The same, as one command line quoted for a POSIX shell."""
    return shlex.join(trtexec_args(onnx, out, precision, max_batch, workspace_mb, timing_cache, version=version))
