"""What a stand-in engine is, and how its network runs: ONNX Runtime on the CPU.

An engine file ("plan") is ``ENGINE_MAGIC``, a 4-byte little-endian header length, a JSON header
(the TensorRT version and GPU it was built for, the optimization profiles, the I/O tensors with
their data types and shapes, the network and builder flags) and the ONNX model's bytes. A timing
cache is ``CACHE_MAGIC`` and a JSON record of the version and GPU it belongs to.

The network computes in the ONNX model's own precision: an engine built with BuilderFlag.FP16 from
an fp32 model gives ONNX Runtime's fp32 results, not TensorRT's fp16 ones.
"""

from __future__ import annotations

import json
import struct

import numpy as np

ENGINE_MAGIC = b"SPADE-EDGE STAND-IN TENSORRT ENGINE\0"
CACHE_MAGIC = b"SPADE-EDGE STAND-IN TIMING CACHE\0"
ORT_TYPES = {
    "tensor(float)": "FLOAT",
    "tensor(float16)": "HALF",
    "tensor(int8)": "INT8",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(bfloat16)": "BF16",
}


def version_key(version: str) -> tuple[int, ...]:
    """Engines are refused across TensorRT versions; the stand-in compares major.minor.patch."""
    return tuple(int(p) for p in str(version).split(".")[:3])


def session(onnx: bytes):
    """An ONNX Runtime CPU session on one thread (the test machines share few cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])


def tensors(sess) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs of ``sess``: name, TensorRT data type name, declared shape (-1 for
    symbolic or unknown dimensions). KeyError names an element type TensorRT has no I/O type for."""

    def one(arg) -> dict:
        if arg.type not in ORT_TYPES:
            raise KeyError(f"tensor {arg.name!r} has type {arg.type}, which TensorRT does not take as network I/O")
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
        return {"name": arg.name, "dtype": ORT_TYPES[arg.type], "shape": shape}

    return [one(a) for a in sess.get_inputs()], [one(a) for a in sess.get_outputs()]


def dry_run(sess, inputs: list[dict], shapes: dict[str, tuple[int, ...]], nptype) -> dict[str, tuple[int, ...]]:
    """Output shapes for the given input shapes: the network run once on zeros."""
    feeds = {i["name"]: np.zeros(shapes[i["name"]], nptype(i["dtype"])) for i in inputs}
    names = [o.name for o in sess.get_outputs()]
    return {n: tuple(int(d) for d in y.shape) for n, y in zip(names, sess.run(names, feeds))}


def pack_engine(header: dict, onnx: bytes) -> bytes:
    text = json.dumps(header, sort_keys=True).encode()
    return ENGINE_MAGIC + struct.pack("<I", len(text)) + text + bytes(onnx)


def unpack_engine(blob: bytes) -> tuple[dict, bytes]:
    """(header, ONNX bytes); ValueError says, as TensorRT would, why ``blob`` is no engine."""
    if not blob.startswith(ENGINE_MAGIC):
        raise ValueError("Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match")
    start = len(ENGINE_MAGIC) + 4
    try:
        (n,) = struct.unpack_from("<I", blob, len(ENGINE_MAGIC))
        header = json.loads(blob[start : start + n])
    except (struct.error, ValueError) as exc:
        raise ValueError(f"Serialization assertion failed: truncated or corrupt engine ({exc})") from None
    return header, blob[start + n :]


def pack_cache(record: dict) -> bytes:
    return CACHE_MAGIC + json.dumps(record, sort_keys=True).encode()


def unpack_cache(blob: bytes) -> dict:
    if not blob.startswith(CACHE_MAGIC):
        raise ValueError("Serialization assertion magicTagRead == kMAGIC_TAG failed: not a timing cache")
    return json.loads(blob[len(CACHE_MAGIC) :])
