"""Whole-file validation of a gallery: a file is used only when its header, manifest and arrays are
what ``write_gallery`` writes, checksums or not (docs/gallery-format.md, "Validation").

Checksums find damage; they do not make a file well-formed: whoever can write a gallery can also
recompute its checksums. So before anything is memory-mapped (:func:`check_layout`):

- the header length fits the file, the header is UTF-8 JSON holding an object;
- every array is a known kind (``global``, ``level/<L>``, ``offsets/<L>``, ``yx/<L>``,
  ``scale/<L>``, ``proj/<L>``, ``center/<L>``, ``thumbnails``) with a dtype from that kind's
  allow-list (numeric, little-endian: never an object dtype, whose "values" would be pointers read
  from disk), a shape of the kind's rank, ``nbytes`` equal to its shape's, an aligned offset, and
  bytes inside the file that no other array uses;
- counts and shapes agree: one name per image (unique), every image in every array, each level's
  grid and channels, the codec's widths, the model's levels and grids when the gallery records them;
- settings are in range: ``config`` (k_image, k_gallery, kappa, mode, levels, sigma, score),
  ``thresholds`` and ``normal`` finite, ``preprocess`` and ``storage`` as their classes accept them;

and once the arrays are mapped and their checksums verified (:func:`check_contents`), the index
arrays, which decide what is read where: coreset offsets rising from 0 to the row count with at
least one row per image, grid cells inside the grid, int8 scales positive, kappa within the
candidates any query has; and every stored float finite and within +-1e6 (a NaN feature, or one
whose squared distances overflow, makes a NaN score, which no threshold flags). Plain reads in blocks: checking leaves nothing resident. Against a model (:func:`check_against_model`): the levels, grids, channels,
global width and input size the model produces.

Every refusal is a :class:`GalleryError` (:class:`MismatchError` against a model) naming the file
and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import TypeGuard

import numpy as np

from .errors import GalleryError, MismatchError

# dtypes a gallery stores, by array kind (little-endian: the format's byte order on every machine)
DTYPES = {
    "global": ("<f4",),
    "level": ("<f4", "<f2", "|i1"),
    "offsets": ("<i8",),
    "yx": ("|u1", "<u2"),
    "scale": ("<f4",),
    "proj": ("<f4",),
    "center": ("<f4",),
    "thumbnails": ("|u1",),
}
PRECISION_DTYPE = {"fp32": "<f4", "fp16": "<f2", "int8": "|i1"}
MAX_HEADER = 1 << 30  # bytes of JSON; a million image names take some 30 MB
MAX_GRID = 4096
MAX_CHANNELS = 1 << 16
MAX_SIZE = 8192  # model input, pixels
MAX_K = 1_000_000  # k_image, k_gallery: clipped to the gallery's size when scoring
MAX_SIGMA = 1024.0
MAX_ABS = 1e6  # stored floats: features, projections, centres, scales (real ones are orders of magnitude smaller)
CONFIG_KEYS = ("k_image", "k_gallery", "kappa", "mode", "levels", "sigma", "score")
STORAGE_KEYS = ("precision", "projection", "keep", "coreset", "seed")
_SHA = re.compile(r"[0-9a-f]{64}\Z")


class _Bad:
    """Raises the error of one file: ``bad(field, problem)``."""

    def __init__(self, path: Path, error=GalleryError, advice: str = "rebuild the gallery or restore a copy"):
        self.path, self.error, self.advice = path, error, advice

    def __call__(self, field: str, problem: str):
        return self.error(f"{self.path}: gallery field '{field}' {problem}; {self.advice}")


def _is_int(v, lo: int = 0, hi: int | None = None) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(key: str) -> tuple[str, str | None]:
    kind, _, level = key.partition("/")
    return kind, (level if kind not in ("global", "thumbnails") else None)


# -- the header ---------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict, int]:
    """The manifest and the file offset where array data starts: magic, a header length that fits
    the file, the header's checksum, UTF-8 JSON holding an object, the format version."""
    from .gallery import _PREFIX, FORMAT_VERSION, MAGIC

    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"{path}: no such gallery file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
            raise GalleryError(f"{path}: not a spade-edge gallery (bad magic bytes)")
        _, n, digest = _PREFIX.unpack(prefix)
        if n > min(size - _PREFIX.size, MAX_HEADER):
            raise GalleryError(
                f"{path}: gallery header length {n} does not fit the file ({size} bytes): the file is "
                "truncated or corrupt; rebuild the gallery"
            )
        blob = f.read(n)
    if len(blob) != n or hashlib.sha256(blob).digest() != digest:
        raise GalleryError(f"{path}: gallery header is corrupt (checksum mismatch); rebuild the gallery")
    try:
        manifest = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise GalleryError(f"{path}: gallery header is not UTF-8 JSON ({str(exc)[:80]}); rebuild the gallery") from exc
    if not isinstance(manifest, dict):
        raise GalleryError(f"{path}: gallery header is not a JSON object; rebuild the gallery")
    if manifest.get("format") != FORMAT_VERSION:
        raise GalleryError(
            f"{path}: gallery format {manifest.get('format')!r} is not supported (expected {FORMAT_VERSION})"
        )
    return manifest, _PREFIX.size + n


# -- before mapping: the manifest and the arrays table ---------------------------------------------


def check_layout(path: Path, manifest: dict, base: int, size: int) -> None:
    """Refuse a manifest that is not one ``write_gallery`` writes (see the module docstring), before
    any array is mapped. ``base``: where array data starts; ``size``: the file's size."""
    from .gallery import ALIGN

    bad = _Bad(Path(path))
    names = manifest.get("names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("names", "must be a list of strings")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise bad("names", f"holds {name[:80]!r} twice")
        seen.add(name)
    n = len(names)
    if n < 1:
        raise bad("names", "is empty: a gallery holds at least one image")
    levels = manifest.get("levels")
    if not isinstance(levels, dict) or not levels:
        raise bad("levels", "must be a non-empty object of level name -> {grid}")
    grids = {}
    for name, spec in levels.items():
        grid = spec.get("grid") if isinstance(spec, dict) else None
        if not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(g, 1, MAX_GRID) for g in grid)):
            raise bad(f"levels.{name}.grid", f"must be [rows, cols], each in [1, {MAX_GRID}], got {grid!r}")
        if not name or "/" in name:
            raise bad("levels", f"has a level named {name!r}")
        grids[name] = tuple(grid)
    table = manifest.get("arrays")
    if not isinstance(table, dict):
        raise bad("arrays", "must be an object of array name -> {dtype, shape, offset, nbytes, sha256}")
    spans = []
    for key, spec in table.items():
        kind, level = _kind(key)
        where = f"arrays.{key}"
        if kind not in DTYPES or (level is not None and level not in grids) or (level is None and "/" in key):
            raise bad(
                where,
                f"is not an array a gallery holds (known: global, thumbnails, and level, offsets, yx, "
                f"scale, proj, center per level {sorted(grids)})",
            )
        if not isinstance(spec, dict):
            raise bad(where, "must be an object")
        if spec.get("dtype") not in DTYPES[kind]:
            raise bad(
                f"{where}.dtype",
                f"is {spec.get('dtype')!r}; a gallery stores '{key}' as {' or '.join(DTYPES[kind])} only",
            )
        shape = spec.get("shape")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_is_int(d) for d in shape)):
            raise bad(f"{where}.shape", f"must be a list of 1 to 4 integers >= 0, got {shape!r}")
        nbytes = math.prod(shape) * np.dtype(spec["dtype"]).itemsize
        if spec.get("nbytes") != nbytes or not _is_int(spec.get("nbytes")):
            raise bad(
                f"{where}.nbytes", f"is {spec.get('nbytes')!r}, but shape {shape} of {spec['dtype']} takes {nbytes}"
            )
        offset = spec.get("offset")
        if not _is_int(offset) or offset % ALIGN:
            raise bad(f"{where}.offset", f"must be an integer >= 0, a multiple of {ALIGN}, got {offset!r}")
        if base + offset + nbytes > size:
            raise GalleryError(
                f"{path}: file is truncated (array '{key}' ends past the end of the file); "
                "rebuild or restore the gallery"
            )
        if not (isinstance(spec.get("sha256"), str) and _SHA.match(spec["sha256"])):
            raise bad(f"{where}.sha256", "must be 64 lowercase hex digits")
        spans.append((offset, offset + nbytes, key))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"arrays.{b}", f"overlaps array '{a}' in the file")
    _check_shapes(bad, table, grids, n)
    _check_settings(bad, manifest, table, grids)


def _shape(table: dict, key: str) -> tuple | None:
    return tuple(table[key]["shape"]) if key in table else None


def _check_shapes(bad, table: dict, grids: dict, n: int) -> None:
    g = _shape(table, "global")
    if g is None or len(g) != 2 or not 1 <= g[1] <= MAX_CHANNELS:
        raise bad("arrays.global", f"must be (images, channels), got {g}")
    if g[0] != n:
        raise bad("names", f"lists {n} images, but the arrays hold {g[0]} (array 'global')")
    t = _shape(table, "thumbnails")
    if t is not None and (len(t) != 4 or t[0] != n or t[1] != t[2] or not 1 <= t[1] <= MAX_GRID or t[3] != 3):
        raise bad("arrays.thumbnails", f"must be ({n}, side, side, 3), got {t}")
    for name, (h, w) in grids.items():
        data, offsets, yx = (_shape(table, f"{k}/{name}") for k in ("level", "offsets", "yx"))
        if data is None:
            raise bad(f"arrays.level/{name}", "is missing: every level in 'levels' has its array")
        if offsets is None:  # dense: every pixel of every image
            if yx is not None:
                raise bad(f"arrays.yx/{name}", "belongs to a coreset level, which has offsets too")
            if len(data) != 4 or data[:3] != (n, h, w):
                raise bad(f"arrays.level/{name}", f"must be ({n}, {h}, {w}, channels) for its grid, got {data}")
        else:  # coreset: kept rows, image after image
            if len(offsets) != 1 or offsets[0] != n + 1:
                raise bad(f"arrays.offsets/{name}", f"must be ({n + 1},): one more than the images, got {offsets}")
            if len(data) != 2 or data[0] < n:
                raise bad(f"arrays.level/{name}", f"must be (rows, channels) with a row per image at least, got {data}")
            if yx is None or yx != (data[0], 2):
                raise bad(f"arrays.yx/{name}", f"must be ({data[0]}, 2): the grid cell of every kept row, got {yx}")
        c = data[-1]
        if not 1 <= c <= MAX_CHANNELS:
            raise bad(f"arrays.level/{name}", f"has {c} channels")
        proj, center, scale = (_shape(table, f"{k}/{name}") for k in ("proj", "center", "scale"))
        if proj is not None and (len(proj) != 2 or proj[1] != c or not 1 <= proj[0] <= MAX_CHANNELS):
            raise bad(f"arrays.proj/{name}", f"must be (model channels, {c}), got {proj}")
        if center is not None and (proj is None or center != (proj[0],)):
            raise bad(
                f"arrays.center/{name}",
                f"must come with a projection and be ({proj[0] if proj else 'C'},), got {center}",
            )
        if scale is not None and scale != (c,):
            raise bad(f"arrays.scale/{name}", f"must be ({c},): one per stored channel, got {scale}")


def _check_settings(bad, manifest: dict, table: dict, grids: dict) -> None:
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise bad("model", "must be an object describing the model the gallery was built with")
    if not (isinstance(model.get("fingerprint"), str) and model["fingerprint"]):
        raise bad("model.fingerprint", "must be a non-empty string")
    for key in ("backbone", "precision", "global"):
        if key in model and not isinstance(model[key], str):
            raise bad(f"model.{key}", "must be a string")
    size = model.get("input_size")
    if size is not None and not _is_int(size, 1, MAX_SIZE):
        raise bad("model.input_size", f"must be an integer in [1, {MAX_SIZE}], got {size!r}")
    if model.get("levels") is not None:
        lv = model["levels"]
        if not (
            isinstance(lv, list)
            and all(
                isinstance(x, dict)
                and isinstance(x.get("name"), str)
                and _is_int(x.get("channels"), 1)
                and _is_int(x.get("stride"), 1)
                for x in lv
            )
        ):
            raise bad("model.levels", "must be a list of {name, channels, stride}")
        if sorted(x["name"] for x in lv) != sorted(grids):
            raise bad("levels", f"are {sorted(grids)}, but the model's are {sorted(x['name'] for x in lv)}")
        for x in lv:
            name = x["name"]
            if size is not None and grids[name] != (-(-size // x["stride"]),) * 2:
                raise bad(
                    f"levels.{name}.grid",
                    f"is {list(grids[name])}, but the model's input {size} at stride "
                    f"{x['stride']} gives {-(-size // x['stride'])}",
                )
            proj = _shape(table, f"proj/{name}")
            width = proj[0] if proj is not None else table[f"level/{name}"]["shape"][-1]
            if width != x["channels"]:
                raise bad(
                    f"arrays.level/{name}", f"holds {width}-channel features, the model's level has {x['channels']}"
                )

    for section in ("storage", "preprocess", "config", "thresholds", "normal", "build"):
        if section in manifest and not isinstance(manifest[section], dict):  # present, then an object (not null)
            raise bad(section, f"must be an object, got {type(manifest[section]).__name__}")
    storage = manifest.get("storage")
    if storage is not None:
        if not isinstance(storage, dict) or set(storage) - set(STORAGE_KEYS):
            raise bad("storage", f"must be an object with some of {', '.join(STORAGE_KEYS)}")
        from .codec import PRECISIONS, PROJECTIONS

        prec = storage.get("precision", "fp32")
        if prec not in PRECISIONS:
            raise bad("storage.precision", f"must be one of {PRECISIONS}, got {prec!r}")
        for name in grids:
            if table[f"level/{name}"]["dtype"] != PRECISION_DTYPE[prec]:
                raise bad(
                    "storage.precision", f"is {prec}, but level '{name}' is stored as {table[f'level/{name}']['dtype']}"
                )
        if storage.get("projection", "none") not in PROJECTIONS:
            raise bad("storage.projection", f"must be one of {PROJECTIONS}, got {storage.get('projection')!r}")
        for key in ("keep", "coreset"):
            v = storage.get(key, 1.0)
            if not (_is_num(v) and 0 < v <= 1):
                raise bad(f"storage.{key}", f"must be a share in (0, 1], got {v!r}")
        if "seed" in storage and not _is_int(storage["seed"]):
            raise bad("storage.seed", f"must be an integer >= 0, got {storage['seed']!r}")
        if storage.get("projection", "none") == "none" and storage.get("keep", 1.0) != 1.0:
            raise bad("storage.keep", "< 1 needs a projection")

    pre = manifest.get("preprocess")
    if pre is not None:
        if not isinstance(pre, dict) or set(pre) - {"size", "crop"}:
            raise bad("preprocess", "must be an object with size and crop")
        if not _is_int(pre.get("size"), 1, MAX_SIZE):  # required: Preprocess() would default to 224
            raise bad("preprocess.size", f"must be an integer in [1, {MAX_SIZE}], got {pre.get('size')!r}")
        if size is not None and pre.get("size", size) != size:
            raise bad("preprocess.size", f"is {pre['size']}, but the model's input is {size}")
        if "crop" in pre and not isinstance(pre["crop"], bool):
            raise bad("preprocess.crop", f"must be true or false, got {pre['crop']!r}")

    config = manifest.get("config")
    if config is not None:
        _check_config(bad, config, grids, table, (pre or {}).get("size", size))

    th = manifest.get("thresholds")
    if th is not None:
        if not isinstance(th, dict):
            raise bad("thresholds", "must be an object")
        for key in ("image", "pixel"):
            if key in th and not _is_num(th[key]):
                raise bad(f"thresholds.{key}", f"must be a finite number, got {th[key]!r}")
        if "heldout_scores" in th and not (
            isinstance(th["heldout_scores"], list) and all(_is_num(v) for v in th["heldout_scores"])
        ):
            raise bad("thresholds.heldout_scores", "must be a list of finite numbers")
        if "heldout" in th and not (isinstance(th["heldout"], list) and all(isinstance(v, str) for v in th["heldout"])):
            raise bad("thresholds.heldout", "must be a list of names")
        if "config" in th and not isinstance(th["config"], dict):
            raise bad("thresholds.config", "must be an object")
    normal = manifest.get("normal")
    if normal is not None:
        if not isinstance(normal, dict):
            raise bad("normal", "must be an object")
        for key in ("image", "top_pixels"):  # scores are divided by them
            if key not in normal or not (_is_num(normal[key]) and normal[key] > 0):
                raise bad(f"normal.{key}", f"must be a finite number > 0, got {normal.get(key)!r}")
    if "history" in manifest and not (
        isinstance(manifest["history"], list) and all(isinstance(v, str) for v in manifest["history"])
    ):
        raise bad("history", "must be a list of strings")


def _check_config(bad, config, grids: dict, table: dict, size) -> None:
    from .spade import MODES, SCORES, SpadeConfig

    if not isinstance(config, dict) or set(config) - set(CONFIG_KEYS):
        unknown = sorted(set(config) - set(CONFIG_KEYS)) if isinstance(config, dict) else config
        raise bad("config", f"must be an object with some of {', '.join(CONFIG_KEYS)} (unknown: {unknown})")
    for key in ("k_image", "k_gallery", "kappa"):
        if key in config and not _is_int(config[key], 1, MAX_K):
            raise bad(f"config.{key}", f"must be an integer in [1, {MAX_K}], got {config[key]!r}")
    mode = config.get("mode", SpadeConfig.mode)
    if mode not in MODES:
        raise bad("config.mode", f"must be one of {MODES}, got {mode!r}")
    if config.get("score", SpadeConfig.score) not in SCORES:
        raise bad("config.score", f"must be one of {SCORES}, got {config.get('score')!r}")
    lv = config.get("levels")
    if lv is not None:
        if not (
            isinstance(lv, list)
            and lv
            and all(isinstance(x, str) and x in grids for x in lv)
            and len(set(lv)) == len(lv)
        ):
            raise bad("config.levels", f"must be null or a list of distinct levels of {sorted(grids)}, got {lv!r}")
    sigma = config.get("sigma", SpadeConfig.sigma)
    top = min(MAX_SIGMA, size) if _is_int(size, 1) else MAX_SIGMA
    if not (_is_num(sigma) and 0 <= sigma <= top):
        raise bad("config.sigma", f"must be a number in [0, {top:g}] (pixels of the model input), got {sigma!r}")
    if mode == "concat":
        coreset = sorted(k for k in grids if f"offsets/{k}" in table and (lv is None or k in lv))
        if coreset:
            raise bad("config.mode", f"is concat, which compares every pixel, but level(s) {coreset} keep a coreset")


# -- after mapping: the index arrays ------------------------------------------------------------------


def _read(path: Path, base: int, spec: dict, start: int = 0, count: int | None = None) -> np.ndarray:
    """Rows ``start:start+count`` of an array with plain reads (nothing left mapped or resident)."""
    dtype = np.dtype(spec["dtype"])
    row = dtype.itemsize * math.prod(spec["shape"][1:])
    count = spec["shape"][0] - start if count is None else count
    with open(path, "rb") as f:
        f.seek(base + spec["offset"] + start * row)
        buf = f.read(count * row)
    return np.frombuffer(buf, dtype).reshape(count, *spec["shape"][1:])


def _blocks(path: Path, base: int, spec: dict, size: int = 1 << 18):
    """An array's values, flat, in blocks of ``size`` bytes (plain reads: small and short-lived)."""
    dtype = np.dtype(spec["dtype"])
    size -= size % dtype.itemsize
    with open(path, "rb") as f:
        f.seek(base + spec["offset"])
        for left in range(spec["nbytes"], 0, -size):
            yield np.frombuffer(f.read(min(size, left)), dtype)


def check_contents(path: Path, manifest: dict, base: int, values: bool = True) -> None:
    """Refuse index arrays that would read outside their data (see the module docstring); run after
    the checksums (a damaged file is reported as damaged). With ``values`` (a verified load, which
    reads every byte for the checksums anyway) also stored features that are not finite: NaN
    distances make NaN scores, which no threshold flags."""
    path = Path(path)
    bad = _Bad(path)
    floats = [k for k, spec in manifest["arrays"].items() if spec["dtype"] in ("<f4", "<f2")]
    for key in floats if values else [k for k in floats if _kind(k)[0] in ("scale", "proj", "center")]:
        for block in _blocks(path, base, manifest["arrays"][key]):
            if not np.isfinite(block).all():
                raise bad(f"arrays.{key}", "holds values that are not finite (NaN or infinity)")
            if block.size and float(np.abs(block).max()) > MAX_ABS:
                raise bad(
                    f"arrays.{key}",
                    f"holds values beyond +-{MAX_ABS:g}, which features and codecs never "
                    "reach (their squared distances would overflow to NaN)",
                )
    from .spade import SpadeConfig

    table, grids, n = manifest["arrays"], manifest["levels"], len(manifest["names"])
    config = {**SpadeConfig().to_dict(), **(manifest.get("config") or {})}  # what the detector will score with
    k = min(config["k_gallery"], n)
    candidates = {}
    for name, spec in grids.items():
        h, w = spec["grid"]
        if f"offsets/{name}" not in table:
            candidates[name] = k * h * w
            continue
        offsets = _read(path, base, table[f"offsets/{name}"]).astype(np.int64)
        rows = table[f"level/{name}"]["shape"][0]
        counts = np.diff(offsets)
        if offsets[0] != 0 or offsets[-1] != rows or (counts < 1).any():
            raise bad(
                f"arrays.offsets/{name}", f"must rise from 0 to {rows} (the rows stored) by at least one row per image"
            )
        if (counts > h * w).any():
            raise bad(f"arrays.offsets/{name}", f"gives an image more rows than its {h}x{w} grid has cells")
        candidates[name] = int(np.sort(counts)[:k].sum())
        spec_yx = table[f"yx/{name}"]
        step = 1 << 17  # rows per read: small, short-lived blocks
        for s in range(0, rows, step):
            yx = _read(path, base, spec_yx, s, min(step, rows - s))
            if len(yx) and (int(yx[:, 0].max()) >= h or int(yx[:, 1].max()) >= w):
                raise bad(f"arrays.yx/{name}", f"holds a cell outside the level's {h}x{w} grid")
        del offsets
    for name in grids:
        if f"scale/{name}" in table and not (_read(path, base, table[f"scale/{name}"]) > 0).all():
            raise bad(f"arrays.scale/{name}", "must hold scales > 0")
    kappa = config["kappa"]
    scored = config["levels"] or list(grids)
    if config["mode"] == "concat":
        finest = max(scored, key=lambda s: grids[s]["grid"][0] * grids[s]["grid"][1])
        fewest = k * grids[finest]["grid"][0] * grids[finest]["grid"][1]
    else:
        fewest = min(candidates[s] for s in scored)
    if kappa > fewest:
        raise bad(
            "config.kappa",
            f"is {kappa}, but a query can have as few as {fewest} gallery features to choose from (k_gallery {k})",
        )


# -- against the model --------------------------------------------------------------------------------


def check_against_model(gallery, info) -> None:
    """Refuse a gallery whose levels, grids, channels, global width or input size are not what the
    model ``info`` produces (same fingerprint or not: a crafted gallery can claim one)."""
    bad = _Bad(gallery.path or Path("gallery"), MismatchError, "rebuild the gallery with this model")
    model = {lv.name: lv for lv in info.levels}
    if sorted(gallery.levels) != sorted(model):
        raise bad("levels", f"are {sorted(gallery.levels)}, but model '{info.backbone}' has {sorted(model)}")
    for name, store in gallery.levels.items():
        lv = model[name]
        if tuple(store.grid) != info.grid(lv):
            raise bad(f"levels.{name}.grid", f"is {list(store.grid)}, but the model gives {list(info.grid(lv))}")
        width = store.codec.proj.shape[0] if store.codec.proj is not None else store.channels
        if width != lv.channels:
            raise bad(
                f"arrays.level/{name}", f"holds {width}-channel features, the model's level has {lv.channels} channels"
            )
    if gallery.global_features.shape[1] != info.global_channels:
        raise bad(
            "arrays.global",
            f"holds {gallery.global_features.shape[1]}-channel global features, the model's "
            f"have {info.global_channels}",
        )
    pre = gallery.manifest.get("preprocess") or {}
    if pre.get("size", info.input_size) != info.input_size:
        raise bad("preprocess.size", f"is {pre['size']}, but the model's input is {info.input_size}")
