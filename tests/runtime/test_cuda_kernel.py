"""The CUDA top-kappa kernel (runtime/scoring/kernels/topk.cu) without a GPU (DESIGN.md section 4):

- its logic: the same source compiled as C++ with cuda_shim.h, run for every thread of the grid,
  driven tile by tile as the GPU scorer drives it, and compared with the CPU scorer;
- the CuPy glue (CudaScorer): run against the CuPy stand-in (tests/standins) whose RawModule compiles
  the source it is given with the shim, so tiling, offsets, widening, scalar types and the exact
  re-computation are exercised; CuPy's own behaviour is left to tests/gpu;
- the source compiles with nvcc for the real targets.

Features are small integers so that every float32 product and sum is exact: the kernel (which
expands |q|^2 + |g|^2 - 2 q.g) and the references (which subtract) agree bit for bit, and ties are
real ties.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from spade_edge.runtime.scoring import NumpyScorer, TopK
from spade_edge.runtime.scoring.cuda import KERNEL_NAME, KERNEL_SOURCE, CudaScorer

from ..scorer_contract import check_close_neighbours_keep_their_digits, check_rejects_bad_arguments
from ..standins import use_standins
from ..standins._standin_kernels import CompileError, Library, compile_source

THREADS = 128  # as the GPU scorer launches
TILE = 100  # gallery columns per tile


def build(code: str) -> Library:
    """Compile kernel source ``code`` with the shim (the stand-ins' compiler, cached by content)."""
    try:
        return compile_source(code)
    except CompileError:
        if shutil.which("g++") is None:
            pytest.skip("g++ is not on PATH: the CUDA kernel's logic cannot be run on the CPU")
        raise


@pytest.fixture(scope="module")
def shim_lib() -> Library:
    return build(KERNEL_SOURCE.read_text())


def launch(lib: Library, grid: int, block: int, args: tuple) -> None:
    """Call the kernel for every thread of a (grid, block) launch; ``args`` as a GPU launch takes
    them: arrays for pointers, numpy scalars of the exact C types."""
    params = lib.kernels[KERNEL_NAME]
    assert len(args) == len(params), f"the kernel takes {len(params)} arguments, got {len(args)}"
    c_args = []
    for a, p in zip(args, params):
        if p.pointer:
            assert isinstance(a, np.ndarray) and a.dtype == p.dtype, (
                f"{p.text} parameter given {type(a)} {getattr(a, 'dtype', '')}"
            )
            c_args.append(a.ctypes.data)
        else:  # a CUDA launch copies sizeof(param) bytes: a scalar of another width would be garbage
            assert type(a) is p.dtype.type, f"{p.text} parameter given {type(a).__name__}, needs {p.dtype}"
            c_args.append(int(a))
    lib.launch(KERNEL_NAME, (grid, 1, 1), (block, 1, 1), 0, c_args)


def kernel_topk(lib, query, blocks, kappa, layout="columns") -> TopK:
    """Drive the kernel as a GPU scorer does: tile after tile of each block, dots from a GEMM."""
    q = query.astype(np.float32)
    p = q.shape[0]
    qn = (q * q).sum(1)
    best_d = np.full((p, kappa), np.inf, np.float32)
    best_i = np.full((p, kappa), -1, np.int64)
    offset = 0
    for block in blocks:
        for s in range(0, block.shape[0], TILE):
            g = block[s : s + TILE].astype(np.float32)
            w = g.shape[0]
            if layout == "rows":  # (P, w) row-major inside a wider buffer: leading dimension > w
                buf = np.full((p, w + 7), np.nan, np.float32)
                buf[:, :w] = q @ g.T
                dots, stride_p, stride_m = buf, buf.shape[1], 1
            else:  # the (w, P) product, as CudaScorer hands it over
                dots = np.ascontiguousarray(g @ q.T)
                stride_p, stride_m = 1, p
            launch(
                lib,
                (p + THREADS - 1) // THREADS,
                THREADS,
                (
                    dots,
                    np.int64(stride_p),
                    np.int64(stride_m),
                    qn,
                    (g * g).sum(1),
                    np.int32(p),
                    np.int32(w),
                    np.int64(offset + s),
                    best_d,
                    best_i,
                    np.int32(kappa),
                ),
            )
        offset += block.shape[0]
    return TopK(best_d, best_i)


# ---------------------------------------------------------------------------------------------
# data and references


def tie_data(seed: int, p: int = 300, m: int = 457, dim: int = 12):
    """Small-integer features; the gallery repeats rows (and integer distances tie anyway)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-4, 5, (p, dim)).astype(np.float32)
    distinct = rng.integers(-4, 5, (m // 3, dim)).astype(np.float32)
    g = distinct[rng.integers(0, len(distinct), m)]
    return q, g


def all_distances(q, g) -> np.ndarray:
    return ((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1)


def reference(q, g, kappa) -> TopK:
    """Brute force, ordered by distance and then by gallery index."""
    d = all_distances(q, g)
    idx = np.argsort(d, axis=1, kind="stable")[:, :kappa]
    return TopK(np.take_along_axis(d, idx, 1).astype(np.float32), idx)


def assert_same_neighbours(ours: TopK, cpu: TopK, d_all: np.ndarray) -> None:
    """Same distances; same gallery rows wherever the answer is unique.

    Among rows tied at the kappa-th distance any may be kept, and NumpyScorer (argpartition for
    kappa > 8) does not always keep the lowest indices nor order equal distances by index; the
    exact order is checked against ``reference``.
    """
    np.testing.assert_allclose(ours.distances, cpu.distances, rtol=1e-5)
    rows = np.arange(len(d_all))[:, None]
    np.testing.assert_allclose(d_all[rows, cpu.indices], cpu.distances, rtol=1e-5)  # what it names is that far
    canon = np.lexsort((cpu.indices, cpu.distances), axis=-1)
    cpu_i = np.take_along_axis(cpu.indices, canon, 1)
    inside = ours.distances < ours.distances[:, -1:]  # strictly closer than the kappa-th: no choice
    np.testing.assert_array_equal(ours.indices[inside], cpu_i[inside])


# ---------------------------------------------------------------------------------------------
# the kernel's logic on the CPU


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("kappa", [1, 3, 10])
def test_kernel_matches_cpu_scorer(shim_lib, kappa, layout):
    q, g = tie_data(kappa)
    blocks = [g[:230], g[230:]]  # tiles of 100, 100, 30 | 100, 100, 27; P = 300 is not a multiple of 128
    ours = kernel_topk(shim_lib, q, blocks, kappa, layout)
    ref = reference(q, g, kappa)
    assert len(np.unique(g, axis=0)) < len(g)  # the gallery does repeat rows
    np.testing.assert_array_equal(ours.indices, ref.indices)  # lower gallery index first, across tiles
    np.testing.assert_allclose(ours.distances, ref.distances, rtol=1e-5)
    assert_same_neighbours(ours, NumpyScorer().topk(q, blocks, kappa), all_distances(q, g))


def test_kernel_keeps_lowest_index_among_duplicates(shim_lib):
    # every gallery row identical: distance ties everywhere, the answer must be 0..kappa-1
    q = np.ones((5, 4), np.float32)
    g = np.full((350, 4), 2.0, np.float32)
    top = kernel_topk(shim_lib, q, [g[:120], g[120:]], 7)
    np.testing.assert_array_equal(top.indices, np.broadcast_to(np.arange(7), (5, 7)))
    np.testing.assert_array_equal(top.distances, 4.0)


def test_kernel_clamps_rounding_below_zero(shim_lib):
    # qn + gn - 2 dot < 0 can only come from rounding; the kernel must report 0, not a negative
    dots = np.array([[1.0 + 2**-20, 0.0]], np.float32)  # slightly above |q||g| = 1
    best_d = np.full((1, 2), np.inf, np.float32)
    best_i = np.full((1, 2), -1, np.int64)
    one = np.ones(1, np.float32)
    launch(
        shim_lib,
        1,
        THREADS,
        (
            dots,
            np.int64(2),
            np.int64(1),
            one,
            np.ones(2, np.float32),
            np.int32(1),
            np.int32(2),
            np.int64(40),
            best_d,
            best_i,
            np.int32(2),
        ),
    )
    np.testing.assert_array_equal(best_d, [[0.0, 2.0]])
    np.testing.assert_array_equal(best_i, [[40, 41]])


def test_threads_past_the_last_query_row_do_nothing(shim_lib):
    # a 128-thread block for 3 query rows: threads 3..127 must neither read nor write anything;
    # the buffers continue with sentinel rows that would show a write (or a read of qn's NaN)
    p, pad, kappa = 3, THREADS, 2
    best_d = np.full((p + pad, kappa), np.inf, np.float32)
    best_d[p:] = -7.0
    best_i = np.full((p + pad, kappa), -1, np.int64)
    best_i[p:] = -7
    qn = np.zeros(p + pad, np.float32)
    qn[p:] = np.nan
    dots = np.zeros((p + pad, 4), np.float32)
    launch(
        shim_lib,
        1,
        THREADS,
        (
            dots,
            np.int64(4),
            np.int64(1),
            qn,
            np.arange(4, dtype=np.float32),
            np.int32(p),
            np.int32(4),
            np.int64(0),
            best_d,
            best_i,
            np.int32(kappa),
        ),
    )
    np.testing.assert_array_equal(best_d[:p], [[0.0, 1.0]] * p)
    np.testing.assert_array_equal(best_d[p:], -7.0)
    np.testing.assert_array_equal(best_i[p:], -7)


# ---------------------------------------------------------------------------------------------
# CudaScorer's glue, against a numpy stand-in for CuPy


@pytest.fixture
def cupy_stand_in(monkeypatch):
    """CuPy as tests/standins has it: numpy memory, RawModule compiling the source with the shim."""
    use_standins(monkeypatch)
    import cupy

    return cupy


@pytest.mark.parametrize("kappa", [1, 3, 10])
def test_cuda_scorer_glue_with_cupy_stand_in(cupy_stand_in, kappa):
    q, g = tie_data(100 + kappa)
    # blocks in each stored dtype (small integers are exact in all), one shorter than kappa
    blocks = [g[:150], g[150:155].astype(np.float16), g[155:].astype(np.int8)]
    scorer = CudaScorer(tile_bytes=4 * len(q) * TILE)  # tiles of 100 gallery rows
    ours = scorer.topk(q, blocks, kappa)
    ref = reference(q, g, kappa)
    assert ours.distances.dtype == np.float32 and ours.indices.dtype == np.int64
    np.testing.assert_array_equal(ours.indices, ref.indices)
    np.testing.assert_allclose(ours.distances, ref.distances, rtol=1e-5)
    assert_same_neighbours(ours, NumpyScorer().topk(q, blocks, kappa), all_distances(q, g))


def test_cuda_scorer_keeps_digits_of_close_neighbours(cupy_stand_in):
    check_close_neighbours_keep_their_digits(CudaScorer())


def test_cuda_scorer_checks_its_input(cupy_stand_in):
    check_rejects_bad_arguments(CudaScorer())


def test_cuda_scorer_without_cupy_names_the_extra(monkeypatch):
    from spade_edge.runtime.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    with pytest.raises(MissingDependencyError, match=r"spade-edge\[gpu\]"):
        CudaScorer().topk(np.zeros((1, 2), np.float32), [np.zeros((1, 2), np.float32)], 1)


def test_importing_the_cuda_scorer_imports_no_gpu_package():
    code = (
        "import sys, spade_edge.runtime.scoring.cuda; print(sorted(m for m in ('cupy', 'pycuda') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# nvcc for the real targets


@pytest.mark.parametrize("arch", ["sm_87", "sm_90", "sm_110"])  # Jetson Orin, Hopper, Jetson Thor
def test_kernel_compiles_with_nvcc(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernel was not compiled for " + arch)
    cubin = tmp_path / f"topk_{arch}.cubin"
    run = subprocess.run(
        [nvcc, f"-arch={arch}", "-cubin", "--Werror", "all-warnings", "-o", str(cubin), str(KERNEL_SOURCE)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    # extern "C": the name CuPy's get_function and pycuda's get_function look up, unmangled
    assert KERNEL_NAME.encode() in cubin.read_bytes()
    assert b"_Z" + str(len(KERNEL_NAME)).encode() + KERNEL_NAME.encode() not in cubin.read_bytes()
