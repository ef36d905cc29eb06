"""Gallery storage benchmark: bytes per normal image, load time, resident memory, and accuracy of
every storage setting against fp32, on the ELPV protocol of :mod:`spade_edge.bench.accuracy`
(image level: normal test half vs probability-1.0 cells; pixel level: synthetic defects)."""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from ..metrics import aupro, pixel_roc_auc, roc_auc
from ..runtime.build import as_backend_output, extract, gallery_from_features
from ..runtime.codec import Storage
from ..runtime.detector import Detector
from ..runtime.features import FeatureBackend
from ..runtime.gallery import Gallery, write_gallery
from ..runtime.images import Geometry, Preprocess
from ..runtime.progress import progress
from ..runtime.spade import SpadeConfig
from ..service.metrics import resident_memory_bytes as rss
from .accuracy import _cells, split, synthetic_set

SETTINGS = {  # each spelled out from the exact form; the last is the default (Storage(), runtime/codec.py)
    "fp32": Storage.exact(),
    "fp16": Storage.exact(precision="fp16"),
    "int8": Storage.exact(precision="int8"),
    "int8 + pca 1/2": Storage.exact(precision="int8", projection="pca", keep=0.5),
    "int8 + pca 1/4": Storage.exact(precision="int8", projection="pca", keep=0.25),
    "int8 + random 1/4": Storage.exact(precision="int8", projection="random", keep=0.25),
    "fp16 + coreset 1/8": Storage.exact(precision="fp16", coreset=0.125),
    "int8 + coreset 1/4": Storage.exact(precision="int8", coreset=0.25),
    "int8 + coreset 1/5": Storage.exact(precision="int8", coreset=0.2),
}


def big_gallery_load(size: int = 1 << 30) -> dict:
    """Resident memory and time to load (checksums verified) a gallery of ``size`` bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        n, grid, c = size // (32 * 32 * 1024), (32, 32), 1024
        arr = np.lib.format.open_memmap(Path(tmp) / "a.npy", mode="w+", dtype=np.int8, shape=(n, *grid, c))
        arr[:, 0, 0, 0] = 1
        path = write_gallery(
            Path(tmp) / "big.gallery",
            [str(i) for i in range(n)],
            {"global": np.zeros((n, 8), np.float32), "level/x": arr},
            {"model": {"fingerprint": "sha256:x"}, "levels": {"x": {"grid": list(grid)}}},
        )
        del arr
        gc.collect()
        before = rss()
        t0 = time.perf_counter()
        g = Gallery.load(path)
        t = time.perf_counter() - t0
        grew = rss() - before
        return {"bytes": g.levels["x"].data.nbytes, "load_s": t, "rss_growth_bytes": grew}


@dataclass
class ProtocolData:
    """Features of one cell type's ELPV protocol sets, extracted once."""

    train_names: list[str]
    gallery: list[dict]
    tests: dict[str, list[dict]]  # normal, defective (p = 1.0), synthetic
    masks: np.ndarray  # (2 * n_pix, S, S): zeros for the clean cells, then the synthetic masks
    n_pix: int


def protocol_data(
    backend: FeatureBackend, kind: str, seed: int = 0, n_pixel: int = 100, limit: int | None = None, echo=print
) -> ProtocolData:
    info = backend.info
    pre = Preprocess(info.input_size)
    train, test_ok = split(kind, seed)
    bad = _cells(kind, 1.0, limit)
    if limit:
        test_ok = test_ok[: max(limit, 2 * n_pixel)]
    n_pix = min(n_pixel, len(test_ok) // 2)
    syn_imgs, syn_masks = synthetic_set(test_ok[n_pix : 2 * n_pix], seed, pre)
    echo(f"[{kind}] features: {len(train)} gallery, {len(test_ok)} normal, {len(bad)} defective, {n_pix} synthetic")
    return ProtocolData(
        [p.name for p in train],
        extract(backend, [str(p) for p in train], pre, desc=f"{kind} gallery")[0],
        {
            "normal": extract(backend, [str(p) for p in test_ok], pre, desc=f"{kind} normal")[0],
            "defective": extract(backend, [str(p) for p in bad], pre, desc=f"{kind} defective")[0],
            "synthetic": extract(backend, syn_imgs, pre, desc=f"{kind} synthetic")[0],
        },
        np.concatenate([np.zeros((n_pix, info.input_size, info.input_size), bool), syn_masks]),
        n_pix,
    )


def score_setting(
    backend: FeatureBackend, data: ProtocolData, storage: Storage, config: SpadeConfig, desc: str = ""
) -> dict:
    """Build the gallery with ``storage``, score every protocol set; sizes, load cost and accuracy."""
    info = backend.info
    pre = Preprocess(info.input_size)
    geom = Geometry(info.input_size, info.input_size, 0, 0, info.input_size, info.input_size)
    blank = np.zeros((info.input_size, info.input_size, 3), np.uint8)
    # the gallery bench compares storage through both raw scores; no held-out normal statistics here
    config = SpadeConfig.from_dict({**config.to_dict(), "score": "image"})
    if storage.coreset < 1 and config.mode == "concat":
        config = SpadeConfig.from_dict({**config.to_dict(), "mode": "per-level"})
    with tempfile.TemporaryDirectory() as tmp:
        g = gallery_from_features(data.gallery, data.train_names, info, storage)
        g.manifest.update({"config": config.to_dict(), "preprocess": pre.to_dict()})
        path = g.save(Path(tmp) / "g.gallery")
        gc.collect()
        before, t0 = rss(), time.perf_counter()
        g = Gallery.load(path)
        load_s, grew = time.perf_counter() - t0, rss() - before
        det = Detector(backend, g, config=config, preprocess=pre)
        scored = {}
        for part, feats in data.tests.items():
            out: list[tuple[float, float, np.ndarray | None]] = []  # (score, max pixel score, map if kept)
            for f in progress(feats, len(feats), f"{desc} {part}"):
                p = det.score(as_backend_output(f), blank, geom)
                keep_map = part == "synthetic" or len(out) < data.n_pix
                out.append((p.score, p.max_pixel_score, p.anomaly_map if keep_map else None))
            scored[part] = out
        nb = g.nbytes()
    ok, bd = scored["normal"], scored["defective"]
    labels = [0] * len(ok) + [1] * len(bd)
    # maps are kept for the first n_pix normal images and every synthetic one
    maps = np.stack(
        cast("list[np.ndarray]", [m for _, _, m in ok[: data.n_pix]] + [m for _, _, m in scored["synthetic"]])
    )
    return {
        "storage": storage.to_dict(),
        "mode": config.mode,
        "level_bytes_per_image": nb["levels"] / len(data.train_names),
        "global_bytes_per_image": nb["global"] / len(data.train_names),
        "load_s": load_s,
        "rss_growth_bytes": grew,
        "image_auroc": roc_auc(labels, [s for s, _, _ in ok + bd]),
        "max_pixel_auroc": roc_auc(labels, [m for _, m, _ in ok + bd]),
        "pixel_auroc": pixel_roc_auc(data.masks, maps),
        "aupro": aupro(data.masks, maps),
    }


def run(
    backend: FeatureBackend,
    config: SpadeConfig,
    settings: dict[str, Storage] = SETTINGS,
    cell_types=("mono", "poly"),
    seed: int = 0,
    n_pixel: int = 100,
    limit: int | None = None,
    echo=print,
) -> dict:
    results: dict = {}
    for kind in cell_types:
        data = protocol_data(backend, kind, seed, n_pixel, limit, echo)
        rows = {}
        for name, storage in settings.items():
            r = rows[name] = score_setting(backend, data, storage, config, f"{kind} {name}")
            echo(
                f"[{kind}] {name:>20}: {r['level_bytes_per_image'] / 1e3:8.1f} kB/image  max-pixel AUROC "
                f"{r['max_pixel_auroc']:.3f}  pixel AUROC {r['pixel_auroc']:.3f}  AUPRO {r['aupro']:.3f}"
            )
        results[kind] = rows
    return results


def markdown(results: dict, big: dict | None = None) -> str:
    lines = []
    for kind, rows in results.items():
        ref = rows["fp32"]
        lines += [
            f"### ELPV {kind}",
            "",
            "| storage | mode | kB / image | x smaller | load ms | RSS +MB | image AUROC (max pixel) | d | pixel AUROC | d | AUPRO | d |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in rows.items():
            lines.append(
                f"| {name} | {r['mode']} | {r['level_bytes_per_image'] / 1e3:.1f} | "
                f"{ref['level_bytes_per_image'] / r['level_bytes_per_image']:.1f} | {r['load_s'] * 1e3:.0f} | "
                f"{r['rss_growth_bytes'] / 2**20:.1f} | {r['max_pixel_auroc']:.3f} | {r['max_pixel_auroc'] - ref['max_pixel_auroc']:+.3f} | "
                f"{r['pixel_auroc']:.3f} | {r['pixel_auroc'] - ref['pixel_auroc']:+.3f} | {r['aupro']:.3f} | {r['aupro'] - ref['aupro']:+.3f} |"
            )
        lines.append("")
    if big:
        lines.append(
            f"Loading a {big['bytes'] / 2**30:.2f} GiB gallery (every checksum verified): "
            f"{big['load_s']:.2f} s, resident memory +{big['rss_growth_bytes'] / 2**20:.1f} MB."
        )
    return "\n".join(lines) + "\n"
