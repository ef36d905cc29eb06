import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from spade_edge.cli import main

from .conftest import tiny_onnx


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_the_commands(runner):
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0
    for cmd in ("export", "gallery", "infer", "demo"):
        assert cmd in res.output
    res = runner.invoke(main, ["gallery", "build", "--help"])
    assert "--holdout" in res.output and "--no-crop" in res.output and "--k-gallery" in res.output


def test_export_prints_parity(runner, tmp_path):
    out = tmp_path / "m.onnx"
    res = runner.invoke(main, ["export", "--backbone", "lite0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "efficientnet_lite0" in res.output and "parity vs PyTorch (PASS" in res.output
    assert res.output.count("max abs") == 4 and out.is_file()


def test_export_without_weights_explains(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    res = runner.invoke(main, ["export", "-b", "wrn50x2", "-o", str(tmp_path / "m.onnx"), "--no-download"])
    assert res.exit_code == 1 and "wide_resnet50_2-95faca4d.pth" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture
def tiny_setup(tmp_path, runner):
    model = tmp_path / "tiny.onnx"
    tiny_onnx(model)
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(100, 140, (36, 36), dtype=np.uint8)).save(good / f"{i}.png")
    gallery = tmp_path / "g.gallery"
    res = runner.invoke(main, ["gallery", "build", "-m", str(model), "-i", str(good), "-o", str(gallery), "--no-crop"])
    assert res.exit_code == 0, res.output
    return model, good, gallery


def test_gallery_info(runner, tiny_setup):
    _, _, gallery = tiny_setup
    res = runner.invoke(main, ["gallery", "info", str(gallery)])
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["images"] == 8 and info["preprocess"] == {"size": 32, "crop": False} and "image" in info["thresholds"]


def test_gallery_add_and_remove_are_recorded_and_rolled_back(runner, tiny_setup, tmp_path):
    model, good, gallery = tiny_setup
    extra = tmp_path / "extra.png"
    Image.fromarray(np.full((36, 36), 120, np.uint8)).save(extra)

    def images() -> int:
        return json.loads(runner.invoke(main, ["gallery", "info", str(gallery)]).output)["images"]

    before = images()
    res = runner.invoke(main, ["gallery", "add", str(gallery), str(extra), "-m", str(model)])
    assert res.exit_code == 0, res.output
    assert "generation 1" in res.output and images() == before + 1
    res = runner.invoke(main, ["gallery", "remove", str(gallery), "extra.png"])
    assert res.exit_code == 0, res.output
    assert "generation 2" in res.output and images() == before
    hist = runner.invoke(main, ["gallery", "history", str(gallery)]).output
    assert "add" in hist and "remove" in hist and "cli " in hist
    res = runner.invoke(main, ["gallery", "rollback", str(gallery)])  # undoes the remove
    assert res.exit_code == 0, res.output
    assert "generation 3 = generation 1" in res.output and images() == before + 1


def test_infer_reports_a_bad_file_and_goes_on(runner, tiny_setup, tmp_path):
    model, good, gallery = tiny_setup
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    res = runner.invoke(main, ["infer", "-m", str(model), "-g", str(gallery), str(bad), str(good / "0.png")])
    assert res.exit_code == 1
    lines = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert "cannot decode" in lines[0]["error"] and lines[1]["verdict"] in ("OK", "NOT_OK")
    assert "1 of 2 images could not be scored" in res.output


def test_corrupt_gallery_is_a_clear_error(runner, tiny_setup):
    model, good, gallery = tiny_setup
    data = bytearray(gallery.read_bytes())
    data[-100] ^= 0xFF
    gallery.write_bytes(bytes(data))
    res = runner.invoke(main, ["infer", "-m", str(model), "-g", str(gallery), str(good / "0.png")])
    assert res.exit_code == 1 and "corrupt" in res.output and "Traceback" not in res.output


def test_demo_small(runner, tmp_path):
    res = runner.invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--gallery-size", "20", "--test-size", "4"])
    assert res.exit_code == 0, res.output
    assert "image AUROC" in res.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert 0.5 < summary["image_auroc"] <= 1.0 and len(summary["images"]) == 8
    assert len(list((tmp_path / "demo" / "heatmaps").rglob("*.png"))) == 8
