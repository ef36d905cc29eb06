"""ELPV accuracy benchmark (image level) and synthetic-defect benchmark (pixel level).

Protocol (fixed; docs/results.md): for each cell type (mono, poly) the defect-probability-0 cells
are shuffled with a seed and halved; the first half is the gallery, the second half the normal
test images. Image level: those normal test cells against the probability-1.0 cells (and,
reported separately, 0.67 and 0.33). Pixel level: the first ``n_pixel`` normal test cells as they
are and the next ``n_pixel`` with one synthetic defect each (crack, inactive area, interrupted
fingers, bright scratch, in turn), masks kept; pixel AUROC and AUPRO at 224 x 224.

Every setting (K, kappa, pixel mode, level subset) is scored by the runtime, as a deployed detector
scores: the detector under that setting's :class:`SpadeConfig` (``Detector.with_config(config)
.score(...)``), on features extracted once per image and reused across settings. Nothing of SPADE
is implemented here; what the benchmark chooses is what the runtime runs.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from ..datasets import elpv_cells
from ..metrics import aupro, pixel_roc_auc, roc_auc
from ..runtime.build import as_backend_output, extract, gallery_from_features
from ..runtime.codec import Storage
from ..runtime.detector import Detector
from ..runtime.features import FeatureBackend
from ..runtime.gallery import Gallery
from ..runtime.images import Preprocess
from ..runtime.progress import progress
from ..runtime.spade import SpadeConfig, combined_score, final_score
from ..synthetic import KINDS, add_defect

GROUPS = {"1.0": 1.0, "0.67": 2 / 3, "0.33": 1 / 3}
N_LOO = 20  # gallery images scored leave-one-out: the normal statistics that combined scores divide by


@dataclass(frozen=True)
class Protocol:
    cell_types: tuple[str, ...] = ("mono", "poly")
    ks: tuple[int, ...] = (1, 5, 50)
    kappas: tuple[int, ...] = (1, 3)
    seed: int = 0
    n_pixel: int = 100
    sigma: float = 4.0
    limit: int | None = None  # cap on test images per group (quick runs only; not the protocol)
    # the settings swept (quick runs may narrow them; the protocol sweeps all): pixel modes, and the
    # level subsets of the per-level mode (None: every non-empty subset); defective groups scored
    modes: tuple[str, ...] = ("concat", "per-level")
    level_sets: tuple[tuple[str, ...], ...] | None = None
    groups: tuple[str, ...] = tuple(GROUPS)
    only: tuple[str, ...] | None = None  # setting names to keep (None: all of the above)


@dataclass
class Scores:
    """Per-image scores of every setting, keyed by setting name."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, v: float) -> None:
        self.values.setdefault(key, []).append(float(v))


def level_subsets(names):
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


def settings(proto: Protocol, level_names) -> dict[str, SpadeConfig]:
    """The protocol's settings by name ('concat K=5 kappa=1', 'per-level[a+b] K=50 kappa=3'), each as
    the :class:`SpadeConfig` the runtime scores it with: K images for the image stage and the pixel
    gallery alike, sigma, and the image stage's score (the map's are read off the prediction)."""
    names = list(level_names)
    out = {}
    for mode in proto.modes:
        subsets = (
            [tuple(names)]
            if mode == "concat"
            else [tuple(n for n in names if n in subset) for subset in (proto.level_sets or level_subsets(names))]
        )
        for subset in subsets:
            label = "concat" if mode == "concat" else f"per-level[{'+'.join(subset)}]"
            for k in proto.ks:
                for kappa in proto.kappas:
                    out[f"{label} K={k} kappa={kappa}"] = SpadeConfig(
                        k_image=k,
                        k_gallery=k,
                        kappa=kappa,
                        mode=mode,
                        sigma=proto.sigma,
                        score="image",
                        levels=None if subset == tuple(names) else subset,
                    )
    if proto.only is not None:
        unknown = sorted(set(proto.only) - set(out))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; the protocol has {list(out)}")
        out = {k: v for k, v in out.items() if k in proto.only}
    return out


class Sweep:
    """Scores one image under every setting of the protocol, each through the runtime
    (``det.with_config(config).score(features, x, geom)``): per setting the map's maximum and the
    mean of its top 1% (the runtime's 'max-pixel' and 'top-pixels' scores), and per K the image
    stage's score."""

    def __init__(self, proto: Protocol, level_names, keep_maps: tuple[str, ...] = ()):
        self.settings = settings(proto, level_names)
        self.keep_maps = keep_maps

    def __call__(
        self, det: Detector, features: dict, x: np.ndarray, geom, scores: Scores, maps: dict | None = None
    ) -> None:
        """``features``: one image's, as the backend gives them (``Detector.extract``); ``x``, ``geom``:
        what ``Detector.prepare`` gave for it."""
        image: dict[int, float] = {}
        pixel = []
        for key, config in self.settings.items():
            p = det.with_config(config).score(features, x, geom)
            image.setdefault(config.k_image, p.image_score)
            pixel.append((key, p))
        for k, v in image.items():
            scores.add(f"image K={k}", v)
        for key, p in pixel:
            scores.add(key, final_score("max-pixel", p.image_score, p.anomaly_map, None))
            scores.add(key + " top1%", final_score("top-pixels", p.image_score, p.anomaly_map, None))
            if maps is not None and key in self.keep_maps:
                maps.setdefault(key, []).append(p.anomaly_map.astype(np.float16))


def split(kind: str, seed: int) -> tuple[list, list]:
    """The protocol's split of one cell type's normal cells: (gallery half, normal test half)."""
    normal = elpv_cells(0.0, kind)
    np.random.default_rng(seed).shuffle(normal)
    half = len(normal) // 2
    return normal[:half], normal[half:]


def synthetic_set(clean_paths, seed: int, pre: Preprocess) -> tuple[list[np.ndarray], np.ndarray]:
    """One synthetic defect per cell (kinds in turn): the images, and their masks as the model sees them."""
    from ..runtime.images import load_image

    rng = np.random.default_rng(seed + 1)
    imgs, masks = [], []
    for i, p in enumerate(clean_paths):
        img, mask, _ = add_defect(load_image(str(p))[:, :, 0], rng, KINDS[i % len(KINDS)])
        imgs.append(img)
        masks.append(pre(np.repeat(mask[:, :, None].astype(np.uint8) * 255, 3, 2))[0][:, :, 0] > 127)
    return imgs, np.stack(masks)


def _cells(kind, prob, limit):
    cells = elpv_cells(prob, kind)
    return cells[:limit] if limit else cells


def run(backend: FeatureBackend, proto: Protocol = Protocol(), echo=print) -> dict:
    """Run the benchmark; returns {cell type: {"image": ..., "pixel": ..., "counts": ..., "seconds": ...}}."""
    info = backend.info
    pre = Preprocess(info.input_size)
    names = [lv.name for lv in info.levels]
    all_levels = "+".join(names)
    results = {}
    for kind in proto.cell_types:
        t0 = time.perf_counter()
        train, test_ok = split(kind, proto.seed)
        if proto.limit:
            test_ok = test_ok[: max(proto.limit, 2 * proto.n_pixel)]
        echo(f"[{kind}] gallery: {len(train)} normal cells")
        gfeats, ginputs, ggeoms = extract(backend, [str(p) for p in train], pre, desc=f"{kind} gallery")
        # stored as extracted: the benchmark compares scoring settings (storage: `bench gallery`)
        gallery = gallery_from_features(gfeats, [str(i) for i in range(len(gfeats))], info, Storage.exact())
        det = Detector(backend, gallery, config=SpadeConfig(score="image"), preprocess=pre)
        sweep = Sweep(
            proto,
            names,
            keep_maps=tuple(f"concat K={k} kappa=1" for k in proto.ks)
            + tuple(f"per-level[{all_levels}] K={k} kappa=1" for k in proto.ks),
        )

        def score_paths(paths, desc, maps=None):
            sc = Scores()
            for i in progress(range(0, len(paths), 16), -(-len(paths) // 16), desc, unit="batch"):
                for f, x, geom in zip(*extract(backend, paths[i : i + 16], pre, show=False)):
                    sweep(det, as_backend_output(f), x, geom, sc, maps)  # noqa: B023 - called in this iteration
            return sc

        # normal statistics without touching the test sets: gallery images scored leave-one-out
        loo = Scores()
        for i in progress(range(N_LOO), N_LOO, f"{kind} leave-one-out"):
            sweep(
                Detector(backend, without(gallery, i), det.scorer, det.config, pre),
                as_backend_output(gfeats[i]),
                ginputs[i],
                ggeoms[i],
                loo,
            )
        del gfeats, ginputs, ggeoms
        ok_maps: dict = {}
        n_pix = min(proto.n_pixel, len(test_ok) // 2)
        ok_scores = score_paths([str(p) for p in test_ok[:n_pix]], f"{kind} normal (pixel set)", ok_maps)
        rest = score_paths([str(p) for p in test_ok[n_pix:]], f"{kind} normal")
        for key, v in rest.values.items():
            ok_scores.values[key].extend(v)
        image = {}
        per_image = {"normal": ok_scores.values, "leave_one_out": loo.values}
        counts = {"normal": len(test_ok)}
        for group in proto.groups:
            bad = _cells(kind, GROUPS[group], proto.limit)
            counts[group] = len(bad)
            echo(f"[{kind}] {len(test_ok)} normal vs {len(bad)} defective (p={group})")
            sc = score_paths([str(p) for p in bad], f"{kind} p={group}")
            per_image[group] = sc.values
            image[group] = {
                key: roc_auc([0] * len(ok_scores.values[key]) + [1] * len(v), ok_scores.values[key] + v)
                for key, v in sc.values.items()
            }

        # pixel level: synthetic defects on other held-out normal cells
        syn_imgs, syn_masks = synthetic_set(test_ok[n_pix : 2 * n_pix], proto.seed, pre)
        bad_maps: dict = {}
        score_paths(syn_imgs, f"{kind} synthetic", bad_maps)
        masks = np.concatenate([np.zeros((n_pix, info.input_size, info.input_size), bool), syn_masks])
        pixel = {}
        for key in ok_maps:
            maps = np.concatenate([np.stack(ok_maps[key]), np.stack(bad_maps[key])]).astype(np.float32)
            pixel[key] = {
                "pixel_auroc": pixel_roc_auc(masks, maps),
                "aupro": aupro(masks, maps),
                "image_auroc": roc_auc([0] * n_pix + [1] * n_pix, maps.reshape(len(maps), -1).max(1)),
            }
        counts["synthetic"] = n_pix
        results[kind] = {
            "image": image,
            "pixel": pixel,
            "counts": counts,
            "seconds": time.perf_counter() - t0,
            "scores": per_image,
        }
        echo(f"[{kind}] done in {results[kind]['seconds']:.0f} s")
    return results


def without(gallery: Gallery, i: int) -> Gallery:
    """``gallery`` less image ``i`` (dense storage): a gallery image scored leave-one-out."""
    keep = np.delete(np.arange(len(gallery)), i)
    levels = {}
    for name, st in gallery.levels.items():
        if st.coreset:
            raise ValueError("leave-one-out scoring takes a dense gallery")
        levels[name] = type(st)(st.data[keep], st.grid, st.codec)
    return Gallery([gallery.names[j] for j in keep], gallery.global_features[keep], levels, dict(gallery.manifest))


def headline_keys(level_names, ks=(1, 5, 50)) -> list[str]:
    """The settings every report shows: image stage, and max pixel score of both modes, per K."""
    all_levels = "+".join(level_names)
    return (
        [f"image K={k}" for k in ks]
        + [f"concat K={k} kappa=1" for k in ks]
        + [f"per-level[{all_levels}] K={k} kappa=1" for k in ks]
    )


def combined(r: dict, image_key: str, pixel_key: str) -> dict[str, float]:
    """AUROC per group of the runtime's combined score (:func:`~spade_edge.runtime.spade.combined_score`:
    image score / its normal median + pixel score / its normal median), the medians from gallery
    images scored leave-one-out (no test image is used to combine). With a 'top1%' pixel key this is
    exactly ``score="combined"``; the benchmark also combines the map maximum."""
    s, loo = r["scores"], r["scores"]["leave_one_out"]
    normal = {"image": float(np.median(loo[image_key])), "top_pixels": float(np.median(loo[pixel_key]))}

    def comb(part):
        return [combined_score(i, p, normal) for i, p in zip(s[part][image_key], s[part][pixel_key])]

    ok = comb("normal")
    return {g: roc_auc([0] * len(ok) + [1] * len(s[g][image_key]), ok + comb(g)) for g in GROUPS if g in s}


def add_combinations(results: dict, ks=(1, 5, 50)) -> None:
    """Add 'image K=a + concat K=b kappa=1' style settings to every result (in place)."""
    for r in results.values():
        if "scores" not in r:
            continue
        pixel_keys = [
            k
            for k in r["image"]["1.0"]
            if not k.startswith("image") and "kappa=1" in k and ("concat" in k or k.count("+") == 2)
        ]
        for ki in (k for k in ks if f"image K={k}" in r["scores"]["leave_one_out"]):
            for pk in pixel_keys:
                for g, v in combined(r, f"image K={ki}", pk).items():
                    r["image"][g][f"image K={ki} + {pk}"] = v


def markdown(results: dict, level_names, ks=(1, 5, 50), top: int = 12) -> str:
    """Tables of one benchmark run (results of :func:`run`, possibly merged across cell types)."""
    lines = []
    add_combinations(results, ks)
    kinds = list(results)
    for kind in kinds:
        r = results[kind]
        c = r["counts"]
        groups = [g for g in GROUPS if g in r["image"]]
        lines += [
            f"### ELPV {kind}: image AUROC ({c['normal']} normal test cells vs defective)",
            "",
            "| score | " + " | ".join(f"p={g} (n={c[g]})" for g in groups) + " |",
            "|---|" + "---:|" * len(groups),
        ]
        for key in headline_keys(level_names, ks):
            if key not in r["image"]["1.0"]:  # a quick run that swept fewer settings
                continue
            label = key if key.startswith("image") else f"max pixel, {key}"
            lines.append(f"| {label} | " + " | ".join(f"{r['image'][g][key]:.3f}" for g in groups) + " |")
        lines.append("")
    # every setting, ranked by the mean over cell types at p = 1.0
    keys = list(results[kinds[0]]["image"]["1.0"])
    mean = {k: float(np.mean([results[t]["image"]["1.0"][k] for t in kinds])) for k in keys}
    lines += [
        f"### All settings, ranked (image AUROC at p=1.0; top {top} of {len(keys)})",
        "",
        "| setting | " + " | ".join(kinds) + " | mean |",
        "|---|" + "---:|" * (len(kinds) + 1),
    ]
    for k in sorted(keys, key=lambda k: -mean[k])[:top]:
        lines.append(
            f"| {k} | " + " | ".join(f"{results[t]['image']['1.0'][k]:.3f}" for t in kinds) + f" | {mean[k]:.3f} |"
        )
    lines.append("")
    lines += [
        "### Synthetic defects on held-out normal cells: pixel level",
        "",
        "| setting | " + " | ".join(f"{t} pixel AUROC | {t} AUPRO" for t in kinds) + " |",
        "|---|" + "---:|" * (2 * len(kinds)),
    ]
    for key in results[kinds[0]]["pixel"]:
        lines.append(
            f"| {key} | "
            + " | ".join(
                f"{results[t]['pixel'][key]['pixel_auroc']:.3f} | {results[t]['pixel'][key]['aupro']:.3f}"
                for t in kinds
            )
            + " |"
        )
    return "\n".join(lines) + "\n"
