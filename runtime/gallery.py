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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import GalleryError, MismatchError
from .modelinfo import ModelInfo

MAGIC = b"SPADEGAL"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sQ32s")


def _pad(n: int) -> int:
    return (-n) % ALIGN


@dataclass
class Gallery:
    """Features of normal images, as stored; arrays may be read-only memory maps.

    ``levels`` maps level name to (N, h, w, C); ``global_features`` is (N, C_global).
    ``manifest`` holds everything else (model, pre-processing, thresholds, build settings).
    """

    names: list[str]
    global_features: np.ndarray
    levels: dict[str, np.ndarray]
    manifest: dict
    thumbnails: np.ndarray | None = None
    path: Path | None = None
    _global_sqnorm: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def thresholds(self) -> dict:
        return self.manifest.get("thresholds", {})

    @property
    def global_sqnorm(self) -> np.ndarray:
        """Squared norms of the global features, computed once per loaded gallery."""
        if self._global_sqnorm is None:
            g = np.asarray(self.global_features, np.float32)
            self._global_sqnorm = np.einsum("ij,ij->i", g, g)
        return self._global_sqnorm

    def check_model(self, info: ModelInfo) -> None:
        """Refuse a model this gallery was not built with."""
        m = self.manifest["model"]
        if m["fingerprint"] != info.fingerprint:
            raise MismatchError(
                f"gallery {self.path or ''} was built with model '{m['backbone']}' "
                f"(fingerprint {m['fingerprint'][:19]}), but the model given is '{info.backbone}' "
                f"(fingerprint {info.fingerprint[:19]}); rebuild the gallery with this model"
            )

    # -- file I/O -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically to ``path``."""
        arrays: dict[str, np.ndarray] = {"global": self.global_features}
        arrays.update({f"level/{k}": v for k, v in self.levels.items()})
        if self.thumbnails is not None:
            arrays["thumbnails"] = self.thumbnails
        return write_gallery(path, self.names, arrays, self.manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Gallery":
        """Memory-map a gallery file; with ``verify`` every checksum is checked first."""
        path = Path(path)
        manifest, arrays = read_gallery(path, verify=verify)
        levels = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("level/")}
        return cls(
            names=manifest["names"],
            global_features=arrays["global"],
            levels=levels,
            manifest=manifest,
            thumbnails=arrays.get("thumbnails"),
            path=path,
        )


def write_gallery(path: str | os.PathLike, names: list[str], arrays: dict[str, np.ndarray], manifest: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    table, offset = {}, 0
    for key, arr in arrays.items():
        table[key] = {
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "offset": offset,
            "nbytes": arr.nbytes,
            "sha256": hashlib.sha256(memoryview(arr).cast("B")).hexdigest(),
        }
        offset += arr.nbytes + _pad(arr.nbytes)
    header = dict(manifest, format=FORMAT_VERSION, names=list(names), arrays=table)
    blob = json.dumps(header, indent=1, sort_keys=True).encode()
    blob += b" " * _pad(_PREFIX.size + len(blob))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, len(blob), hashlib.sha256(blob).digest()))
            f.write(blob)
            for arr in arrays.values():
                f.write(memoryview(arr).cast("B"))
                f.write(b"\0" * _pad(arr.nbytes))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_header(path: Path) -> tuple[dict, int]:
    """The manifest and the file offset where array data starts."""
    if not path.is_file():
        raise GalleryError(f"{path}: no such gallery file")
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
            raise GalleryError(f"{path}: not a spade-edge gallery (bad magic bytes)")
        _, n, digest = _PREFIX.unpack(prefix)
        blob = f.read(n)
    if len(blob) != n or hashlib.sha256(blob).digest() != digest:
        raise GalleryError(f"{path}: gallery header is corrupt (checksum mismatch); rebuild the gallery")
    manifest = json.loads(blob)
    if manifest.get("format") != FORMAT_VERSION:
        raise GalleryError(f"{path}: gallery format {manifest.get('format')} is not supported (expected {FORMAT_VERSION})")
    return manifest, _PREFIX.size + n


def read_gallery(path: Path, verify: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    manifest, base = read_header(path)
    size = path.stat().st_size
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

