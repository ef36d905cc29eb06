"""Stand-ins for the GPU packages, injected at the import boundary (DESIGN.md section 4).

This folder holds ``cupy``, ``cupyx``, ``tensorrt`` and ``pycuda`` (``pycuda.driver``) packages
that behave like the real ones for the subset spade-edge uses, on the CPU: numpy arrays in real
host memory stand in for device memory, ONNX Runtime runs TensorRT engines, CUDA kernel sources
run as C++. They share one fake CUDA machine (``_standin_cuda.py``: devices, contexts current per
thread, memory owned by a device, streams) and keep CUDA's rules strictly, so that wiring bugs
(wrong device or context current in a thread, memory of another device, a missing synchronize, a
scalar of the wrong C type) fail here as they would on a GPU. Every stand-in module has
``STANDIN = True``.

With this folder first on ``sys.path`` (or ``PYTHONPATH`` for a subprocess), ``import cupy`` etc.
load the stand-ins. In a test::

    from tests.standins import use_standins

    def test_something(monkeypatch):
        use_standins(monkeypatch, gpus=2, trt_version="11.4.0")
        import cupy  # the stand-in, for this test only

and for a subprocess (``spade-edge serve``...): ``subprocess.run(..., env=standins_env(gpus=1))``.

Settings, read when the stand-ins are imported: ``SPADE_STANDIN_GPUS`` (number of fake GPUs,
default 1; 0: every CUDA call fails as on a machine without a usable GPU),
``SPADE_STANDIN_TRT_VERSION`` (default "10.3.0"), ``SPADE_STANDIN_KERNEL_CACHE`` (where compiled
kernels are kept). ``toolkit/`` is the stand-in machine's CUDA toolkit (``cupy.cuda.get_cuda_path()``):
placeholder headers for the stand-in NVRTC's include search.

This module is the helper only: it imports none of the stand-ins, which are top-level packages
when this folder is on sys.path (they also import as ``tests.standins.cupy`` etc. and then share
the same machine).
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

STANDINS = Path(__file__).resolve().parent
PACKAGES = ("cupy", "cupyx", "tensorrt", "pycuda")
SHARED = ("_standin_cuda", "_standin_kernels")
# real modules that must not be mixed with the stand-ins
REAL_ONLY = ("tensorrt_bindings", "cupy_backends", "cupyx_backends")


def module_names() -> list[str]:
    """Every module of the stand-in tree, by the name it has with this folder on sys.path."""
    names = list(SHARED)
    for package in PACKAGES:
        for path in (STANDINS / package).rglob("*.py"):
            parts = path.relative_to(STANDINS).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def use_standins(
    monkeypatch,
    gpus: int = 1,
    trt_version: str = "10.3.0",
    *,
    cupy: bool = True,
    pycuda: bool = True,
    tensorrt: bool = True,
) -> SimpleNamespace:
    """For the rest of the test: ``import cupy`` (cupyx, tensorrt, pycuda.driver) gives the
    stand-ins, on a fresh fake machine with ``gpus`` GPUs and TensorRT ``trt_version``.
    ``cupy=False`` (``pycuda=False``, ``tensorrt=False``) makes that package absent instead: its
    import fails and ``importlib.util.find_spec`` finds nothing, as where it is not installed.
    Everything is undone at teardown (sys.path, environment, sys.modules)."""
    monkeypatch.setenv("SPADE_STANDIN_GPUS", str(int(gpus)))
    monkeypatch.setenv("SPADE_STANDIN_TRT_VERSION", str(trt_version))
    ours = set(PACKAGES) | set(SHARED) | set(REAL_ONLY)
    for name in [n for n in sys.modules if _top(n) in ours]:  # earlier stand-ins or real packages
        monkeypatch.delitem(sys.modules, name)
    for name in module_names():
        # records "absent" so that teardown removes what the test imports under this name
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]
    for package, wanted in (("cupy", cupy), ("cupyx", cupy), ("pycuda", pycuda), ("tensorrt", tensorrt)):
        if not wanted:
            monkeypatch.setitem(sys.modules, package, None)  # import fails, find_spec gives None
    monkeypatch.syspath_prepend(str(STANDINS))
    importlib.invalidate_caches()
    _fresh_tensorrt_version(monkeypatch)
    return SimpleNamespace(path=STANDINS, gpus=int(gpus), trt_version=str(trt_version))


def _fresh_tensorrt_version(monkeypatch) -> None:
    """runtime.engine_record remembers the TensorRT version it saw first: give this test its own memory."""
    from spade_edge.runtime import engine_record

    wrapped = getattr(engine_record.tensorrt_version, "__wrapped__", None)
    if wrapped is not None:
        monkeypatch.setattr(engine_record, "tensorrt_version", lru_cache(maxsize=1)(wrapped))


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def use_ort_gpu_providers(monkeypatch, starts: bool = True) -> list:
    """ONNX Runtime as onnxruntime-gpu presents itself, on the CPU: the TensorRT and CUDA providers
    are compiled in (``get_available_providers``); a session computes on the CPU and reports the
    providers it was asked for (``get_providers``), or with ``starts=False`` the CPU alone, as when
    the CUDA, cuDNN or TensorRT libraries fail to load and ONNX Runtime falls back silently.
    Returns the provider lists sessions were made with (one per session), for their options."""
    import onnxruntime as ort

    real, made = ort.InferenceSession, []

    class Session(real):
        def __init__(self, path_or_bytes, sess_options=None, providers=None, **kwargs):
            made.append(list(providers or []))
            super().__init__(path_or_bytes, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)
            asked = [p[0] if isinstance(p, tuple) else p for p in providers or []]
            self._started = asked if starts else ["CPUExecutionProvider"]

        def get_providers(self):
            return list(self._started)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [*GPU_PROVIDERS, "CPUExecutionProvider"])
    return made


def standins_env(env: dict | None = None, gpus: int = 1, trt_version: str = "10.3.0") -> dict:
    """A copy of ``env`` (default: this process's environment) in which a Python subprocess imports
    the stand-ins: this folder first on PYTHONPATH, the machine's settings set."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(STANDINS), *filter(None, [env.get("PYTHONPATH")])])
    env["SPADE_STANDIN_GPUS"] = str(int(gpus))
    env["SPADE_STANDIN_TRT_VERSION"] = str(trt_version)
    return env


TRTEXEC = STANDINS / "bin" / "trtexec"  # trtexec's command line over the tensorrt stand-in

__all__ = ["STANDINS", "TRTEXEC", "module_names", "standins_env", "use_ort_gpu_providers", "use_standins"]
