"""Gallery builder: features of normal images through the runtime (no torch), compressed as the
:class:`Storage` settings say, thresholds from a held-out share of the images, written atomically.
Galleries grow and shrink on the device (:func:`add_images`, :func:`remove_images`) without a
rebuild: new images are encoded with the codecs fitted at build time."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import math
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .codec import LevelCodec, Storage, fit_codec, kcenter
from .detector import Detector
from .errors import GalleryError, ImageError
from .features import FeatureBackend
from .gallery import Gallery, LevelStore
from .images import Preprocess, load_image
from .progress import progress
from .spade import SpadeConfig, final_score, top_pixels

PIXEL_QUANTILE = 0.999


def tool_name() -> str:
    """What a gallery records as its maker: the installed distribution and its version (read from
    its metadata: the runtime does not import the package above it)."""
    try:
        return f"spade-edge {importlib.metadata.version('spade-edge')}"
    except importlib.metadata.PackageNotFoundError:
        return "spade-edge (not installed)"


def extract(
    backend: FeatureBackend,
    images: Sequence,
    preprocess: Preprocess,
    batch_size: int = 8,
    show: bool = True,
    desc: str = "features",
):
    """Features of ``images`` (paths or arrays): returns (list of per-image feature dicts with
    levels as (h, w, C) and the global vector, list of model inputs, list of geometries)."""
    info = backend.info
    feats, inputs, geoms = [], [], []
    batches = range(0, len(images), batch_size)
    for s in progress(batches, len(batches), desc, show, unit="batch"):
        chunk = images[s : s + batch_size]
        prepared = [preprocess(load_image(im)) for im in chunk]
        x = np.stack([p[0] for p in prepared])
        out = backend(x)
        for i, (xi, geom) in enumerate(prepared):
            f = {lv.name: np.ascontiguousarray(out[lv.name][i].transpose(1, 2, 0)) for lv in info.levels}
            f[info.global_name] = out[info.global_name][i].reshape(-1)
            feats.append(f)
            inputs.append(xi)
            geoms.append(geom)
    return feats, inputs, geoms


def as_backend_output(features: dict) -> dict:
    """One image's features as :func:`extract` keeps them (levels (h, w, C)) back in the backend's
    layout (levels (C, h, w)), which :meth:`Detector.score` takes."""
    return {k: (v.transpose(2, 0, 1) if v.ndim == 3 else v) for k, v in features.items()}


def _thumbnails(inputs, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BILINEAR)) for x in inputs])


def encode_level(maps: Sequence[np.ndarray], codec: LevelCodec, storage: Storage):
    """Encode (h, w, C) maps of one level: (data, offsets or None, yx or None)."""
    h, w = maps[0].shape[:2]
    projected = [codec.project(m) for m in maps]
    if storage.coreset >= 1.0:
        return np.stack([codec.encode(p, storage.precision) for p in projected]), None, None
    keep = max(1, math.ceil(storage.coreset * h * w))
    rows, yx, counts = [], [], []
    for p in projected:
        flat = p.reshape(h * w, -1)
        idx = np.sort(kcenter(flat, keep))
        rows.append(codec.encode(flat[idx], storage.precision))
        # grid cells fit a byte on every backbone here (56 x 56); wider grids take two
        yx.append(np.stack([idx // w, idx % w], 1).astype(np.uint8 if max(h, w) <= 256 else np.uint16))
        counts.append(len(idx))
    return np.concatenate(rows), np.r_[0, np.cumsum(counts)].astype(np.int64), np.concatenate(yx)


def gallery_from_features(
    feats: Sequence[dict],
    names: Sequence[str],
    info,
    storage: Storage | None = None,
    codecs: dict[str, LevelCodec] | None = None,
) -> Gallery:
    """An in-memory gallery from extracted features (as :func:`extract` returns them): codecs are
    fitted on these features unless given, then every image is encoded (``storage``: ``Storage()``,
    the default, unless given)."""
    storage = storage or Storage()
    codecs = dict(codecs or {})
    levels = {}
    for lv in info.levels:
        maps = [f[lv.name] for f in feats]
        if lv.name not in codecs:
            codecs[lv.name] = fit_codec(np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps]), storage)
        data, offsets, yx = encode_level(maps, codecs[lv.name], storage)
        levels[lv.name] = LevelStore(data, maps[0].shape[:2], codecs[lv.name], offsets, yx)
    glob = np.stack([f[info.global_name] for f in feats]).astype(np.float32)
    manifest = {
        "model": {"backbone": info.backbone, "fingerprint": info.fingerprint, "precision": info.precision},
        "storage": storage.to_dict(),
    }
    return Gallery(list(names), glob, levels, manifest)


def gallery_from_images(
    backend: FeatureBackend,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    holdout: float = 0.2,
    seed: int = 0,
    preprocess: Preprocess | None = None,
    config: SpadeConfig | None = None,
    storage: Storage | None = None,
    batch_size: int = 8,
    thumbnails: bool = True,
    show_progress: bool = True,
    codecs: dict[str, LevelCodec] | None = None,
) -> Gallery:
    """Build a gallery from normal images and write it to ``out``.

    A seeded ``holdout`` share of the images is kept out of the gallery and scored against it
    (through the compressed gallery, as the runtime will score); the image threshold is the highest
    held-out score (no false alarm on held-out normal parts), the pixel threshold the 99.9th
    percentile of held-out pixel scores. ``codecs`` reuses fitted codecs instead of fitting them.
    ``storage``: :meth:`Storage.default` for the config's mode unless given (as ``gallery build``).
    """
    paths = [Path(p) for p in images]
    if len(paths) < 2:
        raise ImageError(f"a gallery needs at least 2 normal images, got {len(paths)}")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    info = backend.info
    preprocess = preprocess or Preprocess(info.input_size)
    config = config or SpadeConfig()
    storage = storage or Storage.default(config.mode)  # runtime/codec.py: the one home of the defaults
    config.level_names(info)
    if storage.coreset < 1.0 and config.mode == "concat":
        raise ValueError(
            "a coreset keeps a subset of each image's pixels, which the concatenated pyramid cannot "
            "use: pass mode='per-level' (--mode per-level) with --coreset"
        )
    order = np.random.default_rng(seed).permutation(len(paths))
    n_hold = int(round(holdout * len(paths)))
    n_hold = min(max(n_hold, 1 if holdout > 0 else 0), len(paths) - 1)
    hold_idx, train_idx = sorted(order[:n_hold]), sorted(order[n_hold:])

    # decode everything first: a bad file stops the build before anything is written
    feats, inputs, _ = extract(
        backend, [str(paths[i]) for i in train_idx], preprocess, batch_size, show_progress, "gallery"
    )
    names = [paths[i].name for i in train_idx]
    if len(set(names)) != len(names):
        names = [str(paths[i]) for i in train_idx]
    gallery = gallery_from_features(feats, names, info, storage, codecs)
    manifest = {
        "model": {
            "backbone": info.backbone,
            "fingerprint": info.fingerprint,
            "precision": info.precision,
            "input_size": info.input_size,
            "levels": [lv.__dict__ for lv in info.levels],
            "global": info.global_name,
        },
        "preprocess": preprocess.to_dict(),
        "config": config.to_dict(),
        "storage": storage.to_dict(),
        "build": {
            "tool": tool_name(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "images": len(paths),
            "holdout": holdout,
            "seed": seed,
            "source": str(paths[0].parent.resolve()),
        },
        "thresholds": {},
    }
    gallery.manifest = manifest
    gallery.thumbnails = _thumbnails(inputs, max(32, info.input_size // 2)) if thumbnails else None
    del feats

    if n_hold:
        # held-out normal images, scored as the runtime will score (through the stored form)
        det = Detector(
            backend,
            gallery,
            config=SpadeConfig.from_dict({**config.to_dict(), "score": "image"}),
            preprocess=preprocess,
        )
        hfeats, hinputs, hgeoms = extract(
            backend, [str(paths[i]) for i in hold_idx], preprocess, batch_size, show_progress, "thresholds"
        )
        image_scores, maps = [], []
        for f, x, geom in zip(hfeats, hinputs, hgeoms):
            p = det.score(as_backend_output(f), x, geom)
            image_scores.append(p.image_score)
            maps.append(p.anomaly_map)
        manifest["normal"] = {
            "image": float(np.median(image_scores)),
            "top_pixels": float(np.median([top_pixels(m) for m in maps])),
        }
        scores = [final_score(config.score, i, m, manifest["normal"]) for i, m in zip(image_scores, maps)]
        pixels = [m.ravel() for m in maps]
        manifest["thresholds"] = {
            "image": float(max(scores)),
            "pixel": float(np.quantile(np.concatenate(pixels), PIXEL_QUANTILE)),
            "rule": f"image: max held-out normal {config.score} score; pixel: {PIXEL_QUANTILE:.1%} quantile of held-out normal pixels",
            "heldout": [paths[i].name for i in hold_idx],
            "heldout_scores": [float(s) for s in scores],
            "config": config.to_dict(),
        }
    with writing(out):  # not over an add or remove in progress
        gallery.save(out)
    return Gallery.load(out)


def _level_chunks(store: LevelStore, keep: np.ndarray) -> tuple[list, list | None, np.ndarray | None]:
    """Memory-mapped slices of the images ``keep`` (sorted indices): data chunks, yx chunks, offsets."""
    runs = np.split(keep, np.flatnonzero(np.diff(keep) != 1) + 1) if len(keep) else []
    if not store.coreset:
        return [store.data[r[0] : r[-1] + 1] for r in runs], None, None
    o = store.offsets
    assert o is not None and store.yx is not None  # a coreset level keeps both
    data = [store.data[o[r[0]] : o[r[-1] + 1]] for r in runs]
    yx = [store.yx[o[r[0]] : o[r[-1] + 1]] for r in runs]
    counts = o[keep + 1] - o[keep]
    return data, yx, np.r_[0, np.cumsum(counts)].astype(np.int64)


def _rewrite(
    gallery: Gallery, keep: np.ndarray, out: Path, new: dict | None = None, new_names=(), why: str = ""
) -> Gallery:
    """Write ``gallery`` restricted to images ``keep`` plus ``new`` encoded images, streaming the old arrays."""
    arrays: dict = {"global": [gallery.global_features[keep]]}
    for k, st in gallery.levels.items():
        data, yx, offsets = _level_chunks(st, keep)
        if new:
            data = data + [new[k][0]]
            if st.coreset:
                assert yx is not None and offsets is not None  # _level_chunks gives both for a coreset level
                yx = yx + [new[k][2]]
                offsets = np.r_[offsets, offsets[-1] + new[k][1][1:]]
        arrays[f"level/{k}"] = data
        for part in ("proj", "center", "scale"):
            if getattr(st.codec, part) is not None:
                arrays[f"{part}/{k}"] = getattr(st.codec, part)
        if st.coreset:
            arrays[f"offsets/{k}"] = offsets
            arrays[f"yx/{k}"] = yx
    if new:
        arrays["global"].append(new["global"])
    if gallery.thumbnails is not None:
        arrays["thumbnails"] = [gallery.thumbnails[keep]] + ([new["thumbnails"]] if new else [])
    names = [gallery.names[i] for i in keep] + list(new_names)
    manifest = dict(gallery.manifest)
    manifest["history"] = list(manifest.get("history", [])) + [why]
    result = Gallery(names, gallery.global_features, gallery.levels, manifest, gallery.thumbnails)
    result.save(out, arrays)
    return Gallery.load(out)


LOCK_TIMEOUT_S = 600.0  # how long a writer waits for another to finish before giving up


def lock_path(path: str | os.PathLike) -> Path:
    """The sidecar a gallery's writers lock: ``.NAME.lock`` beside it (kept: removing a lock file
    races with the next writer opening it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def gallery_lock(path: str | os.PathLike, timeout: float | None = LOCK_TIMEOUT_S):
    """Hold the exclusive lock of the gallery at ``path`` (``fcntl.flock`` on :func:`lock_path`):
    one read-modify-write at a time, across processes and threads alike. The kernel releases it when
    its holder exits, killed or not. Readers take none: a gallery is replaced by an atomic rename.
    :class:`GalleryError` after ``timeout`` seconds of waiting (None: wait as long as it takes)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as writing the gallery there would
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise GalleryError(
            f"{path}: cannot lock the gallery for writing ({lock_path(path)}: {exc.strerror}); "
            "its folder must be writable"
        ) from exc
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise GalleryError(
                        f"{path}: another process is changing this gallery (it holds "
                        f"{lock_path(path).name}) for over {timeout:g} s; try again when it is done"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _our_parts(path: Path) -> list[Path]:
    """Temporary files a writer of the gallery at ``path`` leaves when killed before its rename
    (``write_gallery``: ``.NAME.XXXXXXXX.part``): this gallery's only, regular files of this user."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.part\Z")
    found = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        if pattern.match(entry.name):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                found.append(Path(entry.path))
    return sorted(found)


def _unlink_parts(path: Path) -> list[Path]:
    removed = []
    for part in _our_parts(path):
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
            removed.append(part)
    return removed


def remove_stale_parts(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of the gallery at ``path`` left behind (see :func:`_our_parts`),
    only when no writer holds its lock (taken without waiting); returns the files removed."""
    path = Path(path)
    try:
        with gallery_lock(path, timeout=0):
            return _unlink_parts(path)
    except GalleryError:
        return []  # a writer is at work: its file is not stale


@contextlib.contextmanager
def writing(*paths: str | os.PathLike | None):
    """Lock the galleries ``paths`` (None skipped; in one order, so that two writers never wait on
    each other) and remove their stale temporary files: the frame of every read-modify-write."""
    unique = sorted({os.path.abspath(p): Path(p) for p in paths if p is not None}.items())
    with contextlib.ExitStack() as stack:
        for _, p in unique:
            stack.enter_context(gallery_lock(p))
            _unlink_parts(p)
        yield


def add_images(
    gallery_path: str | os.PathLike,
    backend: FeatureBackend,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    locked: bool = False,
) -> Gallery:
    """Add normal images to a gallery (encoded with its stored codecs; thresholds kept as they are).
    ``locked``: the caller already holds the gallery's lock (:func:`writing`; a recorded change,
    spade_edge/service/generations.py), which a second flock in this process would wait on forever."""
    with contextlib.nullcontext() if locked else writing(gallery_path, out):  # one writer at a time: none lost
        gallery = Gallery.load(gallery_path)
        gallery.check_model(backend.info)
        paths = [Path(p) for p in images]
        names = [p.name for p in paths]
        dup = sorted(set(names) & set(gallery.names)) or sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise GalleryError(
                f"already in the gallery or given twice: {', '.join(dup[:5])}; rename or remove them first"
            )
        storage = (
            Storage(**gallery.storage) if "projection" in gallery.storage else Storage.exact()
        )  # stored before settings were
        stored = gallery.manifest.get("preprocess")  # as the detector reads it: absent in the oldest galleries
        pre = Preprocess(**stored) if stored else Preprocess(backend.info.input_size)
        feats, inputs, _ = extract(backend, [str(p) for p in paths], pre, batch_size, show_progress, "add")
        new: dict = {"global": np.stack([f[backend.info.global_name] for f in feats]).astype(np.float32)}
        for k, st in gallery.levels.items():
            new[k] = encode_level([f[k] for f in feats], st.codec, storage)
        if gallery.thumbnails is not None:
            new["thumbnails"] = _thumbnails(inputs, gallery.thumbnails.shape[1])
        keep = np.arange(len(gallery))
        return _rewrite(gallery, keep, Path(out or gallery_path), new, names, f"added {len(paths)} images")


def remove_images(
    gallery_path: str | os.PathLike,
    names: Sequence[str],
    out: str | os.PathLike | None = None,
    locked: bool = False,
) -> Gallery:
    """Remove images by name (all named images must be present; at least one must stay).
    ``locked``: as for :func:`add_images`."""
    with contextlib.nullcontext() if locked else writing(gallery_path, out):
        gallery = Gallery.load(gallery_path)
        missing = sorted(set(names) - set(gallery.names))
        if missing:
            raise GalleryError(f"not in the gallery: {', '.join(missing[:5])}")
        drop = set(names)
        keep = np.array([i for i, n in enumerate(gallery.names) if n not in drop], np.int64)
        if len(keep) == 0:
            raise GalleryError("removing every image would leave an empty gallery")
        return _rewrite(gallery, keep, Path(out or gallery_path), why=f"removed {len(drop)} images")
