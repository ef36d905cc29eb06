"""GPU scorer, exact, built for the GPU (docs/speed.md, "The GPU scorer"):

- the gallery lives on the device (:meth:`CudaScorer.attach`: uploaded once as stored through pinned
  staging, int8 and fp16 decoded by the kernels), the retrieved images gathered there per request;
- the concatenated pyramid at per-level cost: each coarse level's product at native resolution,
  interpolated inside the selection kernel (never the upsampled 1792-channel gallery);
- the fine level's product fused with the selection (kernel ``fused_select``: wmma tiles in shared
  memory, never in device memory; :func:`fused_applies` says where), the coarse levels' through memory;
- a tensor-core screen: fp16 products with fp32 accumulation (wmma, cuBLAS GemmEx), a rigorous bound on
  each pair's error (:func:`screen_bound`), kappa + SPARE candidates per row, exact fp64 re-ranking
  of every candidate that may belong, and an exact search again of every row the screen cannot
  settle, so that the neighbours equal a float64 search, ties to the lower gallery index;
- a handful of launches per image: one query preparation, one gather, one GEMM per level not fused,
  one selection kernel over (rows x gallery splits), one decision kernel (merge, settle, exact), plus
  two for the rows searched again, if any. ``stats["launches"]`` counts them where they are made
  (:class:`_Device`).

Kernels: kernels/topk.cu, loaded through CuPy's RawModule (default) or pycuda's SourceModule
(``loader="pycuda"``). CuPy holds the memory and runs cuBLAS either way. CuPy and pycuda are imported
on first use, never at module import.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import require
from .base import SPARE, GalleryPyramids, GalleryRows, PixelScorer, TopK, keep

KERNEL_SOURCE = Path(__file__).parent / "kernels" / "topk.cu"
KERNEL_NAMES = (
    "prepare_query",
    "gather_fp16",
    "gallery_sqnorms",
    "gallery_reach",
    "screen_select",
    "fused_select",
    "finish_rows",
    "rescore_distances",
    "rescore_select",
)
KEEP_MAX = 96  # as in the .cu: kappa + SPARE candidates a row may keep
LV_FIELDS = 16
THREADS = 128  # query rows per block of the selection kernel
FINISH_THREADS = RESCORE_THREADS = 32
REACH_THREADS = 128
MAX_SPLITS = 32
FT_ROWS = FT_COLS = FT_THREADS = 64  # as in the .cu: the fused kernel's query rows, columns a tile, threads
FUSED_MIN_CHANNELS = 16  # one m16n16k16 step: below it most of each tensor-core product is padding
TARGET_BLOCKS = 1024  # selection blocks to aim for: several per SM on the largest GPUs
U16 = 2.0**-11  # fp16 unit roundoff (round to nearest)
U32 = 2.0**-24
# Tensor-core accumulation, per product summed (screen_bound): fp32 truncation 2^-23, x 2 for the block
# FMA's alignment (each of b addends truncated at the largest one's last bit, then the sum: (b+1)/b <= 2),
# x 4 (two bits) of margin for alignment widths NVIDIA does not document
U_ACC = 2.0**-20
ETA16 = 2.0**-25  # absolute rounding of fp16 near zero (half its subnormal spacing)


def screen_bound(total_channels: int, n_levels: int) -> tuple[float, float, float, float]:
    """(c_dot, c_acc, c_sub, c_norm): for every pair, |screen value - true value| of a = |g|^2 - 2 <q, g> is
    at most (c_dot |q| + c_acc A) R + c_sub (|q| + R + 1) + c_norm |g|^2, where |q| bounds the query row's
    norm, A = sqrt(sum_l gamma_l^2 |q_l|^2) its accumulation term (gamma_l below; both made by the
    kernel prepare_query, rounded up) and R the gallery image's reach (sqrt of the sum over levels of
    its largest stored-row norm squared).

    Per level l with C_l channels, q and g rounded to fp16 (the query after one rounding to fp32, hence
    u = 2^-11 + 2^-23 relative, and ETA16 absolute near zero) and their products summed in fp32:
    |<q,g> - S| <= (2u + u^2) |q||g| + gamma_l (1+u)^2 |q||g| + ETA16 sqrt(C) (|q| + |g|) (1 + u) + ...
    with gamma_l = C_l U_ACC / (1 - C_l U_ACC). The accumulation is the tensor cores' (cuBLAS GemmEx for
    the levels through memory, wmma mma_sync in the fused kernel): per Fasi, Higham, Mikaitis and
    Pranesh, "Numerical behavior of NVIDIA tensor cores" (PeerJ Comput. Sci. 7:e330, 2021), a step adds
    b exact products (b = 4 on V100/T4, 8 on A100) to the accumulator by aligning all b + 1 addends to
    the largest exponent, truncating the others' bits below its 24-bit significand, and truncating the
    normalised sum: an error below (b + 1) 2^-23 times the sum of the step's |addends|, so below
    2 C 2^-23 sum |q_i g_i| over the C / b steps for any b >= 1, in any order of steps (a factor
    (b+1)/b the earlier C 2^-23 lacked). Hopper's and later parts' alignment width is not published for
    fp16 (DeepSeek-V3's report finds ~14 bits kept in H800 FP8 accumulation; the screen never uses FP8):
    U_ACC takes a further factor 4 (two bits fewer than fp32) as margin. A bound too wide costs exact
    re-computation only (rows not settled are searched again); one too tight would cost exactness.
    Coarse levels are interpolated in fp32 (a convex combination of taps, each |g_tap| <= R_l: three
    more roundings, 4 U32), the levels summed and |g|^2 (from fp64, one rounding) added: gamma_{L+1}
    (|g|^2 + 2 sum |dot_l|). Cauchy-Schwarz folds sum_l |q_l| R_l into |q| R and sum_l gamma_l |q_l| R_l
    into A R (each level its own gamma: the pyramid's 1024-channel level does not widen the others').
    A margin of 1% covers the second-order terms and the bound's own rounding."""
    u = U16 + 2 * U32
    gamma_l = (n_levels + 1) * U32 / (1 - (n_levels + 1) * U32)
    c_dot = 2.0 * (2 * u + u * u + 4 * U32 + gamma_l) * 1.01
    c_acc = 2.0 * (1 + u) ** 2 * 1.01
    c_sub = 4.0 * ETA16 * np.sqrt(total_channels) * (1 + u) * 1.01
    c_norm = (U32 + gamma_l) * 1.01
    return float(c_dot), float(c_acc), float(c_sub), float(c_norm)


def fused_applies(fine_channels: int) -> bool:
    """Whether the fine level's product is fused with the selection (kernel ``fused_select``: the product
    never goes to memory) rather than made by a GEMM through memory and read by ``screen_select``. The
    one place the choice is made: any stored dtype (the kernels gather fp16 rows of fp32, fp16 and int8
    galleries alike), any shape, once the fine level has a full MMA step of channels."""
    return int(fine_channels) >= FUSED_MIN_CHANNELS


def cuda_include_dir(cp=None) -> str | None:
    """A CUDA toolkit include folder holding <mma.h> and the <crt/mma.h> it includes (NVRTC needs it for
    the fused kernel): $CUDA_PATH, $CUDA_HOME, CuPy's CUDA path, /usr/local/cuda; None if none has it
    (the NVIDIA runtime wheels ship mma.h without crt/mma.h)."""
    import os

    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
    get = getattr(getattr(cp, "cuda", None), "get_cuda_path", None)
    if get is not None:
        try:
            roots.append(get())
        except Exception:  # CuPy raises where it finds no toolkit
            pass
    roots.append("/usr/local/cuda")
    for root in roots:
        if root and (Path(root) / "include" / "crt" / "mma.h").is_file():
            return str(Path(root) / "include")
    return None


class _Device:
    """Kernels (RawModule or SourceModule) and cuBLAS on one device; every launch and GEMM goes through
    :meth:`launch` / :meth:`gemm`, which count them (``launches``)."""

    def __init__(self, cp, device_id: int, loader: str):
        self.cp, self.device_id, self.loader = cp, device_id, loader
        self.launches = 0
        source = KERNEL_SOURCE.read_text()
        self.wmma = True  # whether the fused kernel (it needs <mma.h>) was compiled
        if loader == "cupy":
            self._fns = self._nvrtc(cp, source)
        elif loader == "pycuda":
            drv = require("pycuda.driver", "gpu", "The CUDA pixel scorer's pycuda loader")
            compiler = require("pycuda.compiler", "gpu", "The CUDA pixel scorer's pycuda loader")
            drv.init()
            # the device's primary context: the one CuPy's memory and cuBLAS live in
            self._ctx = drv.Device(device_id).retain_primary_context()
            self._ctx.push()
            try:
                module = compiler.SourceModule(source, no_extern_c=True, options=["-std=c++17"])
                self._fns = {n: module.get_function(n) for n in KERNEL_NAMES}
            finally:
                drv.Context.pop()
            self._drv = drv
        else:
            raise ValueError(f"loader must be 'cupy' or 'pycuda', got {loader!r}")
        self._one = np.ones(1, np.float32)  # GemmEx's alpha and beta live in host memory
        self._zero = np.zeros(1, np.float32)

    def _nvrtc(self, cp, source: str) -> dict:
        """The kernels through CuPy's RawModule (NVRTC). NVRTC has no built-in <mma.h>: the CUDA toolkit's
        include folder is passed where one is found (:func:`cuda_include_dir`); where that compile fails,
        the source is compiled again without the fused kernel (``-DSPADE_NO_WMMA``: every product
        through memory, ``stats["path"]`` says so) rather than not at all."""
        include = cuda_include_dir(cp)
        options = ("-std=c++17",) + ((f"-I{include}",) if include else ())
        try:
            module = cp.RawModule(code=source, options=options)
            return {n: module.get_function(n) for n in KERNEL_NAMES}
        except Exception as exc:  # CuPy's CompileException; get_function compiles lazily
            if "mma.h" not in str(exc):
                raise
            import warnings

            warnings.warn(
                f"NVRTC cannot find the CUDA headers (<mma.h>; set CUDA_PATH to the CUDA toolkit): the CUDA "
                f"scorer runs without its fused kernel, every product through memory ({exc})",
                stacklevel=3,
            )
        self.wmma = False
        module = cp.RawModule(code=source, options=(*options, "-DSPADE_NO_WMMA"))
        return {n: module.get_function(n) for n in KERNEL_NAMES if n != "fused_select"}

    def count(self, n: int = 1) -> None:
        """Launches made by CuPy operations on this device (copies, casts) for a search."""
        self.launches += int(n)

    def launch(self, name: str, grid: tuple, block: int, args: Sequence) -> None:
        self.launches += 1
        fn = self._fns[name]
        if self.loader == "cupy":
            fn(grid, (block,), tuple(args))
            return
        cp = self.cp
        # pycuda packs numpy scalars at their width; device arrays go as their address
        packed = [np.uintp(a.data.ptr) if isinstance(a, cp.ndarray) else a for a in args]
        self._ctx.push()
        try:
            fn(*packed, block=(block, 1, 1), grid=tuple(grid) + (1,) * (2 - len(grid)))
        finally:
            self._drv.Context.pop()

    def gemm(self, a16, b16, out, m: int, n: int, k: int) -> None:
        """out (n, m) row-major, fp32 = b16 (n, k) . a16 (m, k)^T, fp16 in, fp32 accumulation: in cuBLAS's
        column-major terms C (m x n) = A^T B with A = a16 as (k x m), B = b16 as (k x n)."""
        self.launches += 1
        cp = self.cp
        cublas = cp.cuda.cublas
        rt = cp.cuda.runtime
        cublas.gemmEx(
            cp.cuda.device.get_cublas_handle(),
            cublas.CUBLAS_OP_T,
            cublas.CUBLAS_OP_N,
            m,
            n,
            k,
            self._one.ctypes.data,
            a16.data.ptr,
            rt.CUDA_R_16F,
            k,
            b16.data.ptr,
            rt.CUDA_R_16F,
            k,
            self._zero.ctypes.data,
            out.data.ptr,
            rt.CUDA_R_32F,
            m,
            cublas.CUBLAS_COMPUTE_32F,
            cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )


class CudaScorer(PixelScorer):
    """Exact top-kappa on an NVIDIA GPU (module docstring). ``tile_bytes``: at most about this much of
    screen products at a time (the retrieved images go through in chunks beyond it; default: see
    :attr:`tile_bytes`); ``loader``:
    "cupy" (RawModule) or "pycuda" (SourceModule) for the kernels; ``fused``: fuse the fine level's
    product with the selection where :func:`fused_applies` (False: every product through memory, the
    design before it; kept for comparison).

    ``stats`` after each search: ``path``, ``launches`` (kernel launches and GEMMs of that search),
    ``rescored_rows`` (rows the screen could not settle, searched again exactly), ``exact`` (candidates
    re-computed exactly), ``splits`` (gallery splits of the selection), ``uploaded_gallery`` (whether
    gallery data crossed the bus for this search)."""

    name = "cuda"

    def __init__(self, device_id: int = 0, tile_bytes: int | None = None, loader: str = "cupy", fused: bool = True):
        super().__init__()
        self.fused = bool(fused)
        self.device_id = int(device_id)
        self._tile_bytes = None if tile_bytes is None else int(tile_bytes)
        self.loader = loader
        self._dev: _Device | None = None
        self._attached: tuple | None = None  # (gallery object, DeviceLevels)
        self._tap_cache: dict = {}

    # -------------------------------------------------------------- setup

    @property
    def tile_bytes(self) -> int:
        """Screen products held in memory at a time: as given, else an eighth of the device's memory, at
        most 4 GiB (WRN50x2 at K = 50 needs 0.6 GB with the fine level fused, 2.6 GB without: one pass
        on an H200 or an AGX Orin)."""
        if self._tile_bytes is None:
            cp = self._cupy()
            total = int(cp.cuda.runtime.getDeviceProperties(self.device_id)["totalGlobalMem"])
            self._tile_bytes = int(min(4 << 30, max(64 << 20, total // 8)))
        return self._tile_bytes

    def _cupy(self):
        return require("cupy", "gpu", "The CUDA pixel scorer")

    def _device(self) -> _Device:
        if self._dev is None:
            self._dev = _Device(self._cupy(), self.device_id, self.loader)
        return self._dev

    def attach(self, gallery) -> None:
        """Upload ``gallery`` (a loaded Gallery) to the device once, as stored; later searches through
        its views gather the retrieved images there. Attaching another gallery replaces it."""
        from .cuda_gallery import from_gallery

        cp = self._cupy()
        with cp.cuda.Device(self.device_id):
            self._device()
            self._attached = None  # the old copy is freed before the new one is made
            try:
                self._attached = (gallery, from_gallery(cp, gallery))
            except Exception as exc:
                if type(exc).__name__ != "OutOfMemoryError":
                    raise
                import warnings

                # still exact, only slower: each search uploads the images it retrieves
                warnings.warn(
                    f"the gallery does not fit on GPU {self.device_id} ({exc}); the CUDA scorer uploads "
                    "the retrieved images per request",
                    stacklevel=2,
                )

    def close(self) -> None:
        self._attached = None

    # -------------------------------------------------------------- the two searches

    def topk(self, query, gallery: GalleryRows | Iterable[np.ndarray], kappa: int) -> TopK:
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        cp = self._cupy()
        with cp.cuda.Device(self.device_id):
            view = gallery if isinstance(gallery, GalleryRows) else GalleryRows.of(list(gallery))
            q = query if isinstance(query, cp.ndarray) else np.asarray(query)
            if q.ndim != 2:
                raise ValueError(f"query has shape {q.shape}, expected (P, D)")
            start = self._device().launches
            dev_levels, name, images, uploaded = self._rows_gallery(cp, view, q.shape[1])
            return self._search(cp, dev_levels, [name], images, [q], None, kappa, uploaded, "fp16 screen", start)

    def topk_pyramid(self, query, gallery, grid, kappa) -> TopK:
        if kappa < 1:
            raise ValueError(f"kappa must be >= 1, got {kappa}")
        cp = self._cupy()
        grid = (int(grid[0]), int(grid[1]))
        with cp.cuda.Device(self.device_id):
            view = GalleryPyramids.of(gallery, grid)
            levels = [x if isinstance(x, cp.ndarray) else np.asarray(x) for x in query]
            start = self._device().launches
            dev_levels, names, images, uploaded = self._pyramid_gallery(cp, view, levels, grid)
            return self._search(
                cp, dev_levels, names, images, levels, grid, kappa, uploaded, "fp16 screen levels", start
            )

    # -------------------------------------------------------------- galleries

    def _source(self, view):
        """(DeviceLevels, level names, images) where ``view`` reads the attached gallery, else None."""
        source = getattr(view, "source", None)
        if source is None or self._attached is None or source[0] is not self._attached[0]:
            return None
        return self._attached[1], source[1], source[2]

    def _rows_gallery(self, cp, view: GalleryRows, dim: int):
        from .cuda_gallery import DeviceLevels

        found = self._source(view)
        if found is not None:
            dev, name, images = found
            if dev.level(name).channels != dim:
                raise ValueError(f"gallery level {name} has {dev.level(name).channels} channels, query {dim}")
            return dev, name, np.asarray(images, np.int64), False
        blocks = [view[j] for j in range(len(view))]
        for b in blocks:
            if b.ndim != 2 or b.shape[1] != dim:
                raise ValueError(f"gallery block has shape {b.shape}, expected (M, {dim})")
        offsets = np.r_[0, np.cumsum([len(b) for b in blocks])].astype(np.int64)
        on_device = any(isinstance(b, cp.ndarray) for b in blocks)
        dtypes = {np.dtype(b.dtype) for b in blocks}
        dtype = dtypes.pop() if len(dtypes) == 1 and np.dtype(np.int8) not in dtypes else np.dtype(np.float32)
        count = self._device().count
        if on_device:
            count(1 + sum(isinstance(b, cp.ndarray) and b.dtype != dtype for b in blocks))  # concatenate, casts
            rows = cp.concatenate([cp.asarray(b).astype(dtype, copy=False) for b in blocks])
        else:
            rows = np.concatenate([np.asarray(b, dtype) for b in blocks])
        dev = DeviceLevels(cp, {"rows": (rows, None, offsets)}, on_copy=count)
        return dev, "rows", np.arange(len(blocks), dtype=np.int64), True

    def _pyramid_gallery(self, cp, view: GalleryPyramids, query: list, grid):
        from .cuda_gallery import DeviceLevels

        found = self._source(view)
        if found is not None:
            dev, names, images = found
            names = list(names)
            for n, q in zip(names, query):
                lv = dev.level(n)
                if not lv.dense:
                    raise ValueError(
                        "a coreset gallery keeps a subset of pixels; the concatenated pyramid needs them all"
                    )
                if lv.channels != q.shape[2]:
                    raise ValueError(f"gallery level {n} has {lv.channels} channels, query {q.shape[2]}")
            return dev, names, np.asarray(images, np.int64), False
        images = [view[j] for j in range(len(view))]
        names = [f"level{i}" for i in range(len(query))]
        levels = {}
        for i, n in enumerate(names):
            maps = [img[i] for img in images]
            if any(m.shape != maps[0].shape for m in maps) or maps[0].shape[2] != query[i].shape[2]:
                raise ValueError(f"gallery level {i} shapes {[m.shape for m in maps]} against query {query[i].shape}")
            if any(isinstance(m, cp.ndarray) for m in maps):
                self._device().count(1 + sum(isinstance(m, cp.ndarray) and m.dtype != cp.float32 for m in maps))
                stack = cp.stack([cp.asarray(m, cp.float32) for m in maps])
            else:
                stack = np.stack([np.asarray(m, np.float32) for m in maps])
            levels[n] = (stack, None, None)
        dev = DeviceLevels(cp, levels, on_copy=self._device().count)
        return dev, names, np.arange(len(images), dtype=np.int64), True

    # -------------------------------------------------------------- the search

    def _taps(self, cp, grid, shape):
        """Bilinear taps of ``shape`` (h, w) on ``grid``, on the device: (indices, weights), laid out
        y0[H] y1[H] x0[W] x1[W], as resample.taps gives them."""
        from ..resample import taps

        key = (grid, shape)
        if key not in self._tap_cache:
            ty, tx = taps(grid[0], shape[0]), taps(grid[1], shape[1])
            idx = np.concatenate([ty[0], ty[1], tx[0], tx[1]]).astype(np.int64)
            w = np.concatenate([ty[2], ty[3], tx[2], tx[3]]).astype(np.float32)
            self._tap_cache[key] = (idx, w)
        return self._tap_cache[key]

    def _search(self, cp, dev_levels, names, images, query, grid, kappa, uploaded, path, start_launches) -> TopK:
        """The search of ``query`` (levels in ``names``' order) against ``images`` of ``dev_levels``;
        ``start_launches``: the launch count when this search began (gathering its gallery included)."""
        dev = self._device()
        n_keep = keep(kappa)
        if n_keep > KEEP_MAX:
            raise ValueError(f"kappa = {kappa} is above the GPU scorer's {KEEP_MAX - SPARE}")
        levels = [dev_levels.level(n) for n in names]
        rows_mode = grid is None
        if rows_mode:
            p_rows = int(query[0].shape[0])
            big_w, big_h = 1, p_rows
            fine = [True]
        else:
            big_h, big_w = grid
            p_rows = big_h * big_w
            fine = [lv.shape == grid for lv in levels]
            if not any(fine):
                raise ValueError(f"no level is at the grid {grid}: levels {[lv.shape for lv in levels]}")
        for q, lv in zip(query, levels):
            if q.shape[-1] != lv.channels:
                raise ValueError(f"query level has {q.shape[-1]} channels, gallery {lv.channels}")
        order = sorted(range(len(levels)), key=lambda i: not fine[i])  # fine levels first
        images = np.asarray(images, np.int64)
        k_count = len(images)
        fine_lv = levels[order[0]]
        sizes = np.diff(fine_lv.row_starts)[images] if k_count else np.zeros(0, np.int64)
        colstart = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        n_cols = int(colstart[-1])
        if n_cols < kappa:
            raise ValueError(f"gallery has {n_cols} features, fewer than kappa = {kappa}")

        # descriptors and offsets (host), one small upload with the query
        lv = np.zeros((len(order), LV_FIELDS), np.int64)
        tap_idx, tap_w = [np.zeros(1, np.int64)], [np.zeros(1, np.float32)]
        n_taps = 1
        d_total = q_in = q16 = g16 = 0
        for row, i in enumerate(order):
            lvl = levels[i]
            c = lvl.channels
            h, w = lvl.shape if lvl.dense else (0, 0)
            native = n_cols if fine[i] else k_count * h * w
            lv[row, :] = [
                0 if fine[i] else 1,
                h,
                w,
                c,
                lvl.byte_offset,
                lvl.dtype_code,
                lvl.scale_offset,
                d_total,
                0,
                lvl.rows_offset,
                0,
                g16,
                q16,
                q_in,
                native,
                big_h,
            ]
            if not fine[i]:
                idx, wt = self._taps(cp, grid, (h, w))
                lv[row, 10] = n_taps
                tap_idx.append(idx)
                tap_w.append(wt)
                n_taps += len(idx)
            d_total += c
            q_in += int(np.prod(query[i].shape))
            q16 += p_rows * c
            g16 += native * c
        c_max = int(max(lvl.channels for lvl in levels))
        c_dot, c_acc, c_sub, c_norm = screen_bound(d_total, len(levels))
        fused = self.fused and dev.wmma and fused_applies(levels[order[0]].channels)
        path = ("cuda fused " if fused else "cuda ") + path
        through_memory = order[1:] if fused else order  # levels whose products a GEMM writes to memory

        # chunks of retrieved images whose products fit tile_bytes
        per_image = sum(
            (int(np.max(sizes)) if fine[i] else levels[i].shape[0] * levels[i].shape[1]) * p_rows * 4
            for i in through_memory
        )
        chunk = max(1, min(k_count, self.tile_bytes // max(per_image, 1)))
        chunks = [(s, min(k_count, s + chunk)) for s in range(0, k_count, chunk)]
        row_blocks = -(-p_rows // THREADS)
        select_blocks = -(-p_rows // FT_ROWS) if fused else row_blocks
        plan = []
        for s, e in chunks:
            cols = int(colstart[e] - colstart[s])
            splits = int(max(1, min(MAX_SPLITS, -(-TARGET_BLOCKS // select_blocks), -(-cols // 64))))
            span = -(-cols // splits)
            if fused:  # whole column tiles per split
                span = -(-span // FT_COLS) * FT_COLS
                splits = -(-cols // span)
            plan.append((s, e, cols, splits, span))
        total_splits = sum(p[3] for p in plan)

        # per chunk, its descriptors: products and gathered rows of each level from 0
        lv_chunks = []
        for s, e, cols, _, _ in plan:
            lv_chunk = lv.copy()
            s_off = g_off = 0
            for row, i in enumerate(order):
                native = cols if fine[i] else (e - s) * levels[i].shape[0] * levels[i].shape[1]
                lv_chunk[row, 8], lv_chunk[row, 11], lv_chunk[row, 14] = s_off, g_off, native
                s_off += native * p_rows if i in through_memory else 0
                g_off += native * levels[i].channels
            lv_chunks.append(lv_chunk)
        meta = np.concatenate([*(x.reshape(-1) for x in lv_chunks), images, colstart, np.concatenate(tap_idx)])
        meta_d = cp.asarray(meta)
        a = 0
        lv_ds = []
        for _ in lv_chunks:
            lv_ds.append(meta_d[a : a + lv.size])
            a += lv.size
        lv_d = lv_ds[0]
        images_d = meta_d[a : a + k_count]
        a += k_count
        colstart_d = meta_d[a : a + k_count + 1]
        a += k_count + 1
        taps_d = meta_d[a:]
        tapw_d = cp.asarray(np.concatenate(tap_w))
        qin = self._pack_query(cp, [query[i] for i in order], q_in)
        counters = cp.asarray(np.zeros(2, np.int32))  # unsettled rows, exact re-computations

        q64 = cp.empty(p_rows * d_total, dtype=cp.float64)
        q16_d = cp.empty(max(q16, 1), dtype=cp.uint16)
        qnorm = cp.empty(2 * p_rows, dtype=cp.float32)  # |q|, then the accumulation term A
        n_lv = np.int32(len(order))
        dev.launch(
            "prepare_query",
            (row_blocks,),
            THREADS,
            (
                qin,
                lv_d,
                n_lv,
                taps_d,
                tapw_d,
                np.int64(p_rows),
                np.int64(big_w),
                np.int64(d_total),
                np.float64(U_ACC),
                q64,
                q16_d,
                qnorm,
            ),
        )
        gn, reach = self._gallery_norms(cp, dev, dev_levels, names, order, lv, tap_idx, tap_w, grid, big_w)

        cand_a = cp.empty(total_splits * n_keep * p_rows, dtype=cp.float32)
        cand_e = cp.empty(total_splits * n_keep * p_rows, dtype=cp.float32)
        cand_c = cp.empty(total_splits * n_keep * p_rows, dtype=cp.int64)
        drop = cp.empty(total_splits * p_rows, dtype=cp.float32)
        split_base = 0
        for (s, e, _, splits, span), lv_chunk, lv_c in zip(plan, lv_chunks, lv_ds):
            k_here = e - s
            last = len(order) - 1
            s_off = int(lv_chunk[last, 8] + lv_chunk[last, 14] * p_rows * (order[last] in through_memory))
            g_off = int(lv_chunk[last, 11] + lv_chunk[last, 14] * levels[order[last]].channels)
            g16_d = cp.empty(max(g_off, 1), dtype=cp.uint16)
            prods = cp.empty(max(s_off, 1), dtype=cp.float32)
            img_c, col_c = images_d[s:e], colstart_d[s : e + 1]
            dev.launch(
                "gather_fp16",
                (min(4096, -(-max(int(lv_chunk[:, 14].max() * c_max), 1) // 256)), len(order)),
                256,
                (dev_levels.blob, dev_levels.scales, dev_levels.rows, lv_c, img_c, col_c, np.int32(k_here), g16_d),
            )
            for row, i in enumerate(order):
                if i not in through_memory:
                    continue
                c = levels[i].channels
                native = int(lv_chunk[row, 14])
                dev.gemm(
                    q16_d[int(lv[row, 12]) : int(lv[row, 12]) + p_rows * c],
                    g16_d[int(lv_chunk[row, 11]) : int(lv_chunk[row, 11]) + native * c],
                    prods[int(lv_chunk[row, 8]) : int(lv_chunk[row, 8]) + native * p_rows],
                    p_rows,
                    native,
                    c,
                )
            dev.launch(
                "fused_select" if fused else "screen_select",
                (select_blocks, splits),
                FT_THREADS if fused else THREADS,
                (
                    *((q16_d, g16_d) if fused else ()), prods, lv_c, n_lv, taps_d, tapw_d, dev_levels.rows, img_c, col_c, np.int32(k_here), gn, reach,
                    qnorm, np.float32(c_dot), np.float32(c_acc), np.float32(c_sub), np.float32(c_norm), np.int64(p_rows),
                    np.int64(big_w), np.int64(span), np.int32(n_keep), np.int64(split_base),
                    cand_a, cand_e, cand_c, drop,
                ),
            )  # fmt: skip
            split_base += splits

        out_d = cp.empty(p_rows * kappa, dtype=cp.float32)
        out_i = cp.empty(p_rows * kappa, dtype=cp.int64)
        unsettled_rows = cp.empty(p_rows, dtype=cp.int64)
        common = (
            dev_levels.blob, dev_levels.scales, dev_levels.rows, lv_d, n_lv, taps_d, tapw_d, images_d, colstart_d,
            np.int32(k_count), np.int64(big_w),
        )  # fmt: skip
        dev.launch(
            "finish_rows",
            (p_rows,),
            FINISH_THREADS,
            (
                cand_a, cand_e, cand_c, drop, np.int32(total_splits), np.int32(n_keep), np.int32(kappa),
                np.int64(p_rows), q64, np.int64(d_total), *common, out_d, out_i, counters[0:1], unsettled_rows,
                counters[1:2],
            ),
        )  # fmt: skip
        n_unsettled, n_exact = (int(v) for v in cp.asnumpy(counters))
        if n_unsettled:
            self._rescore(cp, dev, unsettled_rows, n_unsettled, n_cols, q64, d_total, common, kappa, out_d, out_i)
        top = TopK(cp.asnumpy(out_d).reshape(p_rows, kappa), cp.asnumpy(out_i).reshape(p_rows, kappa))
        self.stats = {
            "path": path,
            "fused": fused,
            "launches": dev.launches - start_launches,
            "rescored_rows": n_unsettled,
            "exact": n_exact,
            "splits": total_splits,
            "chunks": len(plan),
            "uploaded_gallery": bool(uploaded),
            "loader": self.loader,
        }
        return top

    def _pack_query(self, cp, levels: list, total: int):
        """The query levels, flat and back to back, fp32 on the device: one upload for host arrays."""
        if not any(isinstance(x, cp.ndarray) for x in levels):
            return cp.asarray(np.concatenate([np.asarray(x, np.float32).reshape(-1) for x in levels]))
        out = cp.empty(total, dtype=cp.float32)
        a = 0
        for x in levels:
            n = int(np.prod(x.shape))
            if isinstance(x, cp.ndarray):  # a copy kernel on the device (and a cast, or a host upload)
                self._device().count(1 + (x.dtype != cp.float32) + (not x.flags.c_contiguous))
            out[a : a + n] = cp.asarray(x, cp.float32).reshape(-1)
            a += n
        return out

    def _gallery_norms(self, cp, dev, dev_levels, names, order, lv, tap_idx, tap_w, grid, big_w):
        """|U g|^2 of every column of the whole gallery and each image's reach, made on first use for
        these levels and grid, kept with the device gallery."""
        key = (tuple(names[i] for i in order), grid)
        if key in dev_levels.memo:
            return dev_levels.memo[key]
        lv_d = cp.asarray(lv.reshape(-1))
        taps_d = cp.asarray(np.concatenate(tap_idx))
        tapw_d = cp.asarray(np.concatenate(tap_w))
        n_lv = np.int32(len(order))
        total = int(dev_levels.level(names[order[0]]).row_starts[-1])
        gn = cp.empty(max(total, 1), dtype=cp.float32)
        reach = cp.empty(max(dev_levels.n_images, 1), dtype=cp.float32)
        dev.launch(
            "gallery_sqnorms",
            (max(1, -(-total // THREADS)),),
            THREADS,
            (dev_levels.blob, dev_levels.scales, dev_levels.rows, lv_d, n_lv, taps_d, tapw_d,
             np.int64(dev_levels.n_images), np.int64(big_w), gn),
        )  # fmt: skip
        dev.launch(
            "gallery_reach",
            (max(1, dev_levels.n_images),),
            REACH_THREADS,
            (dev_levels.blob, dev_levels.scales, dev_levels.rows, lv_d, n_lv, reach),
        )
        dev_levels.memo[key] = (gn, reach)
        return gn, reach

    def _rescore(self, cp, dev, rows, n_rows, n_cols, q64, d_total, common, kappa, out_d, out_i) -> None:
        """Search the unsettled ``rows`` again exactly over every column, in slabs of rows whose fp64
        distances fit ``tile_bytes``."""
        slab = max(1, min(n_rows, 65535, self.tile_bytes // max(8 * n_cols, 1)))
        for a in range(0, n_rows, slab):
            r = min(slab, n_rows - a)
            dist = cp.empty(r * n_cols, dtype=cp.float64)
            dev.launch(
                "rescore_distances",
                (-(-n_cols // THREADS), r),
                THREADS,
                (rows[a : a + r], np.int64(n_cols), q64, np.int64(d_total), *common[:3], *common[3:], dist),
            )
            scratch_d = cp.empty(r * RESCORE_THREADS * kappa, dtype=cp.float64)
            scratch_c = cp.empty(r * RESCORE_THREADS * kappa, dtype=cp.int64)
            dev.launch(
                "rescore_select",
                (r,),
                RESCORE_THREADS,
                (rows[a : a + r], np.int64(n_cols), dist, np.int32(kappa), scratch_d, scratch_c, out_d, out_i),
            )
