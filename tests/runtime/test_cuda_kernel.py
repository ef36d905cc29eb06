"""The CUDA kernels (runtime/scoring/kernels/topk.cu) and the CPU shim that runs them without a GPU
(DESIGN.md section 4):

- the shim itself (tests/runtime/cuda_shim.h): a block's threads are fibers that meet at
  __syncthreads, __shared__ memory is per block; kernels whose answer needs the barrier are checked
  against numpy, and a barrier that not every thread reaches is reported, not run wrongly; its
  nvcuda::wmma emulation (m16n16k16, fp16 in, fp32 accumulation, row/col major) against numpy;
- the kernels' fp16 conversions, written out so that the shim runs them, bit for bit numpy's;
- CudaScorer's contract on the CuPy stand-in; its imports and the extra it names without CuPy;
- the source compiles with nvcc for the real targets, every kernel under its plain name, the fused
  kernel without register spills and within the static shared memory limit (ptxas -v).

The scorer's exactness (per level, the pyramid, both loaders, the screen's rescoring, launches and
uploads) is in test_cuda_screen.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from spade_edge.runtime.scoring import TopK
from spade_edge.runtime.scoring.cuda import KERNEL_NAMES, KERNEL_SOURCE, CudaScorer

from ..scorer_contract import check_close_neighbours_keep_their_digits, check_rejects_bad_arguments
from ..standins import STANDINS, use_standins
from ..standins._standin_kernels import CompileError, Library, compile_source


def build(code: str) -> Library:
    """Compile kernel source ``code`` with the shim (the stand-ins' compiler, cached by content)."""
    try:
        return compile_source(code)
    except CompileError:
        if shutil.which("g++") is None:
            pytest.skip("g++ is not on PATH: the CUDA kernels' logic cannot be run on the CPU")
        raise


def tie_data(seed: int, p: int = 300, m: int = 457, dim: int = 12):
    """Small-integer features (every fp32 sum exact); the gallery repeats rows: distance ties."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-4, 5, (p, dim)).astype(np.float32)
    distinct = rng.integers(-4, 5, (m // 3, dim)).astype(np.float32)
    return q, distinct[rng.integers(0, len(distinct), m)]


def reference(q, g, kappa) -> TopK:
    """Brute force in float64, ordered by distance and then by gallery index."""
    d = ((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :kappa]
    return TopK(np.take_along_axis(d, idx, 1).astype(np.float32), idx)


# ---------------------------------------------------------------------------------------------
# the shim: fibers and barriers

BARRIER_KERNELS = r"""
// a block-wide sum in shared memory: a tree of halvings, a barrier between steps
extern "C" __global__ void block_sum(const float* x, float* out, int n)
{
    __shared__ float buf[256];
    float v = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) v += x[i];
    buf[threadIdx.x] = v;
    __syncthreads();
    for (unsigned h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) buf[threadIdx.x] += buf[threadIdx.x + h];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

// each block reverses its slice through shared memory: thread t reads what thread n-1-t wrote, which
// a thread-after-thread run without the barrier would read before it was written
extern "C" __global__ void block_reverse(const int* x, int* out)
{
    __shared__ int buf[64];
    const int base = blockIdx.x * blockDim.x;
    buf[threadIdx.x] = x[base + threadIdx.x];
    __syncthreads();
    out[base + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// a barrier inside a branch that only some threads take: undefined behaviour on a GPU
extern "C" __global__ void divergent_barrier(int* out)
{
    if (threadIdx.x < 3) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
"""


@pytest.fixture(scope="module")
def barrier_lib() -> Library:
    return build(BARRIER_KERNELS)


@pytest.mark.parametrize("threads", [32, 256])
def test_shim_runs_a_block_reduction_between_barriers(barrier_lib, threads):
    x = np.random.default_rng(0).integers(-50, 50, 5000).astype(np.float32)
    out = np.full(7, np.nan, np.float32)
    barrier_lib.launch("block_sum", (7, 1, 1), (threads, 1, 1), 0, [x.ctypes.data, out.ctypes.data, len(x)])
    want = [x[np.arange(len(x)) % (7 * threads) // threads == b].sum() for b in range(7)]
    np.testing.assert_array_equal(out, want)


def test_shim_barrier_orders_writes_before_reads(barrier_lib):
    x = np.arange(5 * 64, dtype=np.int32)
    out = np.full_like(x, -1)
    barrier_lib.launch("block_reverse", (5, 1, 1), (64, 1, 1), 0, [x.ctypes.data, out.ctypes.data])
    np.testing.assert_array_equal(out, x.reshape(5, 64)[:, ::-1].reshape(-1))


def test_shim_reports_a_barrier_that_some_threads_skip(barrier_lib, tmp_path):
    # the shim aborts the process: run the launch in a child
    code = textwrap.dedent(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(STANDINS)!r})
        import _standin_kernels as k
        lib = k.compile_source({BARRIER_KERNELS!r})
        out = np.zeros(32, np.int32)
        lib.launch("divergent_barrier", (1, 1, 1), (32, 1, 1), 0, [out.ctypes.data])
        print("ran")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "ran" not in run.stdout
    assert "wait at __syncthreads while 3 have exited" in run.stderr, run.stderr


# ---------------------------------------------------------------------------------------------
# the shim's warp-level matrix multiply (nvcuda::wmma)

WMMA_KERNELS = r"""
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <mma.h>
#endif
// out (M x N, fp32, row-major) = a (M x K, fp16 bits, row-major) . b (K x N) + c (M x N), one warp a
// block, each block one 16 x 16 tile of out; b_cols: b given as N x K (b^T row-major: col_major for
// wmma) instead of K x N row-major. A tile of a and b staged in shared memory (the kernel's pattern),
// the result stored column-major to shared memory (col_store) or row-major straight to out.
extern "C" __global__ void wmma_gemm(const unsigned short* a, const unsigned short* b, const float* c, float* out,
                                     int m, int n, int k, int b_cols, int col_store)
{
    using namespace nvcuda;
    __shared__ __align__(32) unsigned short as[16 * 16];
    __shared__ __align__(32) unsigned short bs[16 * 16];
    __shared__ __align__(32) float cs[16 * 16];
    const int i0 = blockIdx.y * 16, j0 = blockIdx.x * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    for (int t = threadIdx.x; t < 256; t += blockDim.x) cs[t] = c[(i0 + t / 16) * n + j0 + t % 16];
    __syncthreads();
    wmma::load_matrix_sync(acc, cs, 16, wmma::mem_row_major);
    for (int k0 = 0; k0 < k; k0 += 16) {
        for (int t = threadIdx.x; t < 256; t += blockDim.x) {
            const int r = t / 16, q = t % 16;
            as[t] = a[(i0 + r) * k + k0 + q];
            bs[t] = b_cols ? b[(j0 + r) * k + k0 + q] : b[(k0 + r) * n + j0 + q];
        }
        __syncthreads();
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, reinterpret_cast<const __half*>(as), 16);
        if (b_cols) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, reinterpret_cast<const __half*>(bs), 16);
            wmma::mma_sync(acc, fa, fb, acc);
        } else {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, reinterpret_cast<const __half*>(bs), 16);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        __syncthreads();
    }
    if (col_store) {
        wmma::store_matrix_sync(cs, acc, 16, wmma::mem_col_major);
        __syncthreads();
        for (int t = threadIdx.x; t < 256; t += blockDim.x) out[(i0 + t % 16) * n + j0 + t / 16] = cs[t];
    } else {
        wmma::store_matrix_sync(out + i0 * n + j0, acc, n, wmma::mem_row_major);
    }
}
"""


@pytest.fixture(scope="module")
def wmma_lib() -> Library:
    return build(WMMA_KERNELS)


def _wmma(lib, a16, b16, c, b_cols: bool, col_store: bool) -> np.ndarray:
    m, k = a16.shape
    n = b16.shape[0] if b_cols else b16.shape[1]
    # device memory is 256-byte aligned (the shim checks wmma's 32-byte rule): so is this buffer
    raw = np.full(m * n + 64, np.nan, np.float32)
    skip = (-raw.ctypes.data % 256) // 4
    out = raw[skip : skip + m * n].reshape(m, n)
    a_bits, b_bits = np.ascontiguousarray(a16).view(np.uint16), np.ascontiguousarray(b16).view(np.uint16)
    args = [
        a_bits.ctypes.data,
        b_bits.ctypes.data,
        c.ctypes.data,
        out.ctypes.data,
        m,
        n,
        k,
        int(b_cols),
        int(col_store),
    ]
    lib.launch("wmma_gemm", (n // 16, m // 16, 1), (32, 1, 1), 0, args)
    return out


@pytest.mark.parametrize("b_cols", [False, True])
@pytest.mark.parametrize("col_store", [False, True])
def test_shim_wmma_multiplies_as_numpy(wmma_lib, b_cols, col_store):
    """Small integers: every product and sum exact in fp32, so any slip of layout, leading dimension,
    transposition or accumulator shows as a wrong value."""
    rng = np.random.default_rng(7)
    a = rng.integers(-8, 9, (48, 64)).astype(np.float16)
    b = rng.integers(-8, 9, (64, 32)).astype(np.float16)
    c = rng.integers(-100, 100, (48, 32)).astype(np.float32)
    out = _wmma(wmma_lib, a, b.T.copy() if b_cols else b, c, b_cols, col_store)
    np.testing.assert_array_equal(out, a.astype(np.float32) @ b.astype(np.float32) + c)


def test_shim_wmma_forms_exact_fp16_products_summed_in_fp32(wmma_lib):
    """Random fp16 inputs spanning 2^-14 .. 2^14 (subnormal products included): the result is the fp32
    sum of the exact products, in order after the accumulator: within K fp32 roundings of the float64
    value, and not the value of products rounded to fp16 first."""
    rng = np.random.default_rng(8)
    a = (rng.normal(size=(32, 48)) * 2.0 ** rng.integers(-14, 8, (32, 48))).astype(np.float16)
    b = (rng.normal(size=(48, 16)) * 2.0 ** rng.integers(-14, 8, (48, 16))).astype(np.float16)
    c = rng.normal(size=(32, 16)).astype(np.float32)
    out = _wmma(wmma_lib, a, b, c, False, False)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = a64 @ b64 + c
    bound = (48 + 1) * 2.0**-24 * (np.abs(a64) @ np.abs(b64) + np.abs(c))
    assert np.all(np.abs(out - exact) <= bound)
    # the emulation's own order, step by step in fp32: equal bit for bit
    want = c.copy()
    for k in range(48):
        want = (want + (a[:, k : k + 1].astype(np.float32) * b[k : k + 1].astype(np.float32))).astype(np.float32)
    np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------------------------------------
# fp16 conversions inside the kernels

CONVERT = r"""
extern "C" __global__ void to_half(const float* x, unsigned short* out, long long n)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = float_to_half(x[i]);
}
extern "C" __global__ void from_half(const unsigned short* x, float* out, long long n)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = half_to_float(x[i]);
}
"""


@pytest.fixture(scope="module")
def convert_lib() -> Library:
    return build(KERNEL_SOURCE.read_text() + CONVERT)


def test_half_to_float_is_numpys_for_every_half(convert_lib):
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(len(bits), np.float32)
    convert_lib.launch("from_half", (256, 1, 1), (256, 1, 1), 0, [bits.ctypes.data, out.ctypes.data, len(bits)])
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(out.view(np.uint32)[finite], want.view(np.uint32)[finite])
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(out[np.isinf(want)], want[np.isinf(want)])


def test_float_to_half_rounds_as_numpy(convert_lib):
    rng = np.random.default_rng(1)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    exact = halves[np.isfinite(halves)].astype(np.float32)
    mids = ((exact[:-1].astype(np.float64) + exact[1:]) / 2).astype(np.float32)  # ties: to even
    x = np.concatenate(
        [
            exact,
            mids,
            np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf)),
            rng.normal(size=20000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 20000),
            np.array([65504, 65519.99, 65520, 1e6, -1e30, 2.0**-25, 2.0**-26, 3 * 2.0**-26, np.inf], np.float32),
        ]
    ).astype(np.float32)
    out = np.empty(len(x), np.uint16)
    convert_lib.launch("to_half", (-(-len(x) // 256), 1, 1), (256, 1, 1), 0, [x.ctypes.data, out.ctypes.data, len(x)])
    with np.errstate(over="ignore"):  # the values beyond fp16's range are there on purpose
        want = x.astype(np.float16).view(np.uint16)
    bad = np.flatnonzero(out != want)
    assert bad.size == 0, [(float(x[i]), hex(out[i]), hex(want[i])) for i in bad[:5]]


# ---------------------------------------------------------------------------------------------
# CudaScorer on the CuPy stand-in: the contract, imports


@pytest.fixture
def cupy_stand_in(monkeypatch):
    use_standins(monkeypatch)
    import cupy

    return cupy


@pytest.mark.parametrize(("dim", "path"), [(12, "cuda fp16 screen"), (24, "cuda fused fp16 screen")])
@pytest.mark.parametrize("kappa", [1, 3, 10])
def test_cuda_scorer_breaks_ties_by_lower_index(cupy_stand_in, kappa, dim, path):
    q, g = tie_data(100 + kappa, dim=dim)
    blocks = [g[:150], g[150:155].astype(np.float16), g[155:].astype(np.int8)]  # one block shorter than kappa
    scorer = CudaScorer(tile_bytes=4 * len(q) * 100)
    top = scorer.topk(q, blocks, kappa)
    assert scorer.stats["path"] == path
    want = reference(q, g, kappa)
    np.testing.assert_array_equal(top.indices, want.indices)
    np.testing.assert_array_equal(top.distances, want.distances)


def test_cuda_scorer_keeps_digits_of_close_neighbours(cupy_stand_in):
    check_close_neighbours_keep_their_digits(CudaScorer())


def test_cuda_scorer_checks_its_input(cupy_stand_in):
    check_rejects_bad_arguments(CudaScorer())


def test_cuda_scorer_refuses_a_kappa_beyond_its_candidate_lists(cupy_stand_in):
    q = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="kappa = 90"):
        CudaScorer().topk(q, [np.zeros((200, 3), np.float32)], 90)


def test_cuda_scorer_without_cupy_names_the_extra(monkeypatch):
    from spade_edge.runtime.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    with pytest.raises(MissingDependencyError, match=r"spade-edge\[gpu\]"):
        CudaScorer().topk(np.zeros((1, 2), np.float32), [np.zeros((1, 2), np.float32)], 1)


def test_importing_the_cuda_scorer_imports_no_gpu_package():
    code = (
        "import sys, spade_edge.runtime.scoring.cuda, spade_edge.runtime.scoring.cuda_gallery; "
        "print(sorted(m for m in ('cupy', 'cupyx', 'pycuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# nvcc for the real targets


@pytest.mark.parametrize("arch", ["sm_87", "sm_90", "sm_110"])  # Jetson Orin, Hopper, Jetson Thor
def test_kernels_compile_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels were not compiled for " + arch)
    cubin = tmp_path / f"topk_{arch}.cubin"
    run = subprocess.run(
        [nvcc, f"-arch={arch}", "-cubin", "--Werror", "all-warnings", "-Xptxas", "-v", "-o", str(cubin)]
        + [str(KERNEL_SOURCE)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    data = cubin.read_bytes()
    for name in KERNEL_NAMES:  # extern "C": the names CuPy's and pycuda's get_function look up, unmangled
        assert name.encode() in data, name
        assert b"_Z" + str(len(name)).encode() + name.encode() not in data, name
    # ptxas -v on the fused kernel: no spills (its stack frame is the candidate lists, 96 x 16 bytes),
    # static shared memory within the 48 KiB every target allows, registers within 255
    info = run.stderr.split("Compiling entry function 'fused_select'")[1].split("Compiling entry")[0]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    used = re.search(r"Used (\d+) registers.*?(\d+) bytes smem", info)
    assert spills and used, info
    assert spills.groups() == ("0", "0"), info
    assert int(used.group(1)) <= 255 and int(used.group(2)) <= 48 * 1024, info
    print(f"{arch} fused_select: {used.group(1)} registers, {used.group(2)} bytes shared memory")
    # where NVRTC finds no CUDA headers the scorer compiles the source without the fused kernel
    bare = tmp_path / f"topk_{arch}_bare.cubin"
    run = subprocess.run(
        [nvcc, f"-arch={arch}", "-cubin", "--Werror", "all-warnings", "-DSPADE_NO_WMMA", "-o", str(bare)]
        + [str(KERNEL_SOURCE)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert b"fused_select" not in bare.read_bytes() and b"screen_select" in bare.read_bytes()


# ---------------------------------------------------------------------------------------------
# the stand-ins' cuBLAS and pycuda launches, as the scorer uses them


def test_standin_gemm_ex_is_column_major_with_leading_dimensions(cupy_stand_in):
    cp = cupy_stand_in
    cublas, rt = cp.cuda.cublas, cp.cuda.runtime
    rng = np.random.default_rng(3)
    a = rng.integers(-8, 9, (5, 7)).astype(np.float16)  # row-major (5, 7): column-major 7 x 5, ld 7
    b = rng.integers(-8, 9, (4, 7)).astype(np.float16)
    a_d, b_d = cp.asarray(a), cp.asarray(b)
    c_d = cp.full((4, 6), np.nan, dtype=cp.float32)  # column-major 6 x 4: ldc 6 > m = 5 rows used
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    args = (7, one.ctypes.data, a_d.data.ptr, rt.CUDA_R_16F, 7, b_d.data.ptr, rt.CUDA_R_16F, 7, zero.ctypes.data)
    handle = cp.cuda.device.get_cublas_handle()
    cublas.gemmEx(
        handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, 5, 4, *args, c_d.data.ptr, rt.CUDA_R_32F, 6,
        cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP,
    )  # fmt: skip
    got = cp.asnumpy(c_d)
    np.testing.assert_array_equal(got[:, :5], b.astype(np.float32) @ a.astype(np.float32).T)
    assert np.isnan(got[:, 5]).all()  # the padding row of each column is not written
    with pytest.raises(cublas.CUBLASError, match="INVALID_VALUE"):  # C would need 5 rows per column
        cublas.gemmEx(
            handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, 5, 4, *args, c_d.data.ptr, rt.CUDA_R_32F, 4,
            cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip
    with pytest.raises(cublas.CUBLASError, match="NOT_SUPPORTED"):  # fp16 with an fp16 compute type
        cublas.gemmEx(
            handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, 5, 4, *args, c_d.data.ptr, rt.CUDA_R_32F, 6,
            cublas.CUBLAS_COMPUTE_16F, cublas.CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip


def test_standin_pycuda_launch_takes_what_pycuda_takes(cupy_stand_in):
    import pycuda.compiler
    import pycuda.driver as drv

    cp = cupy_stand_in
    drv.init()
    ctx = drv.Device(0).retain_primary_context()
    with pytest.raises(drv.LogicError, match="invalid device context"):  # no context current yet
        pycuda.compiler.SourceModule(CONVERT, no_extern_c=True)
    ctx.push()
    x = cp.asarray(np.arange(8, dtype=np.float32))  # CuPy's memory: in the same primary context
    try:
        module = pycuda.compiler.SourceModule(KERNEL_SOURCE.read_text() + CONVERT, no_extern_c=True)
        fn = module.get_function("to_half")
        out = cp.empty(8, dtype=cp.uint16)
        with pytest.raises(TypeError, match="invalid type on parameter #2"):  # a Python int is not packed
            fn(np.uintp(x.data.ptr), np.uintp(out.data.ptr), 8, block=(32, 1, 1), grid=(1, 1))
        fn(np.uintp(x.data.ptr), np.uintp(out.data.ptr), np.int64(8), block=(32, 1, 1), grid=(1, 1))
        np.testing.assert_array_equal(cp.asnumpy(out), np.arange(8, dtype=np.float16).view(np.uint16))
        with pytest.raises(drv.LogicError, match="named symbol not found"):
            module.get_function("no_such_kernel")
    finally:
        drv.Context.pop()


def test_standin_nvrtc_opens_only_headers_under_its_include_folders(cupy_stand_in, tmp_path):
    """As NVRTC: no default CUDA include folder, so the kernels' <mma.h> needs -I; a conditional that
    removes the include removes the need."""
    cp = cupy_stand_in
    source = KERNEL_SOURCE.read_text()
    with pytest.raises(cp.cuda.compiler.CompileException, match='could not open source file "mma.h"'):
        cp.RawModule(code=source, options=("-std=c++17",)).get_function("fused_select")
    empty = tmp_path / "include"
    empty.mkdir()
    with pytest.raises(cp.cuda.compiler.CompileException, match="searched"):
        cp.RawModule(code=source, options=("-std=c++17", f"-I{empty}")).get_function("fused_select")
    toolkit = cp.cuda.get_cuda_path() + "/include"
    assert cp.RawModule(code=source, options=("-std=c++17", f"-I{toolkit}")).get_function("fused_select")
    without = cp.RawModule(code=source, options=("-std=c++17", "-DSPADE_NO_WMMA"))
    assert without.get_function("screen_select")
    with pytest.raises(cp.cuda.driver.CUDADriverError, match="fused_select"):
        without.get_function("fused_select")


def test_without_cuda_headers_the_scorer_runs_unfused_and_exact(cupy_stand_in, monkeypatch):
    from spade_edge.runtime.scoring import cuda

    monkeypatch.setattr(cuda, "cuda_include_dir", lambda cp=None: None)
    q, g = tie_data(5, dim=24)
    scorer = CudaScorer()
    with pytest.warns(UserWarning, match="without its fused kernel"):
        top = scorer.topk(q, [g[:200], g[200:]], 3)
    assert scorer.stats["path"] == "cuda fp16 screen" and scorer.stats["fused"] is False
    want = reference(q, g, 3)
    np.testing.assert_array_equal(top.indices, want.indices)
    np.testing.assert_array_equal(top.distances, want.distances)
    assert cuda.fused_applies(24)  # it would have been fused


def test_cuda_include_dir_needs_the_toolkits_crt_header(monkeypatch, tmp_path):
    from spade_edge.runtime.scoring.cuda import cuda_include_dir

    wheel = tmp_path / "wheel"  # the NVIDIA runtime wheels: mma.h without crt/mma.h
    (wheel / "include").mkdir(parents=True)
    (wheel / "include" / "mma.h").write_text("")
    toolkit = tmp_path / "toolkit"
    (toolkit / "include" / "crt").mkdir(parents=True)
    (toolkit / "include" / "mma.h").write_text("")
    (toolkit / "include" / "crt" / "mma.h").write_text("")
    monkeypatch.setenv("CUDA_PATH", str(wheel))
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert cuda_include_dir() == str(toolkit / "include")
