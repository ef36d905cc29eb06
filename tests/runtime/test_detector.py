import json
import warnings

import numpy as np
import pytest

from spade_edge.runtime import Detector, SpadeConfig
from spade_edge.runtime.build import gallery_from_images
from spade_edge.runtime.errors import ImageError, MismatchError, ModelError
from spade_edge.runtime.features import backend_from_model

from ..conftest import tiny_onnx


@pytest.fixture
def tiny(tmp_path):
    from PIL import Image

    model = tmp_path / "tiny.onnx"
    tiny_onnx(model)
    rng = np.random.default_rng(0)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(100, 140, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return model, sorted(folder.iterdir())


def test_build_and_predict(tiny, tmp_path):
    model, images = tiny
    backend = backend_from_model(model)
    g = gallery_from_images(
        backend, images, tmp_path / "g.gallery", config=SpadeConfig(k_image=2, k_gallery=3), show_progress=False
    )
    assert len(g) == 10 and len(g.thresholds["heldout"]) == 2
    assert g.thresholds["image"] == pytest.approx(max(g.thresholds["heldout_scores"]), rel=1e-5)
    det = Detector.load(model, tmp_path / "g.gallery")
    assert det.config.k_gallery == 3  # the gallery's stored settings are the default
    p = det.predict(images[0])
    assert p.anomaly_map.shape == (32, 32) and p.anomaly_map_full.shape == (40, 48)
    assert p.verdict in ("OK", "NOT_OK") and len(p.neighbors) == 3
    json.dumps(p.to_dict())
    bright = np.full((40, 48, 3), 250, np.uint8)  # far from every normal image
    q = det.predict(bright)
    assert q.score > g.thresholds["image"] and q.verdict == "NOT_OK"


def test_overriding_settings_warns_about_thresholds(tiny, tmp_path):
    model, images = tiny
    gallery_from_images(backend_from_model(model), images, tmp_path / "g.gallery", show_progress=False)
    with pytest.warns(UserWarning, match="thresholds"):
        Detector.load(model, tmp_path / "g.gallery", kappa=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Detector.load(model, tmp_path / "g.gallery")


def test_gallery_from_another_model_is_refused(tiny, tmp_path):
    model, images = tiny
    gallery_from_images(backend_from_model(model), images, tmp_path / "g.gallery", show_progress=False)
    other = tmp_path / "other.onnx"
    tiny_onnx(other, fingerprint="sha256:another")
    with pytest.raises(MismatchError, match="rebuild the gallery"):
        Detector.load(other, tmp_path / "g.gallery")


def test_bad_image_stops_build_before_writing(tiny, tmp_path):
    model, images = tiny
    out = tmp_path / "g.gallery"
    gallery_from_images(backend_from_model(model), images, out, show_progress=False)
    before = out.read_bytes()
    images[3].write_bytes(images[3].read_bytes()[:60])  # truncate one file
    with pytest.raises(ImageError, match=images[3].name):
        gallery_from_images(backend_from_model(model), images, out, show_progress=False)
    assert out.read_bytes() == before
    with pytest.raises(ImageError, match=images[3].name):
        gallery_from_images(backend_from_model(model), images, tmp_path / "new.gallery", show_progress=False)
    assert not (tmp_path / "new.gallery").exists()


def test_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such model"):
        backend_from_model(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="bad.onnx: not an ONNX model"):
        backend_from_model(tmp_path / "bad.onnx")


def test_a_score_that_is_not_a_number_is_not_ok(tiny, tmp_path, monkeypatch):
    from spade_edge.runtime import detector as detector_module

    model, images = tiny
    g = gallery_from_images(
        backend_from_model(model), images, tmp_path / "g.gallery", holdout=0.25, show_progress=False
    )
    det = Detector.load(model, g.path, device="cpu")
    assert det.gallery.thresholds.get("image") is not None
    monkeypatch.setattr(detector_module, "final_score", lambda *a, **k: float("nan"))
    assert det.predict(np.full((32, 32, 3), 128, np.uint8)).verdict == "NOT_OK"


def test_backend_checks_its_input(tiny):
    backend = backend_from_model(tiny[0])
    with pytest.raises(ImageError, match="uint8"):
        backend(np.zeros((1, 32, 32, 3), np.float32))
    out = backend(np.zeros((3, 32, 32, 3), np.uint8))  # dynamic batch
    assert out["a"].shape == (3, 3, 8, 8) and out["global"].shape == (3, 3)


def test_combined_score_uses_heldout_medians(tiny, tmp_path):
    model, images = tiny
    cfg = SpadeConfig(k_image=2, k_gallery=3, score="combined")
    g = gallery_from_images(
        backend_from_model(model), images, tmp_path / "g.gallery", config=cfg, holdout=0.25, show_progress=False
    )
    normal = g.manifest["normal"]
    assert normal["image"] > 0 and normal["top_pixels"] > 0
    p = Detector.load(model, tmp_path / "g.gallery").predict(images[0])
    top = np.sort(p.anomaly_map.ravel())[-int(p.anomaly_map.size * 0.01) :].mean()
    assert p.score == pytest.approx(p.image_score / normal["image"] + top / normal["top_pixels"], rel=1e-5)
    assert g.thresholds["image"] == pytest.approx(max(g.thresholds["heldout_scores"]))
    # without a held-out share the gallery has no normal medians: it is built, and the detector refuses it
    h = gallery_from_images(
        backend_from_model(model), images, tmp_path / "h.gallery", config=cfg, holdout=0.0, show_progress=False
    )
    assert "normal" not in h.manifest
    with pytest.raises(ValueError, match="holdout"):
        Detector.load(model, tmp_path / "h.gallery")
