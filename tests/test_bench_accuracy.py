"""`bench accuracy` sweeps settings through the runtime: each setting is the detector under that
setting's SpadeConfig, on features extracted once; nothing of SPADE is re-implemented there."""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.bench import accuracy
from spade_edge.runtime import Detector, SpadeConfig
from spade_edge.runtime.build import as_backend_output, extract, gallery_from_images
from spade_edge.runtime.codec import Storage
from spade_edge.runtime.features import backend_from_model
from spade_edge.runtime.spade import combined_score, final_score

from .conftest import tiny_onnx


@pytest.fixture
def tiny(tmp_path):
    from PIL import Image

    tiny_onnx(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i:02d}.png")
        Image.fromarray(rng.integers(90, 150, (40, 48, 3), dtype=np.uint8)).save(paths[-1])
    backend = backend_from_model(tmp_path / "tiny.onnx")
    g = gallery_from_images(
        backend, paths[:8], tmp_path / "g.gallery", holdout=0.0, show_progress=False, storage=Storage.exact()
    )
    det = Detector(backend, g, config=SpadeConfig(score="image"))
    feats, xs, geoms = extract(backend, [str(p) for p in paths[8:]], det.preprocess, show=False)
    return det, [(as_backend_output(f), x, geom) for f, x, geom in zip(feats, xs, geoms)]


def test_settings_are_spade_configs_by_name():
    proto = accuracy.Protocol(ks=(1, 5), kappas=(1, 3))
    s = accuracy.settings(proto, ["a", "b"])
    assert len(s) == (1 + 3) * 2 * 2  # concat, and per level: a, b, a+b
    assert s["concat K=5 kappa=3"] == SpadeConfig(k_image=5, k_gallery=5, kappa=3, mode="concat", score="image")
    assert s["per-level[b] K=1 kappa=1"].levels == ("b",) and s["per-level[a+b] K=1 kappa=1"].levels is None
    only = accuracy.Protocol(only=("concat K=1 kappa=1",), level_sets=(("b", "a"),))
    assert list(accuracy.settings(only, ["a", "b"])) == ["concat K=1 kappa=1"]
    assert "per-level[a+b] K=50 kappa=3" in accuracy.settings(accuracy.Protocol(level_sets=(("b", "a"),)), ["a", "b"])
    with pytest.raises(ValueError, match="unknown setting"):
        accuracy.settings(accuracy.Protocol(only=("concat K=2 kappa=1",)), ["a", "b"])


def test_every_setting_is_the_runtime_under_that_config(tiny, monkeypatch):
    det, images = tiny
    proto = accuracy.Protocol(ks=(1, 5), kappas=(1, 2))
    sweep = accuracy.Sweep(proto, ["a", "b"], keep_maps=("concat K=5 kappa=1",))
    calls = []
    real = Detector.score
    monkeypatch.setattr(Detector, "score", lambda self, *a: calls.append(self.config) or real(self, *a))
    scores, maps = accuracy.Scores(), {}
    for f, x, geom in images:
        sweep(det, f, x, geom, scores, maps)
    assert calls == list(sweep.settings.values()) * len(images)  # one runtime scoring per setting, nothing else
    monkeypatch.setattr(Detector, "score", real)
    for key, config in sweep.settings.items():
        for i, (f, x, geom) in enumerate(images):
            p = det.with_config(config).score(f, x, geom)
            assert scores.values[key][i] == final_score("max-pixel", p.image_score, p.anomaly_map, None)
            assert scores.values[key + " top1%"][i] == final_score("top-pixels", p.image_score, p.anomaly_map, None)
            assert scores.values[f"image K={config.k_image}"][i] == p.image_score
    assert len(maps["concat K=5 kappa=1"]) == len(images)


def test_combined_settings_are_the_runtimes_combined_score(tiny):
    """'image K=a + <per-level setting> top1%' is SpadeConfig(score='combined') with the same medians."""
    det, images = tiny
    proto = accuracy.Protocol(ks=(1, 5), kappas=(1,), modes=("per-level",), level_sets=(("a", "b"),))
    sweep = accuracy.Sweep(proto, ["a", "b"])
    scores = accuracy.Scores()
    for f, x, geom in images:
        sweep(det, f, x, geom, scores)
    normal = {"image": 0.7, "top_pixels": 3.0}
    det.gallery.manifest["normal"] = normal
    runtime = det.with_config(SpadeConfig(k_image=1, k_gallery=5, score="combined"))
    for i, (f, x, geom) in enumerate(images):
        bench = combined_score(
            scores.values["image K=1"][i], scores.values["per-level[a+b] K=5 kappa=1 top1%"][i], normal
        )
        assert bench == pytest.approx(runtime.score(f, x, geom).score, rel=1e-6)


def test_leave_one_out_drops_the_image():
    from .conftest import make_info, random_gallery

    g = random_gallery(make_info(), 5, np.random.default_rng(0))
    h = accuracy.without(g, 2)
    assert h.names == [g.names[j] for j in (0, 1, 3, 4)]
    np.testing.assert_array_equal(h.levels["a"].data, g.levels["a"].data[[0, 1, 3, 4]])
    np.testing.assert_array_equal(h.global_features, g.global_features[[0, 1, 3, 4]])
