"""Every exported model is one TensorRT's ONNX parser takes (a static check, no TensorRT needed):
operators from the list in export/trt_ops.py (TensorRT's operator support documentation), data
types TensorRT accepts where they occur (uint8 only at the input and straight into a Cast; Q/DQ
of int8 with zero points 0), and shapes within TensorRT's limits at the largest batch the model
declares (static but for the batch, no tensor over 2^31-1 elements)."""

from __future__ import annotations

import pytest

from spade_edge.export.onnx_export import MAX_BATCH
from spade_edge.export.trt_ops import MAX_ELEMENTS, TRT_ONNX_OPS, tensorrt_onnx_problems

BACKBONES = ("efficientnet_lite0", "wide_resnet50_2")
VARIANTS = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def models(lite0_onnx, elpv_normal, tmp_path_factory):
    """(backbone, precision) -> ONNX path, made on first use."""
    made = {("efficientnet_lite0", "fp32"): lite0_onnx}
    folder = tmp_path_factory.mktemp("trt-ops")

    def get(backbone: str, precision: str):
        key = (backbone, precision)
        if key not in made:
            fp32 = get(backbone, "fp32") if precision != "fp32" else None
            out = folder / f"{backbone}.{precision}.onnx"
            if precision == "fp32":
                import torch

                from spade_edge.export.backbones import create_backbone
                from spade_edge.export.onnx_export import onnx_from_backbone

                torch.manual_seed(0)
                onnx_from_backbone(create_backbone(backbone, weights="random"), backbone, out)
            elif precision == "fp16":
                from spade_edge.calibration.fp16 import fp16_from_onnx

                fp16_from_onnx(fp32, out)
            else:
                from spade_edge.calibration.int8 import Int8Options, int8_from_onnx

                int8_from_onnx(fp32, list(elpv_normal[:4]), out, Int8Options(), show_progress=False)
            made[key] = out
        return made[key]

    return get


@pytest.mark.parametrize("precision", VARIANTS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_exported_model_is_one_tensorrt_parses(models, backbone, precision):
    problems = tensorrt_onnx_problems(models(backbone, precision), MAX_BATCH)
    assert not problems, f"{backbone} {precision}, {len(problems)} problems:\n" + "\n".join(problems[:10])


# ---------------------------------------------------------------------------- the checker itself, on known answers


def _graph(nodes, inputs, outputs, inits=(), opset=18):
    from onnx import helper

    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 8
    return model


def _io(name, dtype, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, dtype, shape)


def test_checker_passes_a_good_graph_and_names_each_problem():
    import numpy as np
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    good = _graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=T.FLOAT),
            helper.make_node("Transpose", ["f"], ["y"], perm=[0, 3, 1, 2]),
        ],
        [_io("image", T.UINT8, ["N", 8, 8, 3])],
        [_io("y", T.FLOAT, ["N", 3, 8, 8])],
    )
    assert tensorrt_onnx_problems(good, 4) == []
    # uint8 into a Transpose (TensorRT: uint8 only into a Cast), as torch exports permute-then-cast
    bad = _graph(
        [
            helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2]),
            helper.make_node("Cast", ["t"], ["y"], to=T.FLOAT),
        ],
        [_io("image", T.UINT8, ["N", 8, 8, 3])],
        [_io("y", T.FLOAT, ["N", 3, 8, 8])],
    )
    found = tensorrt_onnx_problems(bad, 4)
    assert any("uint8 input 'image' feeds a Transpose" in p for p in found)
    assert any("tensor 't' (Transpose): uint8" in p for p in found)
    # an int32 bias dequantized (ONNX Runtime's default QuantizeBias=True), a non-zero zero point,
    # an operator TensorRT lacks, a custom domain, a tensor over 2^31-1 elements at the max batch
    inits = [
        numpy_helper.from_array(np.arange(4, dtype=np.int32), "b_q"),
        numpy_helper.from_array(np.float32(0.1), "s"),
        numpy_helper.from_array(np.int8(3), "zp"),
        numpy_helper.from_array(np.zeros(4, np.float32), "w"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["b_q", "s"], ["b"]),
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
        helper.make_node("Unique", ["xd"], ["u"]),
        helper.make_node("Gelu", ["xd"], ["gl"], domain="com.microsoft"),
        helper.make_node("Add", ["xd", "b"], ["y"]),
    ]
    model = _graph(
        nodes,
        [_io("x", T.FLOAT, ["N", 1 << 29, 4])],
        [_io("y", T.FLOAT, ["N", 1 << 29, 4]), _io("u", T.FLOAT, None), _io("gl", T.FLOAT, ["N", 1 << 29, 4])],
        inits,
        opset=21,
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    found = "\n".join(tensorrt_onnx_problems(model, 2))
    for expected in (
        "opset 21 is outside",
        "DequantizeLinear node '': input is INT32",
        "zero point must be a constant 0",
        "Unique node 'u': operator not supported",
        "custom domain 'com.microsoft'",
        "over TensorRT's 2^31-1",
    ):
        assert expected in found, (expected, found)
    assert 2 * (1 << 29) * 4 > MAX_ELEMENTS


def test_operator_list_holds_what_these_models_need():
    assert {
        "Conv",
        "Relu",
        "Clip",
        "MaxPool",
        "Add",
        "Mul",
        "Cast",
        "Transpose",
        "ReduceMean",
        "GlobalAveragePool",
        "QuantizeLinear",
        "DequantizeLinear",
        "Flatten",
    } <= TRT_ONNX_OPS
    assert not {"Unique", "StringNormalizer", "Attention", "RMSNormalization"} & TRT_ONNX_OPS
