"""End to end on a tiny MVTec-layout data set made of real ELPV cells with pasted defects."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from spade_edge.cli import main
from spade_edge.datasets import mvtec_category, paste_defect
from spade_edge.runtime import Detector
from spade_edge.runtime.images import load_image


@pytest.fixture(scope="module")
def category(elpv_normal, tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec") / "cell"
    rng = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True)
    for p in elpv_normal[:24]:
        Image.open(p).save(root / "train/good" / p.name)
    for p in elpv_normal[24:28]:
        Image.open(p).save(root / "test/good" / p.name)
    for p in elpv_normal[28:32]:
        img, mask = paste_defect(np.asarray(Image.open(p)), rng)
        Image.fromarray(img).save(root / "test/spot" / p.name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth/spot" / f"{p.stem}_mask.png")
    return root


def test_defects_score_higher_and_are_located(category, lite0_onnx, tmp_path):
    train, tests = mvtec_category(category)
    assert len(train) == 24 and len(tests) == 8 and sum(m is not None for _, _, m in tests) == 4
    runner = CliRunner()
    gallery = tmp_path / "cell.gallery"
    res = runner.invoke(
        main,
        [
            "gallery",
            "build",
            "--model",
            str(lite0_onnx),
            "--images",
            str(category / "train/good"),
            "--out",
            str(gallery),
            "--k-image",
            "3",
            "--k-gallery",
            "5",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "19 images" in res.output and gallery.is_file()

    heat = tmp_path / "heat"
    res = runner.invoke(
        main,
        [
            "infer",
            "--model",
            str(lite0_onnx),
            "--gallery",
            str(gallery),
            "--heatmaps",
            str(heat),
            *[str(p) for p, _, _ in tests],
        ],
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    by_type = {t: [r for r, (_, tt, _) in zip(lines, tests) if tt == t] for t in ("good", "spot")}
    assert min(r["max_pixel_score"] for r in by_type["spot"]) > max(r["max_pixel_score"] for r in by_type["good"])
    assert min(r["score"] for r in by_type["spot"]) > max(r["score"] for r in by_type["good"])
    assert all(r["verdict"] == "NOT_OK" for r in by_type["spot"])
    assert len(list(heat.glob("*.png"))) == 8

    det = Detector.load(lite0_onnx, gallery)
    for path, _, mask_path in tests:
        if mask_path is None:
            continue
        p = det.predict(path)
        mask = load_image(mask_path)[:, :, 0] > 0
        r, c = np.unravel_index(np.argmax(p.anomaly_map_full), mask.shape)
        assert mask[r, c], f"{path.name}: map maximum at {(r, c)} is outside the defect"
        # the correspondence of the worst pixel names a real gallery image
        img, _, _ = p.correspondence.at(*p.worst_pixel())
        assert p.correspondence_names[img] in {t.name for t in train}
