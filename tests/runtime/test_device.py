"""runtime/device.py without a GPU: device names, provider options, and the CPU's answers. The GPU
roads are proven with the stand-ins in tests/test_gpu_road.py."""

import pytest

from spade_edge.runtime import device as dev
from spade_edge.runtime.errors import ModelError

from ..conftest import tiny_onnx


def test_device_names():
    assert dev.parse_device("cpu") == ("cpu", 0) and dev.parse_device("cuda:1") == ("cuda", 1)
    assert dev.parse_device("tensorrt") == ("tensorrt", 0) and dev.parse_device("auto") == ("auto", 0)
    for bad in ("gpu0", "cpu:1", "cuda:x", "auto:0", "tensorrt:-1", ""):
        with pytest.raises(ValueError, match=r"auto, cpu, cuda\[:N\], tensorrt\[:N\]"):
            dev.parse_device(bad)


def test_provider_options():
    assert dev.provider_list("cpu") == ["CPUExecutionProvider"]
    cuda = dev.provider_list("cuda", device_id=1)
    assert cuda[0] == ("CUDAExecutionProvider", {"device_id": 1}) and cuda[-1] == "CPUExecutionProvider"
    name, opts = dev.provider_list("tensorrt", device_id=2, fp16=True, cache_dir="/tmp/cache")[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] is True and opts["device_id"] == 2
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == "/tmp/cache"
    assert opts["trt_timing_cache_path"] == "/tmp/cache"


def test_engine_cache_lives_beside_the_model_or_in_the_cache(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    tiny_onnx(model)
    assert dev.engine_cache_dir(model) == tmp_path / "m.onnx.trt-cache"
    ro = tmp_path / "ro"
    ro.mkdir()
    tiny_onnx(ro / "m.onnx")
    ro.chmod(0o555)
    monkeypatch.setenv("SPADE_EDGE_CACHE", str(tmp_path / "cache"))
    try:
        other = dev.engine_cache_dir(ro / "m.onnx")
        import os

        if os.access(ro, os.W_OK):  # root writes anywhere: the folder beside the model is taken
            assert other == ro / "m.onnx.trt-cache"
        else:
            assert other.parent == tmp_path / "cache" / "trt" and other.is_dir()
    finally:
        ro.chmod(0o755)


def test_auto_on_a_cpu_build_says_why(tmp_path):
    import onnxruntime

    if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(onnxruntime.get_available_providers()):
        pytest.skip("this onnxruntime has GPU providers")
    tiny_onnx(tmp_path / "m.onnx")
    placed = dev.place(tmp_path / "m.onnx", "auto")
    assert placed.device == "cpu" and placed.backend.device == "cpu"
    assert placed.fallback == "this onnxruntime has no GPU provider" and "auto:" in placed.why
    for asked in ("cuda", "tensorrt:1"):  # asked for by name: refused, not replaced by the CPU
        with pytest.raises(ModelError, match="onnxruntime-gpu"):
            dev.place(tmp_path / "m.onnx", asked)


def test_engines_and_missing_files_are_refused_clearly(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        dev.place(tmp_path / "nope.onnx", "cpu")
    (tmp_path / "m.engine").write_bytes(b"x")
    with pytest.raises(ModelError, match="runs on an NVIDIA GPU; for --device cpu pass the ONNX model"):
        dev.place(tmp_path / "m.engine", "cpu")
