"""A gallery's levels on the GPU, as stored (fp32, fp16 or int8 with its per-channel scales), for the
CUDA scorer (scoring/cuda.py): uploaded once through pinned staging buffers, read by the kernels of
kernels/topk.cu, which decode on the device and gather the retrieved images there.

Layout: every level's stored rows in one byte buffer (``blob``, each level 256-byte aligned), the
int8 levels' scales in one fp32 buffer, and per level the first row of each image (``rows``: dense
levels i * h * w, coreset levels their offsets), so that a kernel reaches any level of any image
through one pointer and a few descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 2}
ALIGN = 256
STAGING_BYTES = 16 << 20  # per pinned buffer; two of them alternate


@dataclass
class DeviceLevel:
    """Where one level lives in a :class:`DeviceLevels`."""

    name: str
    shape: tuple[int, int]  # (h, w) of a dense level; (0, 0) for a coreset (rows per image vary)
    channels: int
    byte_offset: int
    dtype_code: int
    scale_offset: int  # -1: no scales
    rows_offset: int  # first entry of this level's row starts in ``rows``
    row_starts: np.ndarray  # (N + 1,) host copy

    @property
    def dense(self) -> bool:
        return self.shape != (0, 0)


class DeviceLevels:
    """Levels ``{name: (stored, scale, offsets)}`` on the current CuPy device: ``stored`` (N, h, w, C)
    dense or (M, C) rows with ``offsets`` (N + 1,) per image; ``scale`` (C,) fp32 for int8 or None.
    ``stored`` may be a numpy array (a memory map too: read chunk by chunk into pinned memory) or a
    CuPy array already on the device (copied there, no upload; ``on_copy(n)`` is told of the n device
    copies that makes)."""

    def __init__(self, cp, levels: dict, staging_bytes: int = STAGING_BYTES, on_copy=None):
        self.levels: dict[str, DeviceLevel] = {}
        self.memo: dict = {}  # per (names, grid): the kernels' gallery norms and reaches
        sizes, scales, rows = [], [], []
        total, n_scales, n_rows, count = 0, 0, 0, None
        for name, (stored, scale, offsets) in levels.items():
            dtype = np.dtype(stored.dtype)
            if dtype not in DTYPE_CODES:
                raise ValueError(f"level {name}: stored dtype {dtype} is not fp32, fp16 or int8")
            if offsets is None:
                n, h, w, c = stored.shape
                starts = np.arange(n + 1, dtype=np.int64) * (h * w)
                shape = (int(h), int(w))
            else:
                c = stored.shape[1]
                starts = np.asarray(offsets, np.int64)
                n, shape = len(starts) - 1, (0, 0)
            if count is not None and n != count:
                raise ValueError(f"level {name} has {n} images, another level {count}")
            count = n
            if (dtype == np.int8) != (scale is not None):
                raise ValueError(f"level {name}: int8 storage needs its scales, other storage none")
            scale_offset = -1
            if scale is not None:
                scales.append(np.asarray(scale, np.float32).reshape(-1))
                scale_offset, n_scales = n_scales, n_scales + int(c)
            self.levels[name] = DeviceLevel(
                name, shape, int(c), total, DTYPE_CODES[dtype], scale_offset, n_rows, starts
            )
            rows.append(starts)
            n_rows += len(starts)
            nbytes = int(np.prod(stored.shape, dtype=np.int64)) * dtype.itemsize
            sizes.append((stored, total, nbytes))
            total += nbytes + (-nbytes) % ALIGN
        self.n_images = int(count or 0)
        self.nbytes = total
        self.blob = cp.empty(max(total, ALIGN), dtype=cp.uint8)
        _upload(cp, self.blob, sizes, staging_bytes, on_copy or (lambda n: None))
        self.scales = cp.asarray(np.concatenate(scales) if scales else np.zeros(1, np.float32))
        self.rows = cp.asarray(np.concatenate(rows))

    def level(self, name: str) -> DeviceLevel:
        return self.levels[name]


def _upload(cp, blob, parts, staging_bytes: int, on_copy) -> None:
    """Copy each (array, byte offset, nbytes) into ``blob``: device arrays on the device, host arrays
    through two pinned buffers that alternate on a stream (one fills while the other is copied)."""
    import cupyx

    host = [(a, off, n) for a, off, n in parts if not isinstance(a, cp.ndarray)]
    for a, off, n in parts:
        if isinstance(a, cp.ndarray) and n:
            on_copy(1 + (not a.flags.c_contiguous))  # a copy kernel (and one to make it contiguous)
            blob[off : off + n] = cp.ascontiguousarray(a).reshape(-1).view(cp.uint8)
    if not host:
        return
    chunk = int(min(staging_bytes, max(n for _, _, n in host)))
    if chunk <= 0:
        return
    pinned = [cupyx.empty_pinned(chunk, dtype=np.uint8) for _ in range(2)]
    stream = cp.cuda.Stream(non_blocking=True)
    base = blob.data.ptr
    turn = 0
    pending = [False, False]
    for a, off, n in host:
        flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # a memory map is read here, chunk by chunk
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            if pending[turn]:
                stream.synchronize()  # the copy out of this buffer is done before it is refilled
                pending = [False, False]
            pinned[turn][: e - s] = flat[s:e]
            cp.cuda.runtime.memcpyAsync(
                base + off + s, pinned[turn].ctypes.data, e - s, cp.cuda.runtime.memcpyHostToDevice, stream.ptr
            )
            pending[turn] = True
            turn ^= 1
    stream.synchronize()


def from_gallery(cp, gallery) -> DeviceLevels:
    """Every level of a loaded :class:`~spade_edge.runtime.gallery.Gallery`, as stored."""
    levels = {}
    for name, store in gallery.levels.items():
        scale = None if store.codec.scale is None else np.asarray(store.codec.scale, np.float32)
        levels[name] = (store.data, scale, None if store.offsets is None else np.asarray(store.offsets))
    return DeviceLevels(cp, levels)
