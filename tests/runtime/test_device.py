import pytest

from spade_edge.runtime import device as dev
from spade_edge.runtime.features.onnxruntime import providers


def test_auto_falls_back_to_the_cpu_and_says_why(monkeypatch):
    monkeypatch.setattr(dev, "gpu_available", lambda: (False, "no usable CUDA device (test)"))
    assert dev.resolve_device("auto") == ("cpu", "cpu: no usable CUDA device (test)")


def test_auto_prefers_tensorrt_then_cuda(monkeypatch):
    monkeypatch.setattr(dev, "gpu_available", lambda: (True, "Orin"))
    monkeypatch.setattr(dev, "ort_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    assert dev.resolve_device("auto") == ("tensorrt", "tensorrt on Orin")
    monkeypatch.setattr(dev, "ort_providers", lambda: ["CUDAExecutionProvider"])
    monkeypatch.setattr(dev.importlib.util, "find_spec", lambda name: None)
    assert dev.resolve_device("auto") == ("cuda", "cuda on Orin")


def test_explicit_devices_and_bad_names():
    assert dev.resolve_device("cpu")[0] == "cpu" and dev.resolve_device("cuda")[0] == "cuda"
    with pytest.raises(ValueError, match="device must be one of"):
        dev.resolve_device("gpu0")


def test_provider_options():
    assert providers("cpu") == ["CPUExecutionProvider"]
    cuda = providers("cuda", device_id=1)
    assert cuda[0] == ("CUDAExecutionProvider", {"device_id": 1}) and cuda[-1] == "CPUExecutionProvider"
    trt = providers("tensorrt", fp16=True, cache_dir="/tmp/cache")
    name, opts = trt[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == "/tmp/cache"


def test_cpu_onnxruntime_refuses_gpu_providers_clearly(tmp_path):
    from spade_edge.runtime.errors import ModelError
    from spade_edge.runtime.features.onnxruntime import session_from_onnx

    from ..conftest import tiny_onnx

    tiny_onnx(tmp_path / "m.onnx")
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ModelError, match="onnxruntime-gpu"):
        session_from_onnx(tmp_path / "m.onnx", device="cuda")
