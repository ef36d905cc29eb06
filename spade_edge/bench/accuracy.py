"""ELPV accuracy benchmark (image level) and synthetic-defect benchmark (pixel level).

Protocol (fixed; docs/results.md): for each cell type (mono, poly) the defect-probability-0 cells
are shuffled with a seed and halved; the first half is the gallery, the second half the normal
test images. Image level: those normal test cells against the probability-1.0 cells (and,
reported separately, 0.67 and 0.33). Pixel level: the first ``n_pixel`` normal test cells as they
are and the next ``n_pixel`` with one synthetic defect each (crack, inactive area, interrupted
fingers, bright scratch, in turn), masks kept; pixel AUROC and AUPRO at 224 x 224.

One pass computes every setting: per test image and per retrieved normal image the kappa
smallest pixel distances are kept, so the maps for every K <= max(K), kappa, pixel mode and level
subset follow without scoring again.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from ..datasets import elpv_cells
from ..metrics import aupro, pixel_roc_auc, roc_auc
from ..runtime.build import extract, gallery_from_features, progress
from ..runtime.features import FeatureBackend
from ..runtime.gallery import Gallery
from ..runtime.images import Preprocess
from ..runtime.resample import gaussian_blur, upsample_map
from ..runtime.scoring import NumpyScorer
from ..runtime.spade import concat_rows, gallery_rows, image_knn
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


@dataclass
class Scores:
    """Per-image scores of every setting, keyed by setting name."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, v: float) -> None:
        self.values.setdefault(key, []).append(float(v))


def level_subsets(names):
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


class Sweep:
    """Scores one test image under every setting of the protocol."""

    def __init__(self, gallery: Gallery, info, proto: Protocol, keep_maps: tuple[str, ...] = ()):
        self.g, self.info, self.p = gallery, info, proto
        self.names = [lv.name for lv in info.levels]
        self.scorer = NumpyScorer()
        self.kmax = min(max(proto.ks), len(gallery))
        self.kappa = max(proto.kappas)
        self.keep_maps = keep_maps
        stride = {lv.name: lv.stride for lv in info.levels}
        self.finest = min(self.names, key=stride.get)

    def _per_neighbor(self, query, rows_of) -> np.ndarray:
        """(Kmax, P, kappa): each retrieved image's kappa smallest distances for every query row."""
        return np.stack([self.scorer.topk(query, [rows_of(j)], self.kappa).distances for j in self.neighbors])

    def _grid_maps(self, per, grid):
        """{(K, kappa): (grid) raw map} from per-neighbour top-kappa distances."""
        out = {}
        for k in self.p.ks:
            k = min(k, self.kmax)
            pool = np.sort(per[:k].transpose(1, 0, 2).reshape(per.shape[1], -1), axis=1)
            for kappa in self.p.kappas:
                out[k, kappa] = pool[:, :kappa].mean(axis=1).reshape(grid)
        return out

    def __call__(self, feats: dict, scores: Scores, maps: dict | None = None, exclude: int | None = None) -> None:
        s = self.info.input_size
        dist, idx = image_knn(feats[self.info.global_name], self.g, self.kmax + (exclude is not None))
        if exclude is not None:  # a gallery image scored against the others (leave-one-out)
            keep = idx != exclude
            dist, idx = dist[keep][: self.kmax], idx[keep][: self.kmax]
        self.neighbors = idx
        for k in self.p.ks:
            scores.add(f"image K={k}", dist[: min(k, self.kmax)].mean())
        chw = {n: feats[n].transpose(2, 0, 1) for n in self.names}

        def finish(key, raw224):
            amap = gaussian_blur(raw224, self.p.sigma)
            scores.add(key, amap.max())
            flat = amap.ravel()
            top = flat.size // 100
            scores.add(key + " top1%", np.partition(flat, flat.size - top)[-top:].mean())
            if maps is not None and key in self.keep_maps:
                maps.setdefault(key, []).append(amap.astype(np.float16))

        grid = feats[self.finest].shape[:2]
        per = self._per_neighbor(concat_rows(chw, self.g, self.names, grid), lambda j: gallery_rows(self.g, j, self.names, grid))
        for (k, kappa), m in self._grid_maps(per, grid).items():
            finish(f"concat K={k} kappa={kappa}", upsample_map(m, s, s))
        level_maps = {}
        for n in self.names:
            f = self.g.levels[n].codec.project(feats[n])
            per = self._per_neighbor(f.reshape(-1, f.shape[-1]), lambda j: gallery_rows(self.g, j, [n]))
            for key, m in self._grid_maps(per, f.shape[:2]).items():
                level_maps[n, key] = upsample_map(m, s, s)
        for subset in level_subsets(self.names):
            for k in self.p.ks:
                for kappa in self.p.kappas:
                    key = (min(k, self.kmax), kappa)
                    raw = sum(level_maps[n, key] for n in subset) / len(subset)
                    finish(f"per-level[{'+'.join(subset)}] K={k} kappa={kappa}", raw)


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
    results = {}
    for kind in proto.cell_types:
        t0 = time.perf_counter()
        train, test_ok = split(kind, proto.seed)
        if proto.limit:
            test_ok = test_ok[: max(proto.limit, 2 * proto.n_pixel)]
        echo(f"[{kind}] gallery: {len(train)} normal cells")
        gfeats, _, _ = extract(backend, [str(p) for p in train], pre, desc=f"{kind} gallery")
        gallery = gallery_from_features(gfeats, [str(i) for i in range(len(gfeats))], info)
        sweep = Sweep(gallery, info, proto, keep_maps=tuple(f"concat K={k} kappa=1" for k in proto.ks) + tuple(
            f"per-level[{'+'.join(n.name for n in info.levels)}] K={k} kappa=1" for k in proto.ks))

        def score_paths(paths, desc, maps=None):
            sc = Scores()
            for i in progress(range(0, len(paths), 16), -(-len(paths) // 16), desc, unit="batch"):
                feats, _, _ = extract(backend, paths[i : i + 16], pre, show=False)
                for f in feats:
                    sweep(f, sc, maps)
            return sc

        # normal statistics without touching the test sets: gallery images scored leave-one-out
        loo = Scores()
        for i in progress(range(N_LOO), N_LOO, f"{kind} leave-one-out"):
            sweep(gfeats[i], loo, exclude=i)
        del gfeats
        ok_maps: dict = {}
        n_pix = min(proto.n_pixel, len(test_ok) // 2)
        ok_scores = score_paths([str(p) for p in test_ok[:n_pix]], f"{kind} normal (pixel set)", ok_maps)
        rest = score_paths([str(p) for p in test_ok[n_pix:]], f"{kind} normal")
        for key, v in rest.values.items():
            ok_scores.values[key].extend(v)
        image = {}
        per_image = {"normal": ok_scores.values, "leave_one_out": loo.values}
        counts = {"normal": len(test_ok)}
        for group, prob in GROUPS.items():
            bad = _cells(kind, prob, proto.limit)
            counts[group] = len(bad)
            echo(f"[{kind}] {len(test_ok)} normal vs {len(bad)} defective (p={group})")
            sc = score_paths([str(p) for p in bad], f"{kind} p={group}")
            per_image[group] = sc.values
            image[group] = {key: roc_auc([0] * len(ok_scores.values[key]) + [1] * len(v), ok_scores.values[key] + v)
                            for key, v in sc.values.items()}

        # pixel level: synthetic defects on other held-out normal cells
        syn_imgs, syn_masks = synthetic_set(test_ok[n_pix : 2 * n_pix], proto.seed, pre)
        bad_maps: dict = {}
        score_paths(syn_imgs, f"{kind} synthetic", bad_maps)
        masks = np.concatenate([np.zeros((n_pix, info.input_size, info.input_size), bool), syn_masks])
        pixel = {}
        for key in ok_maps:
            maps = np.concatenate([np.stack(ok_maps[key]), np.stack(bad_maps[key])]).astype(np.float32)
            pixel[key] = {"pixel_auroc": pixel_roc_auc(masks, maps), "aupro": aupro(masks, maps),
                          "image_auroc": roc_auc([0] * n_pix + [1] * n_pix, maps.reshape(len(maps), -1).max(1))}
        counts["synthetic"] = n_pix
        results[kind] = {"image": image, "pixel": pixel, "counts": counts, "seconds": time.perf_counter() - t0,
                         "scores": per_image}
        echo(f"[{kind}] done in {results[kind]['seconds']:.0f} s")
    return results


def headline_keys(level_names, ks=(1, 5, 50)) -> list[str]:
    """The settings every report shows: image stage, and max pixel score of both modes, per K."""
    all_levels = "+".join(level_names)
    return ([f"image K={k}" for k in ks] + [f"concat K={k} kappa=1" for k in ks]
            + [f"per-level[{all_levels}] K={k} kappa=1" for k in ks])


def combined(r: dict, image_key: str, pixel_key: str) -> dict[str, float]:
    """AUROC per group of image score / its normal median + pixel score / its normal median (the
    medians from gallery images scored leave-one-out: no test image is used to combine)."""
    s, loo = r["scores"], r["scores"]["leave_one_out"]
    mi, mp = float(np.median(loo[image_key])), float(np.median(loo[pixel_key]))

    def comb(part):
        return list(np.asarray(s[part][image_key]) / mi + np.asarray(s[part][pixel_key]) / mp)

    ok = comb("normal")
    return {g: roc_auc([0] * len(ok) + [1] * len(s[g][image_key]), ok + comb(g)) for g in GROUPS}


def add_combinations(results: dict, ks=(1, 5, 50)) -> None:
    """Add 'image K=a + concat K=b kappa=1' style settings to every result (in place)."""
    for r in results.values():
        if "scores" not in r:
            continue
        pixel_keys = [k for k in r["image"]["1.0"] if not k.startswith("image") and "kappa=1" in k
                      and ("concat" in k or k.count("+") == 2)]
        for ki in ks:
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
        lines += [f"### ELPV {kind}: image AUROC ({c['normal']} normal test cells vs defective)", "",
                  "| score | " + " | ".join(f"p={g} (n={c[g]})" for g in GROUPS) + " |",
                  "|---|" + "---:|" * len(GROUPS)]
        for key in headline_keys(level_names, ks):
            label = key if key.startswith("image") else f"max pixel, {key}"
            lines.append(f"| {label} | " + " | ".join(f"{r['image'][g][key]:.3f}" for g in GROUPS) + " |")
        lines.append("")
    # every setting, ranked by the mean over cell types at p = 1.0
    keys = list(results[kinds[0]]["image"]["1.0"])
    mean = {k: float(np.mean([results[t]["image"]["1.0"][k] for t in kinds])) for k in keys}
    lines += [f"### All settings, ranked (image AUROC at p=1.0; top {top} of {len(keys)})", "",
              "| setting | " + " | ".join(kinds) + " | mean |", "|---|" + "---:|" * (len(kinds) + 1)]
    for k in sorted(keys, key=lambda k: -mean[k])[:top]:
        lines.append(f"| {k} | " + " | ".join(f"{results[t]['image']['1.0'][k]:.3f}" for t in kinds) + f" | {mean[k]:.3f} |")
    lines.append("")
    lines += ["### Synthetic defects on held-out normal cells: pixel level", "",
              "| setting | " + " | ".join(f"{t} pixel AUROC | {t} AUPRO" for t in kinds) + " |",
              "|---|" + "---:|" * (2 * len(kinds))]
    for key in results[kinds[0]]["pixel"]:
        lines.append(f"| {key} | " + " | ".join(
            f"{results[t]['pixel'][key]['pixel_auroc']:.3f} | {results[t]['pixel'][key]['aupro']:.3f}" for t in kinds) + " |")
    return "\n".join(lines) + "\n"
