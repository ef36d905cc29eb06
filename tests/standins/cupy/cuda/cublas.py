"""``cupy.cuda.cublas`` stand-in: the GemmEx entry point (``cublas.gemmEx``) on the fake machine.

Faithful: the signature of CuPy's wrapper, ``gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype,
lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo)``, with cuBLAS's column-major meaning;
``alpha``/``beta`` are host addresses of scalars of the compute type (float for CUBLAS_COMPUTE_32F);
A, B, C are device addresses, checked to be live memory of the current device's context large enough
for the operands as their leading dimensions lay them out; it runs on the current stream (CuPy's
wrapper sets the handle's stream to it), queued until that stream is synchronized. fp16 inputs are
multiplied exactly (fp16 products fit fp32) and summed in fp32 (numpy's sgemm), as a tensor core
with fp32 accumulation does up to summation order. Unsupported type combinations raise CUBLASError
CUBLAS_STATUS_NOT_SUPPORTED, an invalid size or leading dimension CUBLAS_STATUS_INVALID_VALUE.

Not modelled: other cuBLAS functions, pointer mode device, workspaces, math modes.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .._machine import machine
from . import device as _device
from . import stream as _stream
from .runtime import CUDA_R_16F, CUDA_R_32F, current_context

STANDIN = True
CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C = 0, 1, 2
CUBLAS_COMPUTE_16F, CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_16F = 64, 68, 74
CUBLAS_COMPUTE_32F_FAST_TF32 = 77
CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP = -1, 99
CUBLAS_STATUS_NOT_INITIALIZED, CUBLAS_STATUS_INVALID_VALUE, CUBLAS_STATUS_NOT_SUPPORTED = 1, 7, 15
_STATUS = {1: "CUBLAS_STATUS_NOT_INITIALIZED", 7: "CUBLAS_STATUS_INVALID_VALUE", 15: "CUBLAS_STATUS_NOT_SUPPORTED"}
_TYPES = {CUDA_R_16F: np.float16, CUDA_R_32F: np.float32}


class CUBLASError(RuntimeError):
    def __init__(self, status: int, detail: str = ""):
        self.status = status
        super().__init__(_STATUS.get(status, str(status)) + (f"\n[stand-in] {detail}" if detail else ""))


def _operand(ptr: int, dtype, rows: int, cols: int, ld: int, ctx, what: str) -> np.ndarray:
    """The column-major (rows x cols) matrix at device address ``ptr`` with leading dimension ``ld``."""
    if ld < max(1, rows):
        raise CUBLASError(CUBLAS_STATUS_INVALID_VALUE, f"{what}: leading dimension {ld} < {rows} rows")
    itemsize = np.dtype(dtype).itemsize
    count = ld * (cols - 1) + rows
    try:
        machine.check_device_memory(int(ptr), count * itemsize, ctx, f"cublasGemmEx {what}")
    except machine.CudaError as exc:
        raise CUBLASError(CUBLAS_STATUS_INVALID_VALUE, exc.detail) from None
    buf = (ctypes.c_byte * (count * itemsize)).from_address(int(ptr))
    flat = np.frombuffer(buf, dtype=dtype, count=count)
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (itemsize, ld * itemsize))


def gemmEx(
    handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, algo
) -> None:
    ctx = current_context()
    owner = _device.cublas_handle_device(int(handle))
    if owner is None:
        raise CUBLASError(CUBLAS_STATUS_NOT_INITIALIZED, f"0x{int(handle):x} is not a cuBLAS handle")
    if owner != ctx.device:
        raise CUBLASError(CUBLAS_STATUS_INVALID_VALUE, f"handle of device {owner} used on device {ctx.device}")
    if computeType != CUBLAS_COMPUTE_32F or Atype not in _TYPES or Btype != Atype or Ctype not in _TYPES:
        raise CUBLASError(CUBLAS_STATUS_NOT_SUPPORTED, f"types A {Atype} B {Btype} C {Ctype} compute {computeType}")
    if min(m, n, k) < 0 or transa not in (0, 1) or transb not in (0, 1):
        raise CUBLASError(CUBLAS_STATUS_INVALID_VALUE, f"m {m} n {n} k {k} transa {transa} transb {transb}")
    alpha_v = ctypes.c_float.from_address(int(alpha)).value
    beta_v = ctypes.c_float.from_address(int(beta)).value
    a_rows, a_cols = (m, k) if transa == CUBLAS_OP_N else (k, m)
    b_rows, b_cols = (k, n) if transb == CUBLAS_OP_N else (n, k)
    a = _operand(A, _TYPES[Atype], a_rows, a_cols, lda, ctx, "A")
    b = _operand(B, _TYPES[Btype], b_rows, b_cols, ldb, ctx, "B")
    c = _operand(C, _TYPES[Ctype], m, n, ldc, ctx, "C")
    s = machine.stream_for(_stream.get_current_stream().ptr, ctx, "cublasGemmEx")
    machine.count("gemm")

    def work():
        opa = a.astype(np.float32) if transa == CUBLAS_OP_N else a.astype(np.float32).T
        opb = b.astype(np.float32) if transb == CUBLAS_OP_N else b.astype(np.float32).T
        prod = np.matmul(opa, opb)  # fp32 accumulation
        out = np.float32(alpha_v) * prod
        if beta_v != 0.0:
            out = out + np.float32(beta_v) * c.astype(np.float32)
        c[...] = out.astype(c.dtype)

    machine.submit(s, ctx, work, "cublasGemmEx")
