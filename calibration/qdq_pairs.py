"""One Q/DQ pair per consumer of a quantized tensor.

ONNX Runtime's CPU optimizer turns int8 Q/DQ pairs into uint8 (what x86 kernels take) only where a
QuantizeLinear feeds a single DequantizeLinear, and a convolution fuses into QLinearConv only with
uint8 activations. A tensor read by two nodes (a block's output: the next block's first
convolution and the residual Add or the downsample convolution) has one Q and a DQ that ONNX
Runtime duplicates per consumer, so its Q feeds two DQs and stays int8: on WRN50x2, 20 of 53
convolutions ran in float between DQ and Q. Giving every consumer its own pair, with its own
scale and zero-point initializers (identical ones are merged back as common subexpressions),
lets all of them fuse. The arithmetic is unchanged (each copy has the same scale and zero
point). TensorRT folds Q/DQ pairs into the layers around them, copies included.
"""

from __future__ import annotations

import copy
from collections import defaultdict


def unique_qdq_pairs(model) -> int:
    """Rewrite ``model`` (onnx.ModelProto) in place; returns the number of pairs added."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in model.graph.output}
    inits = {i.name: i for i in model.graph.initializer}
    nodes, added = [], 0
    for dq in model.graph.node:
        nodes.append(dq)
        if dq.op_type != "DequantizeLinear" or dq.output[0] in outputs:
            continue
        q = producer.get(dq.input[0])
        users = consumers[dq.output[0]]
        if q is None or q.op_type != "QuantizeLinear" or len(users) < 2 or len(consumers[q.output[0]]) != 1:
            continue
        for k, user in enumerate(users[1:], 1):
            q2, dq2 = copy.deepcopy(q), copy.deepcopy(dq)
            q2.name, dq2.name = f"{q.name}_pair{k}", f"{dq.name}_pair{k}"
            q2.output[0] = f"{q.output[0]}_pair{k}"
            dq2.input[0], dq2.output[0] = q2.output[0], f"{dq.output[0]}_pair{k}"
            for node in (q2, dq2):
                for j in range(1, len(node.input)):  # scale, zero point: copies of their own
                    src = inits[node.input[j]]
                    own = copy.deepcopy(src)
                    own.name = f"{src.name}_{node.op_type}_pair{k}"
                    model.graph.initializer.append(own)
                    node.input[j] = own.name
            nodes += [q2, dq2]  # right after the DQ: before every consumer, so still topological
            user.input[:] = [dq2.output[0] if i == dq.output[0] else i for i in user.input]
            added += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return added
