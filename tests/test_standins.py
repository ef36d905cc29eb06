"""The GPU-package stand-ins (tests/standins) against what they stand in for (DESIGN.md section 4).

A stand-in is worth something only if it is faithful: it has the real package's names (checked
against the real TensorRT bindings where they are installed), computes what the real one computes
(an engine built by ``engine_from_onnx`` gives ONNX Runtime's outputs exactly), and refuses what
the real one refuses, with the real exception and message (a thread without the engine's context,
memory of another device, no GPU, an engine of another TensorRT version). Then the road through
spade-edge's own code: the TensorRT backend and the CUDA scorer on the stand-ins, from the thread
that made them and from another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from spade_edge.export import engine as eng
from spade_edge.export import trt_plans as plans
from spade_edge.runtime import engine_record

from .conftest import tiny_onnx
from .export.test_tensorrt_api import INSTALLS, probe, stubs  # noqa: F401 (stubs: a fixture probe needs)
from .standins import STANDINS, module_names, standins_env, use_standins

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ("10.3.0", "11.4.0")
SIZE, MAX_BATCH = 32, 4


def _exists(module, dotted: str) -> bool:
    obj = module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _build(tmp_path, max_batch: int = MAX_BATCH) -> tuple[Path, Path]:
    """The tiny ONNX model and its engine, built by the project's own builder on the stand-in."""
    model = tmp_path / "tiny.onnx"
    tiny_onnx(model, size=SIZE)
    return model, eng.engine_from_onnx(model, tmp_path / "tiny.engine", "fp32", max_batch, 64)


def _reference(model, x) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": x})


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _in_thread(fn):
    """``fn()`` in a new thread (as the service's worker runs the model): its result or exception."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed back to the caller)
            out["error"] = exc

    t = threading.Thread(target=run, name="worker")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class _Engine:
    """An engine deserialized in the calling thread, with device buffers from ``alloc(nbytes) ->
    (keep, address)`` and pinned host buffers from ``pinned(shape, dtype)``."""

    def __init__(self, engine_path, alloc, pinned, batch: int):
        import tensorrt as trt

        self.trt = trt
        self.logger = engine_record.make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        assert self.engine is not None, self.logger.errors
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        assert self.context.set_input_shape("image", (batch, SIZE, SIZE, 3))
        self.host, self.device = {}, {}
        for n in self.names:
            dtype = trt.nptype(self.engine.get_tensor_dtype(n))
            self.host[n] = pinned(tuple(self.context.get_tensor_shape(n)), dtype)
            self.device[n] = alloc(self.host[n].nbytes)
            assert self.context.set_tensor_address(n, self.device[n][1])


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("version", VERSIONS)
def test_standin_has_every_tensorrt_name_the_project_uses(monkeypatch, version):
    use_standins(monkeypatch, trt_version=version)
    import tensorrt as trt

    assert trt.STANDIN and trt.__version__ == version
    own, other = (plans.TRT11_NAMES, plans.TRT10_NAMES) if version.startswith("11") else (plans.TRT10_NAMES, ())
    assert [n for n in plans.TRT_NAMES + own if not _exists(trt, n)] == []
    assert [n for n in other if _exists(trt, n)] == []  # TensorRT 11 has no EXPLICIT_BATCH, FP16, INT8
    assert engine_record.tensorrt_version() == engine_record.parse_version(version)  # what the builder routes on


VALUES = r"""
import json, sys
module = sys.argv[1]
trt = __import__(module)
enums = {"NetworkDefinitionCreationFlag": trt.NetworkDefinitionCreationFlag, "BuilderFlag": trt.BuilderFlag,
         "DataType": trt.DataType, "TensorIOMode": trt.TensorIOMode, "MemoryPoolType": trt.MemoryPoolType,
         "ILogger.Severity": trt.ILogger.Severity}
print(json.dumps({k: {m: int(v) for m, v in e.__members__.items()} for k, e in enums.items()}))
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_standin_names_and_enum_values_are_the_real_bindings(monkeypatch, version, stubs, tmp_path):  # noqa: F811
    """Where the real bindings of the same version are installed (tests/export/test_tensorrt_api.py
    says how): the project's names present in one are present in the other, and each enum member
    the stand-in has carries the real value."""
    same = [(v, site) for v, site in INSTALLS if v.split(".")[:2] == version.split(".")[:2]]
    if not same:
        pytest.skip(f"no real TensorRT {version} bindings installed to compare the stand-in with")
    real_version, site = same[0]
    real = probe(real_version, site, stubs, tmp_path)  # runs the real bindings with stub libraries
    env = dict(os.environ, LD_LIBRARY_PATH=str(stubs / real_version.split(".")[0]))
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])
    module = "tensorrt" if site is None or (Path(site) / "tensorrt").is_dir() else "tensorrt_bindings"
    run = subprocess.run(
        [sys.executable, "-c", VALUES, module], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    real_values = json.loads(run.stdout.strip().splitlines()[-1])

    use_standins(monkeypatch, trt_version=version)
    import tensorrt as trt

    ours = {n: _exists(trt, n) for n in real["present"]}
    assert ours == real["present"], {n: (ours[n], real["present"][n]) for n in ours if ours[n] != real["present"][n]}
    for dotted, members in real_values.items():
        mine = {m.name: int(m) for m in plans.resolve(trt, dotted)}
        assert {m: members.get(m) for m in mine} == mine, dotted
    # not a vacuous comparison: the versions differ, and so do the real bindings
    assert real["present"]["NetworkDefinitionCreationFlag.EXPLICIT_BATCH"] is version.startswith("10")


# ---------------------------------------------------------------------------- computing


@pytest.mark.parametrize("version", VERSIONS)
def test_engine_from_onnx_runs_like_onnx_runtime(monkeypatch, tmp_path, version):
    """The project's builder on the stand-in; the engine run with CuPy-stand-in buffers, one stream
    for copy-in, inference and copy-out, gives ONNX Runtime's CPU outputs bit for bit."""
    use_standins(monkeypatch, trt_version=version)
    import cupy as cp
    import cupyx

    model, engine_path = _build(tmp_path)
    record = engine_record.check_engine(engine_path, model)
    assert record["tensorrt"] == version and record["gpu"] == {
        "name": "Stand-in GPU (numpy)",
        "compute_capability": "8.7",
    }
    assert record["build"]["flags"] == (
        ["NetworkDefinitionCreationFlag.EXPLICIT_BATCH"]
        if version.startswith("10")
        else ["NetworkDefinitionCreationFlag.STRONGLY_TYPED"]
    )

    def alloc(nbytes):
        buf = cp.empty(nbytes, dtype=cp.uint8)
        return buf, buf.data.ptr

    e = _Engine(engine_path, alloc, cupyx.empty_pinned, MAX_BATCH)
    assert e.engine.get_tensor_profile_shape("image", 0)[2] == (MAX_BATCH, SIZE, SIZE, 3)
    rt, stream = cp.cuda.runtime, cp.cuda.Stream(non_blocking=True)
    for n in (MAX_BATCH, 1, 3):
        x = _images(n, seed=n)
        e.host["image"][:n] = x
        assert e.context.set_input_shape("image", x.shape)
        rt.memcpyAsync(e.device["image"][1], e.host["image"].ctypes.data, x.nbytes, rt.memcpyHostToDevice, stream.ptr)
        assert e.context.execute_async_v3(stream.ptr), e.logger.errors
        shapes = {o: tuple(e.context.get_tensor_shape(o)) for o in e.names[1:]}
        for o in e.names[1:]:
            nbytes = int(np.prod(shapes[o])) * e.host[o].itemsize
            rt.memcpyAsync(e.host[o].ctypes.data, e.device[o][1], nbytes, rt.memcpyDeviceToHost, stream.ptr)
        stream.synchronize()
        for o, want in zip(e.names[1:], _reference(model, x)):
            got = e.host[o].reshape(-1)[: want.size].reshape(shapes[o])
            np.testing.assert_array_equal(got, want)


def test_results_are_there_only_after_a_synchronize(monkeypatch, tmp_path):
    """Copies from and to pinned memory, and inference, run when the stream is synchronized: code
    that reads a result without synchronizing reads what was there before (here: NaN)."""
    use_standins(monkeypatch)
    import cupy as cp
    import cupyx

    def alloc(nbytes):
        buf = cp.empty(nbytes, cp.uint8)
        return buf, buf.data.ptr

    model, engine_path = _build(tmp_path)
    e = _Engine(engine_path, alloc, cupyx.empty_pinned, 2)
    rt, stream = cp.cuda.runtime, cp.cuda.Stream(non_blocking=True)
    e.host["image"][...] = _images(2)
    rt.memcpyAsync(
        e.device["image"][1], e.host["image"].ctypes.data, e.host["image"].nbytes, rt.memcpyHostToDevice, stream.ptr
    )
    assert e.context.execute_async_v3(stream.ptr)
    rt.memcpyAsync(
        e.host["global"].ctypes.data, e.device["global"][1], e.host["global"].nbytes, rt.memcpyDeviceToHost, stream.ptr
    )
    assert np.isnan(e.host["global"]).all()  # not yet
    stream.synchronize()
    np.testing.assert_array_equal(e.host["global"], _reference(model, e.host["image"])[2])


def test_cuda_scorer_runs_its_kernel_on_the_cupy_standin(monkeypatch):
    """The GPU scorer's glue and its CUDA kernel (compiled as C++ by the RawModule stand-in) give
    the exact top-kappa on each device, called from a thread whose current device is 0."""
    from spade_edge.runtime.scoring.cuda import CudaScorer

    from .runtime.test_cuda_kernel import reference, tie_data

    use_standins(monkeypatch, gpus=2)
    import cupy as cp

    launches = []  # the device current at each kernel launch
    launch = cp._rawmodule.Function.__call__
    monkeypatch.setattr(
        cp._rawmodule.Function,
        "__call__",
        lambda self, *a, **k: launches.append(cp.cuda.Device().id) or launch(self, *a, **k),
    )
    q, g = tie_data(7)
    blocks = [g[:150], g[150:155].astype(np.float16), g[155:].astype(np.int8)]
    want = reference(q, g, 5)
    for device in (0, 1):
        scorer = CudaScorer(tile_bytes=4 * len(q) * 100, device_id=device)
        for top in (scorer.topk(q, blocks, 5), _in_thread(lambda s=scorer: s.topk(q, blocks, 5))):
            np.testing.assert_array_equal(top.indices, want.indices)
            np.testing.assert_allclose(top.distances, want.distances, rtol=1e-5)
            assert type(top.distances) is np.ndarray  # asnumpy: host arrays out
        assert launches and set(launches) == {device}
        launches.clear()


# ---------------------------------------------------------------------------- the backend, the road


def _backend(monkeypatch, tmp_path, memory: str, gpus: int = 1, device: int = 0, max_batch: int = 3):
    use_standins(monkeypatch, gpus=gpus, cupy=memory == "cupy")  # without CuPy, the GPU's identity comes from pycuda
    from spade_edge.runtime.features.tensorrt import TensorRTBackend

    model, engine_path = _build(tmp_path, max_batch)
    return model, TensorRTBackend(engine_path, model, device=device)


def _check_same_as_onnx_runtime(model, backend, x):
    want = dict(zip(("a", "b", "global"), _reference(model, x)))  # tiny_onnx's outputs
    got = backend(x)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("memory", ["cupy", "pycuda"])
def test_tensorrt_backend_on_the_standins(monkeypatch, tmp_path, memory):
    model, backend = _backend(monkeypatch, tmp_path, memory)
    import tensorrt as trt

    assert trt.STANDIN and backend.max_batch == 3
    _check_same_as_onnx_runtime(model, backend, _images(7))  # slices of 3, 3, 1
    backend.close()


@pytest.mark.parametrize("memory, device", [("cupy", 0), ("cupy", 1), ("pycuda", 0), ("pycuda", 1)])
def test_tensorrt_backend_loads_serves_and_closes_in_different_threads(monkeypatch, tmp_path, memory, device):
    """As the service uses it: loaded (and warmed up) in one thread, run in its worker thread, closed
    from a third. CUDA's current device and context belong to a thread, so each call must make its
    own current: the stand-ins fail otherwise, as a GPU would (for device 0 too with pycuda, whose
    driver API never makes a context current by itself)."""
    model, backend = _backend(monkeypatch, tmp_path, memory, gpus=2, device=device)
    x = _images(4)
    backend(x[:1])  # the warm-up, in the loading thread
    _in_thread(lambda: _check_same_as_onnx_runtime(model, backend, x))
    _in_thread(backend.close)
    _in_thread(backend.close)  # more than once is fine


# ---------------------------------------------------------------------------- strict where CUDA is


def test_pycuda_calls_need_a_context_current_in_the_calling_thread(monkeypatch):
    use_standins(monkeypatch)
    import pycuda.driver as drv

    with pytest.raises(drv.LogicError, match=r"^cuDeviceGet failed: initialization error"):
        drv.Device(0)
    drv.init()
    ctx = drv.Device(0).retain_primary_context()
    with pytest.raises(drv.LogicError, match=r"^cuMemAlloc failed: invalid device context"):
        drv.mem_alloc(64)  # retained, not pushed: not current
    ctx.push()
    try:
        mem, host, stream = drv.mem_alloc(64), drv.pagelocked_empty(16, np.float32), drv.Stream()
        drv.memcpy_htod_async(mem, host, stream)
        with pytest.raises(drv.LogicError, match=r"^cuMemcpyHtoDAsync failed: invalid device context\n"):
            _in_thread(lambda: drv.memcpy_htod_async(mem, host, stream))
        with pytest.raises(drv.LogicError, match=r"^cuStreamCreate failed: invalid device context"):
            _in_thread(drv.Stream)

        def pushed():  # with the context pushed in the worker, the same calls work
            ctx.push()
            try:
                drv.memcpy_htod_async(mem, host, stream)
                stream.synchronize()
            finally:
                drv.Context.pop()
            return drv.Context.get_current()

        assert _in_thread(pushed) is None
        with pytest.raises(drv.LogicError, match=r"^cuMemcpyHtoDAsync failed: invalid argument"):
            drv.memcpy_htod_async(int(mem) + 32, host, stream)  # 64 bytes do not fit past offset 32
        ptr = int(mem)
        mem.free()
        with pytest.raises(drv.LogicError, match=r"^cuMemcpyHtoD failed: invalid argument\n.*not live device memory"):
            drv.memcpy_htod(ptr, host)  # used after free
    finally:
        drv.Context.pop()
    assert drv.Context.get_current() is None
    with pytest.raises(drv.LogicError, match=r"^cuCtxPopCurrent failed: invalid device context"):
        drv.Context.pop()


def test_tensorrt_enqueue_needs_the_engines_context_in_the_calling_thread(monkeypatch, tmp_path):
    """An engine deserialized with device 1's context pushed (pycuda) runs only from a thread where
    that context is current; a fresh thread gets device 0's primary context from the CUDA runtime."""
    use_standins(monkeypatch, gpus=2)
    import pycuda.driver as drv

    model, engine_path = _build(tmp_path)
    drv.init()
    ctx = drv.Device(1).retain_primary_context()
    ctx.push()
    try:

        def alloc(nbytes):
            mem = drv.mem_alloc(nbytes)
            return mem, int(mem)

        e = _Engine(engine_path, alloc, drv.pagelocked_empty, 2)
        stream = drv.Stream()
        e.host["image"][...] = _images(2)
        drv.memcpy_htod_async(e.device["image"][0], e.host["image"], stream)
        assert not _in_thread(lambda: e.context.execute_async_v3(stream.handle))
        assert "the engine belongs to <stand-in primary context of device 1>" in e.logger.errors[-1]
        assert e.logger.errors[-1].startswith("IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime")

        def pushed():
            ctx.push()
            try:
                return e.context.execute_async_v3(stream.handle)
            finally:
                drv.Context.pop()

        assert _in_thread(pushed), e.logger.errors
        drv.memcpy_dtoh_async(e.host["global"], e.device["global"][0], stream)
        stream.synchronize()
        np.testing.assert_array_equal(e.host["global"], _reference(model, e.host["image"])[2])
        with pytest.raises(TypeError, match="incompatible function arguments"):
            e.context.execute_async_v3(stream)  # the Stream object, not its handle
    finally:
        drv.Context.pop()


def test_runtime_api_makes_device_0_current_in_a_fresh_thread(monkeypatch):
    """What real CUDA does, and the stand-in with it: the first runtime call of a thread (CuPy,
    TensorRT) makes the primary context of device 0 current; the driver API (pycuda) then sees it."""
    use_standins(monkeypatch, gpus=2)
    import cupy as cp
    import pycuda.driver as drv

    drv.init()

    def fresh():
        before = drv.Context.get_current()
        cp.empty(4)  # a runtime call
        return before, drv.Context.get_current(), cp.cuda.Device().id

    before, after, device = _in_thread(fresh)
    assert before is None and after == drv.Device(0).retain_primary_context() and device == 0


def test_cupy_current_device_is_per_thread(monkeypatch):
    use_standins(monkeypatch, gpus=2)
    import cupy as cp

    with cp.cuda.Device(1):
        assert cp.cuda.Device().id == 1 and cp.empty(3).device.id == 1
        assert _in_thread(lambda: cp.cuda.Device().id) == 0  # another thread: its own current device
        assert _in_thread(lambda: cp.cuda.Device(1).use() or cp.cuda.Device().id) == 1
        assert cp.cuda.Device().id == 1
    assert cp.cuda.Device().id == 0
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match=r"^cudaErrorInvalidDevice: invalid device ordinal"):
        cp.cuda.Device(2).use()
    cp.cuda.Device(2)  # naming a device checks nothing; using it does


def test_cupy_refuses_memory_of_another_device(monkeypatch):
    use_standins(monkeypatch, gpus=2)
    import cupy as cp
    import cupyx

    rt = cp.cuda.runtime
    host = cupyx.zeros_pinned(16, np.uint8)
    with cp.cuda.Device(1):
        d1 = cp.ones(16, cp.uint8)
        rt.memcpyAsync(d1.data.ptr, host.ctypes.data, 16, rt.memcpyHostToDevice, 0)  # on its own device: fine
    with pytest.raises(rt.CUDARuntimeError, match=r"^cudaErrorInvalidValue: invalid argument\n.*device 1") as err:
        rt.memcpyAsync(d1.data.ptr, host.ctypes.data, 16, rt.memcpyHostToDevice, 0)
    assert err.value.status == 1
    with pytest.raises(
        ValueError,
        match=r"^Array device must be same as the current device: array device = 1 while "
        r"current = 0",
    ):
        d1 + 1
    with cp.cuda.Device(1):
        m1 = cp.ones((4, 4), cp.float32)
    with pytest.raises(ValueError, match="Array device must be same"):
        cp.matmul(m1, cp.ones((4, 4), cp.float32))
    small = cp.zeros(8, cp.uint8)
    with cp.cuda.Device(1):
        stream1 = cp.cuda.Stream()
    with pytest.raises(rt.CUDARuntimeError, match=r"^cudaErrorInvalidResourceHandle"):
        rt.memcpyAsync(small.data.ptr, host.ctypes.data, 8, rt.memcpyHostToDevice, stream1.ptr)
    with pytest.raises(rt.CUDARuntimeError, match=r"^cudaErrorInvalidValue.*\n.*pinned.*not device memory"):
        rt.memcpyAsync(host.ctypes.data, host.ctypes.data, 16, rt.memcpyHostToDevice, 0)
    with pytest.raises(rt.CUDARuntimeError, match="runs past the end"):
        rt.memcpyAsync(small.data.ptr, host.ctypes.data, 16, rt.memcpyHostToDevice, 0)
    np.testing.assert_array_equal(cp.asnumpy(cp.asarray(d1)), np.zeros(16))  # asarray copies it across


def test_cupy_arrays_do_not_mix_with_numpy_arrays(monkeypatch):
    use_standins(monkeypatch)
    import cupy as cp

    a = cp.asarray(np.arange(6, dtype=np.float32))
    for bad in (lambda: a + np.ones(6), lambda: np.ones(6) * a, lambda: cp.concatenate([a, np.ones(2)])):
        with pytest.raises(TypeError, match=r"^Unsupported type <class 'numpy.ndarray'>"):
            bad()
    assert isinstance(a.sum(), cp.ndarray) and a.sum().shape == ()  # 0-d device arrays, as CuPy
    assert type(cp.asnumpy(a)) is np.ndarray and a.data.ptr % 256 == 0 and a.data.ptr == a.ctypes.data


def test_kernel_arguments_are_checked_as_a_gpu_would_need_them(monkeypatch):
    use_standins(monkeypatch, gpus=2)
    import cupy as cp

    source = (
        'extern "C" __global__ void axpy(float a, const float* x, float* y, int n)\n'
        "{ int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] += a * x[i]; }\n"
    )
    kernel = cp.RawModule(code=source).get_function("axpy")
    x, y = cp.asarray(np.arange(5, dtype=np.float32)), cp.ones(5, cp.float32)
    kernel((1,), (32,), (np.float32(2), x, y, np.int32(5)))
    np.testing.assert_array_equal(cp.asnumpy(y), 1 + 2 * np.arange(5))
    bad = {
        r"given int 5, which CuPy passes as 8 bytes of int64": (np.float32(2), x, y, 5),
        r"given float 2.0, which CuPy passes as 8 bytes of float64": (2.0, x, y, np.int32(5)),
        r"^Unsupported type <class 'numpy.ndarray'>": (np.float32(2), np.zeros(5, np.float32), y, np.int32(5)),
        r"given a float64 array": (np.float32(2), x.astype(cp.float64), y, np.int32(5)),
        r"takes 4 arguments, got 3": (np.float32(2), x, y),
    }
    for message, args in bad.items():
        with pytest.raises(TypeError, match=message):
            kernel((1,), (32,), args)
    with pytest.raises(cp.cuda.driver.CUDADriverError, match=r"^CUDA_ERROR_INVALID_VALUE"):
        kernel((1,), (2048,), (np.float32(2), x, y, np.int32(5)))
    with pytest.raises(cp.cuda.driver.CUDADriverError, match=r"^CUDA_ERROR_NOT_FOUND: named symbol not found"):
        cp.RawModule(code=source).get_function("saxpy")
    with cp.cuda.Device(1), pytest.raises(cp.cuda.runtime.CUDARuntimeError, match=r"^cudaErrorIllegalAddress"):
        kernel((1,), (32,), (np.float32(2), x, y, np.int32(5)))
    with pytest.raises(cp.cuda.compiler.CompileException, match="g\\+\\+ failed"):
        cp.RawModule(code=source.replace("y[i] +=", "undeclared[i] +=")).get_function("axpy")


def test_tensorrt_refuses_what_tensorrt_refuses(monkeypatch, tmp_path):
    use_standins(monkeypatch)
    import cupy as cp
    import cupyx
    import tensorrt as trt

    model, engine_path = _build(tmp_path)
    logger = engine_record.make_logger(trt)
    builder = trt.Builder(logger)
    not_onnx = tmp_path / "not.onnx"
    not_onnx.write_text("this is no model")
    parser = trt.OnnxParser(builder.create_network(0), logger)
    assert not parser.parse_from_file(str(not_onnx)) and parser.num_errors == 1
    assert "MODEL_DESERIALIZE_FAILED" in str(parser.get_error(0))

    def build(profile_shape=None, flags=0, builder_flag=None):
        network = builder.create_network(flags)
        assert trt.OnnxParser(network, logger).parse_from_file(str(model))
        config = builder.create_builder_config()
        if builder_flag is not None:
            config.set_flag(builder_flag)
        if profile_shape is not None:
            profile = builder.create_optimization_profile()
            profile.set_shape("image", profile_shape, profile_shape, profile_shape)
            config.add_optimization_profile(profile)
        return builder.build_serialized_network(network, config)

    assert build() is None and "no optimization profile has been defined" in logger.errors[-1]
    assert build((1, 224, 224, 3)) is None and "inconsistent with the network's (-1, 32, 32, 3)" in logger.errors[-1]
    strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert build((1, SIZE, SIZE, 3), strongly, trt.BuilderFlag.FP16) is None and "strongly typed" in logger.errors[-1]
    assert build((1, SIZE, SIZE, 3)) is not None
    with pytest.raises(TypeError):
        builder.create_builder_config().set_flag(0)  # pybind11 takes the enum only
    with pytest.raises(RuntimeError, match="inconsistent with other shapes"):
        builder.create_optimization_profile().set_shape(
            "image", (4, SIZE, SIZE, 3), (1, SIZE, SIZE, 3), (4, SIZE, SIZE, 3)
        )
    assert trt.Runtime(logger).deserialize_cuda_engine(b"\0" * 64) is None and "Magic tag" in logger.errors[-1]

    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    buf = cp.empty(1 << 16, cp.uint8)
    stream = cp.cuda.Stream()
    assert not context.execute_async_v3(stream.ptr) and "set_input_shape" in logger.errors[-1]
    assert not context.set_input_shape("image", (MAX_BATCH + 1, SIZE, SIZE, 3))
    assert context.set_input_shape("image", (2, SIZE, SIZE, 3))
    assert not context.set_tensor_address("image", buf.data.ptr + 4) and "256-byte aligned" in logger.errors[-1]
    assert not context.set_tensor_address("nope", buf.data.ptr)
    for name in ("image", "a", "b"):
        assert context.set_tensor_address(name, buf.data.ptr)
    assert not context.execute_async_v3(stream.ptr) and "output tensor global" in logger.errors[-1]
    small = cp.empty(8, cp.uint8)  # 8 bytes, where 2 x 3 floats are needed
    assert context.set_tensor_address("global", small.data.ptr)
    assert not context.execute_async_v3(stream.ptr) and "runs past the end" in logger.errors[-1]
    pinned = cupyx.empty_pinned(1024, np.uint8)
    assert context.set_tensor_address("global", pinned.ctypes.data)
    assert not context.execute_async_v3(stream.ptr) and "not device memory" in logger.errors[-1]
    assert context.set_tensor_address("global", buf.data.ptr)
    assert not context.execute_async_v3(stream.ptr + 1) and "not a live CUDA stream" in logger.errors[-1]
    assert context.execute_async_v3(stream.ptr)
    assert not context.execute_async_v3(cp.cuda.Stream().ptr) and "still has an inference queued" in logger.errors[-1]
    stream.synchronize()
    assert context.execute_async_v3(0)  # the default stream: at once (TensorRT warns)


def test_freed_memory_is_reported_by_the_synchronize(monkeypatch):
    use_standins(monkeypatch)
    import cupy as cp
    import cupyx

    rt, stream = cp.cuda.runtime, cp.cuda.Stream(non_blocking=True)
    device, host = cp.zeros(64, cp.uint8), cupyx.empty_pinned(64, np.uint8)
    rt.memcpyAsync(host.ctypes.data, device.data.ptr, 64, rt.memcpyDeviceToHost, stream.ptr)
    del host  # freed while the copy into it is still queued
    with pytest.raises(rt.CUDARuntimeError, match=r"^cudaErrorIllegalAddress.*\n.*freed before the queued work ran"):
        stream.synchronize()


@pytest.mark.parametrize("version", VERSIONS)
def test_no_gpu(monkeypatch, tmp_path, version):
    use_standins(monkeypatch, gpus=0, trt_version=version)
    import cupy as cp
    import pycuda.driver as drv
    import tensorrt as trt

    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match=r"^cudaErrorNoDevice: no CUDA-capable device"):
        cp.cuda.runtime.getDeviceCount()
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError):
        cp.zeros(3)
    with pytest.raises(drv.RuntimeError, match=r"^cuInit failed: no CUDA-capable device is detected"):
        drv.init()
    with pytest.raises(TypeError, match="factory function returned nullptr"):
        trt.Builder(engine_record.make_logger(trt))
    model = tmp_path / "tiny.onnx"
    tiny_onnx(model, size=SIZE)
    with pytest.raises(engine_record.EngineError, match="could not create a builder"):
        eng.engine_from_onnx(model, tmp_path / "x.engine")


def test_an_engine_of_another_tensorrt_version_is_refused(monkeypatch, tmp_path):
    use_standins(monkeypatch, trt_version="10.3.0")
    _, engine_path = _build(tmp_path)
    use_standins(monkeypatch, trt_version="11.4.0")  # a fresh import: another TensorRT
    import tensorrt as trt

    assert trt.__version__ == "11.4.0"
    logger = engine_record.make_logger(trt)
    assert trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes()) is None
    assert "Version tag does not match" in logger.errors[-1] and "10.3.0" in logger.errors[-1]
    with pytest.raises(engine_record.EngineError, match="TensorRT"):
        engine_record.check_engine(engine_path)  # and the sidecar says so before TensorRT is asked


def test_a_logger_must_call_the_base_init(monkeypatch):
    use_standins(monkeypatch)
    import tensorrt as trt

    class Forgetful(trt.ILogger):
        def __init__(self):
            pass

        def log(self, severity, msg):
            pass

    with pytest.raises(TypeError, match=r"ILogger.__init__\(\) must be called"):
        Forgetful()
    with pytest.raises(TypeError):
        trt.Runtime(object())
    assert int(trt.ILogger.Severity.ERROR) == 1 and trt.ILogger.Severity.ERROR != 1  # pybind11 enums
    with pytest.raises(TypeError):
        1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED


# ---------------------------------------------------------------------------- the stand-ins themselves


def test_every_public_standin_module_says_so(monkeypatch):
    use_standins(monkeypatch)
    import importlib

    for name in ("cupy", "cupy.cuda", "cupy.cuda.runtime", "cupyx", "tensorrt", "pycuda", "pycuda.driver"):
        module = importlib.import_module(name)
        assert module.STANDIN is True and Path(module.__file__).is_relative_to(STANDINS), name
    assert set(module_names()) >= {"cupy", "cupy.cuda.runtime", "tensorrt", "pycuda.driver", "_standin_cuda"}
    with pytest.raises(ImportError):
        importlib.import_module("pycuda.autoinit")  # spade-edge must make its context itself


def test_standins_reach_a_subprocess(tmp_path):
    """``standins_env``: a subprocess (here the engine commands, run as jetson/build-engine.sh runs
    them) imports the stand-ins with the machine's settings."""
    env = standins_env(gpus=3, trt_version="11.4.0")
    code = (
        "import cupy, cupyx, tensorrt, pycuda.driver as drv\n"
        "assert all(m.STANDIN for m in (cupy, cupyx, tensorrt, drv))\n"
        "print(tensorrt.__version__, cupy.cuda.runtime.getDeviceCount())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.split("\n")[0] == "11.4.0 3", out.stderr
    model = tmp_path / "tiny.onnx"
    tiny_onnx(model, size=SIZE)
    engine = tmp_path / "tiny.engine"
    for args in (
        ["build-engine", "-m", str(model), "-o", str(engine), "--max-batch", "2"],
        ["engine", "check", str(engine), "-m", str(model)],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "spade_edge", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert out.returncode == 0, out.stderr
    assert "ok (fp32, TensorRT 11.4.0, Stand-in GPU (numpy))" in out.stdout


def test_standins_import_both_ways_and_share_one_machine():
    """``import tests.standins`` imports no stand-in; ``tests.standins.cupy`` (without the folder on
    sys.path) works and shares the machine with ``tests.standins.pycuda``."""
    code = (
        "import sys, tests.standins\n"
        "assert not {'cupy', 'tensorrt', 'pycuda', '_standin_cuda'} & set(sys.modules)\n"
        "import tests.standins.cupy as cp, tests.standins.pycuda.driver as drv\n"
        "assert sys.modules['_standin_cuda'] is sys.modules['tests.standins._standin_cuda']\n"
        "a = cp.zeros(4)\n"
        "drv.init()\n"
        "assert drv.Context.get_current() == drv.Device(0).retain_primary_context()\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_more_of_the_cuda_apis_behave(monkeypatch):
    """Smaller parts: streams as context managers, synchronous and device-to-device copies, the
    pycuda context made by make_context, RawKernel, and a package made absent."""
    use_standins(monkeypatch, gpus=2, tensorrt=False)
    import cupy as cp
    import pycuda.driver as drv

    rt = cp.cuda.runtime
    a, b = cp.asarray(np.arange(8, dtype=np.int64)), cp.zeros(8, cp.int64)
    rt.memcpy(b.data.ptr, a.data.ptr, a.nbytes, rt.memcpyDeviceToDevice)
    out = np.zeros(8, np.int64)
    rt.memcpy(out.ctypes.data, b.data.ptr, b.nbytes, rt.memcpyDefault)  # the direction read from the addresses
    np.testing.assert_array_equal(out, np.arange(8))
    stream = cp.cuda.Stream()
    with stream:
        assert cp.cuda.get_current_stream() == stream
    assert cp.cuda.get_current_stream().ptr == 0
    double = cp.RawKernel(
        'extern "C" __global__ void twice(long long* x, int n)\n{ int i = threadIdx.x; if (i < n) x[i] *= 2; }', "twice"
    )
    double((1,), (8,), (b, np.int32(8)), stream=stream)
    assert not stream.done  # queued
    stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(b), 2 * np.arange(8))
    with pytest.raises(ImportError):
        import tensorrt  # noqa: F401
    drv.init()
    made = drv.Device(1).make_context()  # current at once
    assert drv.Context.get_current() == made and drv.Context.get_device() == drv.Device(1)
    assert cp.cuda.Device().id == 1  # the runtime follows the current context
    with pytest.raises(ValueError, match="Array device must be same"):
        b + 1  # memory of device 0's primary context
    made.detach()  # popped: the primary context the runtime calls made current is back on top
    assert drv.Context.get_current() == drv.Device(0).retain_primary_context()


def test_nothing_is_left_behind_by_the_tests_above():
    assert not [n for n in sys.modules if n.split(".")[0] in ("cupy", "cupyx", "tensorrt", "pycuda", "_standin_cuda")]
    assert str(STANDINS) not in sys.path and "SPADE_STANDIN_GPUS" not in os.environ
