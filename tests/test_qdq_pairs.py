"""One Q/DQ pair per consumer: what lets ONNX Runtime's CPU optimizer fuse every quantized
convolution (calibration/qdq_pairs.py)."""

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spade_edge.calibration.qdq_pairs import unique_qdq_pairs
from spade_edge.runtime import cpu
from tests.emulation import AVX2_ONLY, needs_emulator, run_as

ort = pytest.importorskip("onnxruntime")


def shared_input_model(weight_max: int = 64) -> onnx.ModelProto:
    """x -> Q -> DQ -> {Conv a, Conv b} -> Add: one quantized tensor read by two convolutions, with
    weights in [-weight_max, weight_max] (64: the 7-bit range that calibration writes)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
    ]
    for b in "ab":
        w = rng.integers(-weight_max, weight_max + 1, (8, 4, 3, 3)).astype(np.int8)
        inits += [
            numpy_helper.from_array(w, f"w{b}"),
            numpy_helper.from_array(np.full(8, 0.01, np.float32), f"ws{b}"),
            numpy_helper.from_array(np.zeros(8, np.int8), f"wz{b}"),
            numpy_helper.from_array(np.array(0.1, np.float32), f"ys{b}"),
            numpy_helper.from_array(np.array(0, np.int8), f"yz{b}"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", [f"w{b}", f"ws{b}", f"wz{b}"], [f"wd{b}"], axis=0, name=f"wdq{b}"),
            helper.make_node("Conv", ["xd", f"wd{b}"], [f"y{b}"], pads=[1, 1, 1, 1], name=f"conv{b}"),
            helper.make_node("QuantizeLinear", [f"y{b}", f"ys{b}", f"yz{b}"], [f"yq{b}"], name=f"yq{b}"),
            helper.make_node("DequantizeLinear", [f"yq{b}", f"ys{b}", f"yz{b}"], [f"yd{b}"], name=f"yd{b}"),
        ]
    nodes.append(helper.make_node("Add", ["yda", "ydb"], ["out"], name="add"))
    g = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def fused_ops(model, tmp_path) -> collections.Counter:
    path, opt = tmp_path / "m.onnx", tmp_path / "opt.onnx"
    onnx.save(model, path)
    o = ort.SessionOptions()
    o.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def fused_error(weight_max: int) -> float:
    """Largest difference between the float Q/DQ graph and its fused QLinearConv form."""
    before = shared_input_model(weight_max)
    after = shared_input_model(weight_max)
    unique_qdq_pairs(after)
    x = np.random.default_rng(1).normal(size=(1, 4, 16, 16)).astype(np.float32)
    return float(np.abs(run(before, x) - run(after, x)).max())


STEP = 0.1 + 1e-6  # one output quantization step (scale 0.1)
ERRORS = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from tests.test_qdq_pairs import fused_error
print(json.dumps({{"7": fused_error(64), "8": fused_error(127)}}))
"""


def test_every_consumer_gets_its_own_pair_and_every_conv_fuses(tmp_path):
    before = shared_input_model()
    after = shared_input_model()
    assert unique_qdq_pairs(after) == 1
    onnx.checker.check_model(after)
    producer = {o: n for n in after.graph.node for o in n.output}
    users = collections.Counter(i for n in after.graph.node for i in n.input)
    for n in after.graph.node:  # every activation DQ has one reader, fed by a Q of its own
        if n.op_type == "DequantizeLinear" and n.input[0] in producer:
            assert users[n.output[0]] == 1 and users[n.input[0]] == 1
    # ONNX Runtime's CPU optimizer: both convolutions left in float before, none after
    assert fused_ops(before, tmp_path)["Conv"] == 2
    assert fused_ops(after, tmp_path)["QLinearConv"] == 2 and fused_ops(after, tmp_path)["Conv"] == 0
    # the same quantized arithmetic, up to integer versus float accumulation of the fused kernels
    assert fused_error(64) <= STEP


@pytest.mark.skipif(
    not cpu.int8_kernel()[1],
    reason=f"this CPU's INT8 kernel ({cpu.int8_kernel()[0]}) saturates "
    "8-bit weights: test_full_range_weights_saturate_without_vnni covers it",
)
def test_full_range_weights_are_exact_where_int8_sums_are_32_bit():
    assert fused_error(127) <= STEP


@needs_emulator
def test_full_range_weights_saturate_without_vnni():
    """AVX2 without VNNI (emulated): 7-bit weights stay exact, full-range ones do not."""
    errors = run_as(AVX2_ONLY, ERRORS)
    assert errors["7"] <= STEP
    assert errors["8"] > 10 * STEP
