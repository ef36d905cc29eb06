"""The gallery file: normal-part features, names, thresholds and provenance in one file.

Layout (little-endian)::

    b"SPADEGAL"            8 bytes magic
    header length          uint64
    header SHA-256         32 bytes
    header                 UTF-8 JSON (the manifest), padded to 64 bytes
    arrays                 raw C-order arrays, each 64-byte aligned

The manifest lists every array with dtype, shape, offset and SHA-256. No pickle; arrays are
memory-mapped at load (nothing is copied until scoring touches it). Writes go to a temporary
file in the same folder, then ``os.replace``: an interrupted build leaves the old file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import gallery_check
from .codec import LevelCodec
from .errors import GalleryError, MismatchError
from .modelinfo import ModelInfo
from .scoring.base import GalleryPyramids, GalleryRows

MAGIC = b"SPADEGAL"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sQ32s")


def _pad(n: int) -> int:
    return (-n) % ALIGN


@dataclass
class LevelStore:
    """One pyramid level as stored: dense ``data`` (N, h, w, C') or, for a coreset, kept rows
    (M, C') with ``offsets`` (N + 1,) per image and their grid cells ``yx`` (M, 2)."""

    data: np.ndarray
    grid: tuple[int, int]
    codec: LevelCodec = field(default_factory=LevelCodec)
    offsets: np.ndarray | None = None
    yx: np.ndarray | None = None

    @property
    def coreset(self) -> bool:
        return self.offsets is not None

    @property
    def channels(self) -> int:
        return self.data.shape[-1]

    def count(self) -> int:
        return len(self.offsets) - 1 if self.offsets is not None else len(self.data)

    def rows(self, j: int) -> np.ndarray:
        """Pixel features of gallery image ``j`` as float32 (m, C') rows (decoded one image at a time)."""
        if self.offsets is not None:
            return self.codec.decode(self.data[self.offsets[j] : self.offsets[j + 1]])
        return self.codec.decode(self.data[j]).reshape(-1, self.channels)

    def dense(self, j: int) -> np.ndarray:
        """Gallery image ``j`` as a float32 (h, w, C') map (dense storage only)."""
        if self.coreset:
            raise ValueError(
                "a coreset gallery keeps a subset of pixels; the concatenated pyramid needs them all "
                "(use mode='per-level', or build the gallery without --coreset)"
            )
        return self.codec.decode(self.data[j])

    def cells(self, j: int, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid cells (y, x) of rows ``r`` of image ``j``."""
        if self.offsets is not None:
            assert self.yx is not None  # a coreset level keeps both
            yx = np.asarray(self.yx[self.offsets[j] + r])
            return yx[..., 0].astype(np.int64), yx[..., 1].astype(np.int64)
        return r // self.grid[1], r % self.grid[1]


@dataclass
class Gallery:
    """Features of normal images, as stored; arrays may be read-only memory maps.

    ``levels`` maps level name to :class:`LevelStore`; ``global_features`` is (N, C_global)
    float32 (kept exact: it is small and decides which images are retrieved).
    ``manifest`` holds everything else (model, pre-processing, storage, thresholds, build settings).
    """

    names: list[str]
    global_features: np.ndarray
    levels: dict[str, LevelStore]
    manifest: dict
    thumbnails: np.ndarray | None = None
    path: Path | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_arrays(
        cls,
        names: list[str],
        global_features: np.ndarray,
        levels: dict[str, np.ndarray],
        manifest: dict,
        thumbnails: np.ndarray | None = None,
    ) -> Gallery:
        """An fp32 gallery from dense (N, h, w, C) level arrays."""
        stores = {k: LevelStore(np.asarray(v), tuple(v.shape[1:3])) for k, v in levels.items()}
        return cls(list(names), np.asarray(global_features, np.float32), stores, manifest, thumbnails)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def thresholds(self) -> dict:
        return self.manifest.get("thresholds", {})

    @property
    def storage(self) -> dict:
        return self.manifest.get("storage", {"precision": "fp32"})

    @property
    def global_sqnorm(self) -> np.ndarray:
        """Squared norms of the global features, computed once per loaded gallery."""

        def make() -> np.ndarray:
            g = np.asarray(self.global_features, np.float32)
            return np.einsum("ij,ij->i", g, g)

        return self.memo("global_sqnorm", make)

    def level_view(self, name: str, images) -> GalleryRows:
        """Level ``name`` of gallery ``images`` (indices) as a scorer reads it (scoring/base.py): one
        block of rows per image, decoded each time it is read, their squared norms made once and kept
        while the gallery is loaded, their grid cells (a coreset's kept cells)."""
        store = self.levels[name]
        images = [int(j) for j in images]
        sizes = (
            np.diff(np.asarray(store.offsets))[images]
            if store.coreset
            else np.full(len(images), store.grid[0] * store.grid[1])
        )

        def norms(i: int, block=None) -> np.ndarray:
            j = images[i]
            return self.memo(("sqnorms", name, j), lambda: view.make_sqnorms(store.rows(j) if block is None else block))

        view = GalleryRows(
            lambda i: store.rows(images[i]), sizes, norms, lambda i, rows: store.cells(images[i], rows), store.grid
        )
        view.source = (self, name, images)  # a scorer holding this gallery on its device reads it there
        return view

    def pyramid_view(self, names, images, grid: tuple[int, int]) -> GalleryPyramids:
        """Levels ``names`` of gallery ``images`` as the concatenated pyramid on ``grid`` (the finest
        level's) for a scorer (scoring/base.py): each image's level maps decoded each time it is read,
        the norms of their upsampled concatenation made once and kept while the gallery is loaded.
        Dense storage only (:meth:`LevelStore.dense`)."""
        names, images, grid = list(names), [int(j) for j in images], (int(grid[0]), int(grid[1]))

        def norms(i: int, block=None) -> np.ndarray:
            key = ("concat_sqnorms", tuple(names), grid, images[i])
            return self.memo(key, lambda: view.make_sqnorms(view[i] if block is None else block))

        view = GalleryPyramids(lambda i: [self.levels[n].dense(images[i]) for n in names], len(images), grid, norms)
        view.source = (self, names, images)
        return view

    def memo(self, key, make):
        """A value derived from the stored features (``make()``), made on first use and kept while the
        gallery is loaded: its features do not change, so nothing per image is computed twice."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def check_model(self, info: ModelInfo) -> None:
        """Refuse a model of another family (other weights); warn when the same weights run at
        another precision than the gallery was built with (its features drift a little)."""
        m = self.manifest["model"]
        built = m.get("precision", "fp32")
        if m["fingerprint"] == info.fingerprint and built != info.precision:
            import warnings

            warnings.warn(
                f"gallery was built with the {built} model, this model is {info.precision}: scores "
                f"shift slightly; build the gallery with the model that scores",
                stacklevel=3,
            )
        if m["fingerprint"] != info.fingerprint:
            raise MismatchError(
                f"gallery {self.path or ''} was built with model '{m.get('backbone')}' "
                f"(fingerprint {m['fingerprint'][:19]}), but the model given is '{info.backbone}' "
                f"(fingerprint {info.fingerprint[:19]}); rebuild the gallery with this model"
            )
        gallery_check.check_against_model(self, info)  # levels, grids, channels: what this model produces

    def nbytes(self) -> dict[str, int]:
        """Stored bytes by part: pixel levels (with their index and codec), global features, thumbnails."""
        lv = sum(a.nbytes for k, a in self._arrays().items() if not k.startswith(("global", "thumbnails")))
        return {
            "levels": lv,
            "global": self.global_features.nbytes,
            "thumbnails": 0 if self.thumbnails is None else self.thumbnails.nbytes,
        }

    # -- file I/O -----------------------------------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {"global": self.global_features}
        for k, st in self.levels.items():
            arrays[f"level/{k}"] = st.data
            for part in ("proj", "center", "scale"):
                if getattr(st.codec, part) is not None:
                    arrays[f"{part}/{k}"] = getattr(st.codec, part)
            if st.offsets is not None:
                assert st.yx is not None  # a coreset level keeps both
                arrays[f"offsets/{k}"] = st.offsets
                arrays[f"yx/{k}"] = st.yx
        if self.thumbnails is not None:
            arrays["thumbnails"] = self.thumbnails
        return arrays

    def save(self, path: str | os.PathLike, arrays: dict | None = None) -> Path:
        """Write atomically to ``path`` (``arrays``: chunked replacements, see :func:`write_gallery`)."""
        manifest = dict(self.manifest, levels={k: {"grid": list(st.grid)} for k, st in self.levels.items()})
        for key in ("format", "names", "arrays"):
            manifest.pop(key, None)
        return write_gallery(path, self.names, arrays or self._arrays(), manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Gallery:
        """Memory-map a gallery file; with ``verify`` every checksum is checked first."""
        path = Path(path)
        manifest, arrays = read_gallery(path, verify=verify)
        levels = {}
        for k, spec in manifest["levels"].items():
            codec = LevelCodec(**{part: arrays.get(f"{part}/{k}") for part in ("proj", "center", "scale")})
            levels[k] = LevelStore(
                arrays[f"level/{k}"], tuple(spec["grid"]), codec, arrays.get(f"offsets/{k}"), arrays.get(f"yx/{k}")
            )
        return cls(manifest["names"], arrays["global"], levels, manifest, arrays.get("thumbnails"), path)


def write_gallery(
    path: str | os.PathLike, names: list[str], arrays: Mapping[str, np.ndarray | list[np.ndarray]], manifest: dict
) -> Path:
    """Write a gallery atomically. An array may be given as a list of chunks stacked along axis 0
    (e.g. memory-mapped slices of an old gallery plus new rows): it is streamed, never assembled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = {k: [np.ascontiguousarray(c) for c in (v if isinstance(v, list) else [v])] for k, v in arrays.items()}
    table, offset = {}, 0
    for key, parts in chunks.items():
        first = parts[0]
        if any(c.dtype != first.dtype or c.shape[1:] != first.shape[1:] for c in parts):
            raise ValueError(f"chunks of array '{key}' differ in dtype or trailing shape")
        h = hashlib.sha256()
        for c in parts:
            h.update(memoryview(c).cast("B"))  # type: ignore[arg-type]  # numpy declares __buffer__ for 3.12+ only
        nbytes = sum(c.nbytes for c in parts)
        shape = [sum(len(c) for c in parts), *first.shape[1:]] if first.ndim else []
        table[key] = {
            "dtype": first.dtype.str,
            "shape": shape,
            "offset": offset,
            "nbytes": nbytes,
            "sha256": h.hexdigest(),
        }
        offset += nbytes + _pad(nbytes)
    header = dict(manifest, format=FORMAT_VERSION, names=list(names), arrays=table)
    blob = json.dumps(header, indent=1, sort_keys=True).encode()
    blob += b" " * _pad(_PREFIX.size + len(blob))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, len(blob), hashlib.sha256(blob).digest()))
            f.write(blob)
            for key, parts in chunks.items():
                for c in parts:
                    f.write(memoryview(c).cast("B"))  # type: ignore[arg-type]  # as above
                f.write(b"\0" * _pad(table[key]["nbytes"]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_header(path: Path) -> tuple[dict, int]:
    """The manifest and the file offset where array data starts (checked: runtime/gallery_check.py)."""
    return gallery_check.read_header(path)


def read_gallery(path: Path, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    manifest, base = read_header(path)
    size = path.stat().st_size
    gallery_check.check_layout(path, manifest, base, size)  # the whole manifest, before anything is mapped
    arrays = {}
    for key, spec in manifest["arrays"].items():
        start = base + spec["offset"]
        if start + spec["nbytes"] > size:
            raise GalleryError(f"{path}: file is truncated (array '{key}' ends past the end of the file)")
        if verify:
            _check_sha(path, key, start, spec)
        shape = tuple(spec["shape"])
        if spec["nbytes"] == 0:
            arrays[key] = np.zeros(shape, np.dtype(spec["dtype"]))
        else:
            arrays[key] = np.memmap(path, dtype=np.dtype(spec["dtype"]), mode="r", offset=start, shape=shape)
    gallery_check.check_contents(path, manifest, base, verify)  # the index arrays, once their checksums are verified
    return manifest, arrays


def _check_sha(path: Path, key: str, start: int, spec: dict) -> None:
    # plain reads, not the memory map: checking must not leave the whole file resident
    h, left = hashlib.sha256(), spec["nbytes"]
    with open(path, "rb") as f:
        f.seek(start)
        while left:
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    if h.hexdigest() != spec["sha256"]:
        raise GalleryError(f"{path}: array '{key}' is corrupt (SHA-256 mismatch); rebuild or restore the gallery")
