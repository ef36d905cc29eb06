"""TensorRT engines from Lite0 (fp32, fp16, int8) and the native TensorRT backend against ONNX
Runtime on the CPU, on real ELPV images. Skipped, with the reason reported, where TensorRT or a
CUDA device is missing (DESIGN.md section 4); the API names and the glue are also checked without
a GPU by tests/export/test_tensorrt_api.py.

Stated bounds, per output (cosine of every pixel feature, relative error ||trt - ref|| / ||ref||):
- fp32 engine vs ONNX Runtime fp32: cosine >= 0.9999, relative error <= 1e-2 (TensorRT may use
  TF32 for fp32 convolutions: 10-bit mantissa inputs, fp32 accumulation);
- fp16 engine vs ONNX Runtime fp32: cosine >= 0.999, relative error <= 2e-2 (the FP16 ONNX bound);
- int8 engine vs ONNX Runtime fp32: cosine >= 0.95 (the Q/DQ model's bound under ONNX Runtime),
  and vs ONNX Runtime running the same Q/DQ model: cosine >= 0.97.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from spade_edge.calibration.drift import feature_drift
from spade_edge.export import engine as eng
from spade_edge.export.trt_plans import PRECISIONS
from spade_edge.runtime import engine_record as record
from spade_edge.runtime.features.onnxruntime import OnnxRuntimeBackend

pytestmark = pytest.mark.gpu
MAX_BATCH = 4


def _no_gpu_reason() -> str | None:
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # not installed, or installed without its libraries
        return f"TensorRT is not usable here ({type(exc).__name__}: {exc}); pip install 'spade-edge[trt]'"
    try:
        gpu = record.gpu_identity()
    except Exception as exc:
        return f"no usable CUDA device: {exc}"
    print(f"TensorRT {tensorrt.__version__} on {gpu['name']} (compute capability {gpu['compute_capability']})")
    return None


@pytest.fixture(scope="module", autouse=True)
def gpu():
    reason = _no_gpu_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def onnx_models(lite0_onnx, elpv_normal, tmp_path_factory):
    from spade_edge.calibration.fp16 import fp16_from_onnx
    from spade_edge.calibration.int8 import int8_from_onnx

    d = tmp_path_factory.mktemp("trt-models")
    fp16_from_onnx(lite0_onnx, d / "lite0.fp16.onnx")
    int8_from_onnx(lite0_onnx, list(elpv_normal[40:72]), d / "lite0.int8.onnx", show_progress=False)
    return {"fp32": lite0_onnx, "fp16": d / "lite0.fp16.onnx", "int8": d / "lite0.int8.onnx"}


def _source(precision: str, onnx_models):
    """TensorRT 10 makes fp16 from the fp32 model (BuilderFlag.FP16); 11 needs the FP16 model."""
    if precision == "fp16" and record.tensorrt_version().major < 11:
        return onnx_models["fp32"]
    return onnx_models[precision]


@pytest.fixture(scope="module")
def engines(onnx_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("engines")
    cache = d / "timing.cache"
    return {
        p: eng.engine_from_onnx(_source(p, onnx_models), d / f"lite0.{p}.engine", p, MAX_BATCH, 1024, cache)
        for p in PRECISIONS
    }


@pytest.mark.parametrize("precision", PRECISIONS)
def test_build_writes_engine_sidecar_and_timing_cache(engines, onnx_models, precision):
    path = engines[precision]
    rec = record.check_engine(path, _source(precision, onnx_models))
    assert rec["engine"]["precision"] == rec["model_info"]["precision"] == precision
    assert rec["build"]["max_batch"] == MAX_BATCH and rec["tensorrt"] == str(record.tensorrt_version())
    assert rec["gpu"] == record.gpu_identity()
    assert (path.parent / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_matches_onnxruntime_cpu(engines, onnx_models, precision, elpv_normal):
    from spade_edge.datasets import elpv_cells
    from spade_edge.runtime.features.tensorrt import TensorRTBackend

    images = list(elpv_normal[100:106]) + list(elpv_cells(1.0, "mono")[:4])
    ref = OnnxRuntimeBackend.from_path(onnx_models["fp32"])
    with TensorRTBackend(engines[precision]) as trt:
        drift = feature_drift(ref, trt, images, batch=MAX_BATCH)
        same = (
            feature_drift(OnnxRuntimeBackend.from_path(onnx_models["int8"]), trt, images)
            if precision == "int8"
            else None
        )
    print(precision, json.dumps(drift, indent=1), json.dumps(same))
    for level, d in drift.items():
        if precision == "fp32":
            assert d["cosine_mean"] >= 0.9999 and d["rel_error"] <= 1e-2, (level, d)
        elif precision == "fp16":
            assert d["cosine_mean"] >= 0.999 and d["rel_error"] <= 2e-2, (level, d)
        else:
            assert d["cosine_mean"] >= 0.95 and same[level]["cosine_mean"] >= 0.97, (level, d, same[level])


def test_backend_outputs_and_batches(engines, lite0_onnx):
    from spade_edge.runtime.features.tensorrt import TensorRTBackend

    ref = OnnxRuntimeBackend.from_path(lite0_onnx)
    x = np.random.default_rng(0).integers(0, 256, (MAX_BATCH * 2 + 1, 224, 224, 3), dtype=np.uint8)
    with TensorRTBackend(engines["fp32"], lite0_onnx) as trt:
        assert trt.max_batch == MAX_BATCH and trt.info.fingerprint == ref.info.fingerprint
        out = trt(x)  # three slices: 4, 4, 1
        want = ref(x)
        assert set(out) == set(want)
        for k in want:
            assert out[k].dtype == np.float32 and out[k].shape == want[k].shape, k
        one = trt(x[-1:])
        for k in want:
            np.testing.assert_allclose(one[k][0], out[k][-1], rtol=1e-3, atol=1e-3 * np.abs(out[k]).max())
        assert all(v.shape[0] == 0 for v in trt(x[:0]).values())


def test_backend_refuses_an_engine_for_another_tensorrt(engines, tmp_path):
    import shutil

    from spade_edge.runtime.features.tensorrt import TensorRTBackend

    path = tmp_path / "copy.engine"
    shutil.copy(engines["fp32"], path)
    rec = json.loads(record.sidecar_path(engines["fp32"]).read_text())
    rec["tensorrt"] = "10.0.0"
    record.sidecar_path(path).write_text(json.dumps(rec))
    with pytest.raises(record.EngineError, match="built with TensorRT 10.0.0"):
        TensorRTBackend(path)
