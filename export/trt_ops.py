"""What TensorRT's ONNX parser takes: :func:`tensorrt_onnx_problems` says, on the workstation (with
the onnx package), why TensorRT would refuse a model, before anyone tries on a device."""

from __future__ import annotations

import os

from spade_edge.runtime.errors import require

# ONNX operators TensorRT's parser supports ("Y" in onnx-tensorrt docs/operators.md for TensorRT 10.x),
# leaving out the ones added after 10.3, the version JetPack 6 ships (Attention, RotaryEmbedding,
# RMSNormalization, TensorScatter, ...). Restrictions that matter to these models are checked below.
TRT_ONNX_OPS = frozenset(
    """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GRU HardSigmoid HardSwish Hardmax Identity
If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)
ONNX_OPSETS = (9, 20)  # the range TensorRT 10.0-10.3 documents (later versions accept more)
MAX_ELEMENTS = 2**31 - 1  # TensorRT's limit on the elements of one tensor
_CONSTANT_INPUT = {
    "ReduceMean": 1,
    "ReduceSum": 1,
    "ReduceMax": 1,
    "ReduceMin": 1,
    "ReduceProd": 1,
    "ReduceL1": 1,
    "ReduceL2": 1,
    "ReduceLogSum": 1,
    "ReduceLogSumExp": 1,
    "ReduceSumSquare": 1,
    "Squeeze": 1,
    "Unsqueeze": 1,
    "TopK": 1,
}  # inputs TensorRT needs known when building


def tensorrt_onnx_problems(model, max_batch: int) -> list[str]:
    """Why TensorRT's ONNX parser would refuse ``model`` (a path or ``onnx.ModelProto``, modified in
    place) at batch ``max_batch``; empty when it would not: operator support, data types (uint8
    only at the input and straight into a Cast; int8 Q/DQ with zero points 0) and shapes (static
    but for the batch, no tensor over 2^31-1 elements)."""
    onnx = require("onnx", "export", "Checking a model for TensorRT")
    from onnx import TensorProto, numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model))
    g = model.graph
    problems = []
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and not ONNX_OPSETS[0] <= op.version <= ONNX_OPSETS[1]:
            problems.append(f"opset {op.version} is outside TensorRT 10's range {ONNX_OPSETS}")
    init = {i.name: i for i in g.initializer}
    constants = set(init) | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    for n in g.node:
        where = f"{n.op_type} node {n.name or n.output[0]!r}"
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {n.domain!r} needs a TensorRT plugin")
        elif n.op_type not in TRT_ONNX_OPS:
            problems.append(f"{where}: operator not supported by TensorRT's ONNX parser")
        k = _CONSTANT_INPUT.get(n.op_type)
        if k is not None and len(n.input) > k and n.input[k] and n.input[k] not in constants:
            problems.append(f"{where}: input {n.input[k]!r} must be a constant for TensorRT")
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2]:
            zp = init.get(n.input[2])
            if zp is None or numpy_helper.to_array(zp).any():
                problems.append(f"{where}: zero point must be a constant 0 (symmetric quantization)")
    for inp in g.input:
        dims = inp.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = max_batch
    del g.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # InferenceError and friends
        return problems + [f"shape inference failed at batch {max_batch}: {exc}"]
    g = model.graph
    types = {v.name: v.type.tensor_type for v in [*g.input, *g.value_info, *g.output]}
    inputs = {i.name for i in g.input}
    for name, t in types.items():
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if None in dims or not t.HasField("shape"):
            problems.append(f"tensor {name!r}: shape {dims} not static at batch {max_batch}")
        elif _volume(dims) > MAX_ELEMENTS:
            problems.append(f"tensor {name!r}: {_volume(dims)} elements at batch {max_batch}, over TensorRT's 2^31-1")
    consumers: dict[str, list] = {}  # tensor name -> the nodes that read it
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    for n in g.node:
        for o in n.output:
            if o in types and o not in outputs and types[o].elem_type == TensorProto.UINT8:
                problems.append(f"tensor {o!r} ({n.op_type}): uint8 is allowed only as a network input or output")
        if n.op_type == "DequantizeLinear":
            x = n.input[0]
            dtype = init[x].data_type if x in init else types[x].elem_type if x in types else TensorProto.INT8
            if dtype != TensorProto.INT8:
                problems.append(
                    f"DequantizeLinear node {n.name!r}: input is {TensorProto.DataType.Name(dtype)}, "
                    "TensorRT dequantizes only INT8 here (keep biases in float: QuantizeBias=False)"
                )
    for name in inputs:
        if types[name].elem_type == TensorProto.UINT8:
            for c in consumers.get(name, []):
                to = next((a.i for a in c.attribute if a.name == "to"), None)
                if c.op_type != "Cast" or to not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                    problems.append(
                        f"uint8 input {name!r} feeds a {c.op_type} node ({c.name!r}): TensorRT takes "
                        "uint8 only straight into a Cast to float or half"
                    )
    for i in g.initializer:
        if _volume(i.dims) > MAX_ELEMENTS:
            problems.append(f"initializer {i.name!r}: over 2^31-1 elements")
    return problems


def _volume(dims) -> int:
    v = 1
    for d in dims:
        v *= int(d)
    return v
