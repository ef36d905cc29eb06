import json

import numpy as np
import pytest
from click.testing import CliRunner

from spade_edge.cli import main
from spade_edge.datasets import write_elpv_category
from spade_edge.synthetic import KINDS, add_defect


@pytest.mark.parametrize("kind", KINDS)
def test_synthetic_defects_change_only_their_mask(kind, elpv_normal):
    from spade_edge.runtime.images import load_image

    img = load_image(elpv_normal[0])[:, :, 0]
    out, mask, k = add_defect(img, np.random.default_rng(0), kind)
    assert k == kind and mask.any() and mask.mean() < 0.1
    changed = out != img
    assert changed[mask].mean() > 0.5 and not changed[~mask].any()
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    assert rows.min() >= 0.14 * h and rows.max() <= 0.86 * h and cols.min() >= 0.14 * w and cols.max() <= 0.86 * w


def test_evaluate_writes_metrics_and_reports(lite0_onnx, tmp_path):
    root = write_elpv_category(tmp_path / "data" / "cells", n_train=12, n_good=3, n_per_type=1, seed=3)
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--data",
            str(tmp_path / "data"),
            "--model",
            str(lite0_onnx),
            "--out",
            str(out),
            "--k-gallery",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    result = json.loads((out / "cells" / "results.json").read_text())
    m = result["metrics"]
    assert m["images"] == 7 and m["defective"] == 4
    for key in ("image_auroc", "image_auroc_max_pixel", "pixel_auroc", "aupro"):
        assert 0.5 < m[key] <= 1.0, key
    assert set(result["per_type"]) == set(KINDS)
    assert len(result["worst"]["false_positives"]) == 3 and len(result["worst"]["false_negatives"]) == 3
    md = (out / "report.md").read_text()
    assert "| cells |" in md and "Worst false negatives" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7  # curves + 6 worst cases, embedded
    assert (out / root.name / "cells-curves.png").is_file()


def test_evaluate_refuses_a_folder_without_categories(lite0_onnx, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--data", str(tmp_path), "--model", str(lite0_onnx)])
    assert res.exit_code == 1 and "no MVTec AD category" in res.output
