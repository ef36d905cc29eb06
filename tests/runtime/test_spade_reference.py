"""The paper's equations, written plainly, against the runtime on random features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade_edge.runtime.scoring import NumpyScorer
from spade_edge.runtime.scoring.base import GalleryPyramids, GalleryRows
from spade_edge.runtime.spade import SpadeConfig, image_knn, pixel_scores

from ..conftest import make_info, random_features, random_gallery


def upsample(x: np.ndarray, size) -> np.ndarray:
    """(C, h, w) or (h, w) -> bilinear, half-pixel centres, via PyTorch (an independent implementation)."""
    t = torch.from_numpy(np.asarray(x, np.float64))
    t = t[None, None] if t.ndim == 2 else t[None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0]
    return out[0].numpy() if x.ndim == 2 else out.numpy()


def reference(test, gallery, info, k_image, k_gallery, kappa, mode):
    names = [lv.name for lv in info.levels]
    S = info.input_size
    # image stage: Euclidean distance to every normal image's global feature
    g = np.asarray(gallery.global_features, np.float64)
    dist = np.sqrt(((g - test["global"].astype(np.float64)) ** 2).sum(axis=1))
    order = np.argsort(dist)
    image_score = dist[order[:k_image]].mean()
    retrieved = order[:k_gallery]

    def kappa_nn_map(test_map, gallery_maps):
        # test_map (C, h, w); gallery_maps: list of (C, h', w'); every gallery pixel of every retrieved image
        C, h, w = test_map.shape
        gal = np.concatenate([m.reshape(C, -1).T for m in gallery_maps])  # (M, C)
        out = np.zeros((h, w))
        for y in range(h):
            for x in range(w):
                d = ((gal - test_map[:, y, x]) ** 2).sum(axis=1)
                out[y, x] = np.sort(d)[:kappa].mean()
        return out

    gal_levels = {
        n: [np.asarray(gallery.levels[n].data[j], np.float64).transpose(2, 0, 1) for j in retrieved] for n in names
    }
    if mode == "concat":
        h0, w0 = test[names[0]].shape[1:]
        t = np.concatenate([upsample(test[n], (h0, w0)) for n in names])
        gals = [np.concatenate([upsample(gal_levels[n][i], (h0, w0)) for n in names]) for i in range(len(retrieved))]
        return image_score, upsample(kappa_nn_map(t, gals), (S, S))
    maps = [upsample(kappa_nn_map(test[n].astype(np.float64), gal_levels[n]), (S, S)) for n in names]
    return image_score, np.mean(maps, axis=0)


@pytest.mark.parametrize("mode", ["concat", "per-level"])
@pytest.mark.parametrize("k_image,k_gallery,kappa", [(1, 1, 1), (3, 2, 1), (5, 4, 3), (50, 50, 7)])
def test_runtime_matches_paper_equations(mode, k_image, k_gallery, kappa):
    rng = np.random.default_rng(k_image * 100 + kappa)
    info = make_info(levels=(("a", 5, 4), ("b", 7, 8), ("c", 3, 16)), size=32)
    gallery = random_gallery(info, 12, rng)
    test = random_features(info, rng)
    cfg = SpadeConfig(k_image=k_image, k_gallery=k_gallery, kappa=kappa, mode=mode)

    ref_score, ref_map = reference(test, gallery, info, min(k_image, 12), min(k_gallery, 12), kappa, mode)
    dist, idx = image_knn(test["global"], gallery, max(k_image, k_gallery))
    score = dist[:k_image].mean()
    amap, corr = pixel_scores(test, gallery, idx[:k_gallery], info, cfg, NumpyScorer(block_bytes=4096))

    assert abs(score - ref_score) / ref_score <= 1e-5
    assert amap.shape == (32, 32)
    assert np.abs(amap - ref_map).max() / np.abs(ref_map).max() <= 1e-5


@pytest.mark.parametrize("mode", ["concat", "per-level"])
def test_gallery_norms_are_made_once_per_image(mode, monkeypatch):
    """Over two test images, each retrieved gallery image's norms are made once (per level, or of
    its upsampled concatenation) and the maps still match the paper's; concat takes the
    per-level-cost path (forced: these toy levels are narrow)."""
    import spade_edge.runtime.scoring.numpy as scoring

    monkeypatch.setattr(scoring, "PER_LEVEL_SHARE", 100.0)
    made = []
    for view in (GalleryPyramids, GalleryRows):
        monkeypatch.setattr(
            view, "make_sqnorms", lambda self, block, real=view.make_sqnorms: made.append(1) or real(self, block)
        )
    rng = np.random.default_rng(11)
    info = make_info(levels=(("a", 5, 4), ("b", 7, 8), ("c", 3, 16)), size=32)
    gallery = random_gallery(info, 6, rng)
    cfg = SpadeConfig(k_image=4, k_gallery=4, kappa=2, mode=mode)
    retrieved = set()
    for _ in range(2):
        test = random_features(info, rng)
        _, ref_map = reference(test, gallery, info, 4, 4, 2, mode)
        _, idx = image_knn(test["global"], gallery, 4)
        retrieved |= set(idx.tolist())
        amap, _ = pixel_scores(test, gallery, idx, info, cfg, NumpyScorer())
        assert np.abs(amap - ref_map).max() / np.abs(ref_map).max() <= 1e-5
    assert len(made) == len(retrieved) * (1 if mode == "concat" else 3)


def test_correspondence_points_at_the_matching_pixel():
    # plant a copy of a test pixel feature into one gallery image; the correspondence must find it
    rng = np.random.default_rng(3)
    info = make_info(levels=(("a", 5, 4), ("b", 7, 8)), size=32)
    gallery = random_gallery(info, 4, rng)
    test = random_features(info, rng)
    cfg = SpadeConfig(k_image=4, k_gallery=4, mode="per-level")
    gallery.levels["a"].data[2, 5, 6] = test["a"][:, 1, 3]
    _, corr = pixel_scores(test, gallery, np.arange(4), info, cfg, NumpyScorer())
    assert (corr.image[1, 3], corr.y[1, 3], corr.x[1, 3]) == (2, 5, 6)
    img, row, col = corr.at(1 * 4 + 1, 3 * 4 + 2)  # a model-input pixel inside grid cell (1, 3)
    assert (img, row, col) == (2, 5.5 * 4, 6.5 * 4)


def test_config_validation():
    with pytest.raises(ValueError, match="kappa"):
        SpadeConfig(kappa=0)
    with pytest.raises(ValueError, match="mode"):
        SpadeConfig(mode="sum")
    with pytest.raises(ValueError, match="unknown level"):
        SpadeConfig(levels=("zz",)).level_names(make_info())


def test_image_score_kinds_known_answers():
    from spade_edge.runtime.spade import final_score

    amap = np.arange(10000, dtype=np.float32).reshape(100, 100)
    assert final_score("image", 2.5, amap, None) == 2.5
    assert final_score("max-pixel", 2.5, amap, None) == 9999.0
    assert final_score("top-pixels", 2.5, amap, None) == pytest.approx(9949.5)  # mean of 9900..9999
    assert final_score("combined", 2.0, amap, {"image": 4.0, "top_pixels": 9949.5}) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="holdout"):
        final_score("combined", 2.0, amap, None)
