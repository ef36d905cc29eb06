"""Compressed galleries: stored precisions, projections, coresets, growth and shrinkage."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from spade_edge.runtime import Detector, Gallery, SpadeConfig
from spade_edge.runtime.build import (
    add_images,
    extract,
    gallery_from_images,
    remove_images,
)
from spade_edge.runtime.codec import Storage, fit_codec, kcenter
from spade_edge.runtime.features import backend_from_model
from spade_edge.runtime.gallery import write_gallery
from spade_edge.runtime.images import Preprocess

from ..conftest import tiny_onnx


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "tiny.onnx"
    tiny_onnx(model, size=32)
    rng = np.random.default_rng(0)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(14):
        img = rng.integers(60, 200, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return backend_from_model(model), sorted(folder.iterdir())


def build(backend, images, out, **kw):
    kw.setdefault("config", SpadeConfig(k_image=3, k_gallery=4, mode="per-level", score="top-pixels"))
    return gallery_from_images(backend, images, out, holdout=0.0, show_progress=False, **kw)


def test_fp32_round_trip_is_exact(setup, tmp_path):
    backend, images = setup
    g = build(backend, images, tmp_path / "g.gallery", storage=Storage.exact())
    feats, _, _ = extract(backend, [str(p) for p in images], Preprocess(32), show=False)
    for j, f in enumerate(feats):
        for n in ("a", "b"):
            np.testing.assert_array_equal(g.levels[n].rows(j), f[n].reshape(-1, 3))
        np.testing.assert_array_equal(g.global_features[j], f["global"])


def test_fp16_and_int8_errors_are_bounded(setup, tmp_path):
    backend, images = setup
    feats, _, _ = extract(backend, [str(p) for p in images], Preprocess(32), show=False)
    ref = {n: np.stack([f[n].reshape(-1, 3) for f in feats]) for n in ("a", "b")}
    g16 = build(backend, images, tmp_path / "h.gallery", storage=Storage.exact(precision="fp16"))
    g8 = build(backend, images, tmp_path / "q.gallery", storage=Storage.exact(precision="int8"))
    for n in ("a", "b"):
        x16 = np.stack([g16.levels[n].rows(j) for j in range(len(images))])
        # fp16 keeps 11 significant bits: relative error <= 2^-11
        assert (np.abs(x16 - ref[n]) <= np.abs(ref[n]) * 2.0**-11 + 1e-7).all()
        x8 = np.stack([g8.levels[n].rows(j) for j in range(len(images))])
        scale = g8.levels[n].codec.scale
        # int8 symmetric per channel: error <= half a step of that channel's scale
        assert (np.abs(x8 - ref[n]) <= scale / 2 * (1 + 1e-5)).all()
        assert g8.levels[n].data.dtype == np.int8 and g16.levels[n].data.dtype == np.float16


def test_pca_keeping_every_channel_preserves_distances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32) @ rng.normal(size=(8, 8)).astype(np.float32)
    codec = fit_codec(x, Storage.exact(projection="pca", keep=1.0))
    y = codec.project(x)
    d_x = ((x[:50, None] - x[None, 50:100]) ** 2).sum(-1)
    d_y = ((y[:50, None] - y[None, 50:100]) ** 2).sum(-1)
    np.testing.assert_allclose(d_y, d_x, rtol=1e-3, atol=1e-3)
    # keeping half the channels keeps the leading variance
    half = fit_codec(x, Storage.exact(projection="pca", keep=0.5)).project(x)
    assert half.shape == (500, 4) and half.var(0).sum() >= 0.5 * y.var(0).sum()


@pytest.mark.parametrize(
    "storage",
    [
        Storage.exact(projection="random", keep=0.67),
        Storage(projection="pca", keep=0.67, precision="int8", coreset=1.0),
    ],
)
def test_projected_gallery_scores_through_the_same_projection(setup, tmp_path, storage):
    backend, images = setup
    g = build(
        backend,
        images[:12],
        tmp_path / "p.gallery",
        storage=storage,
        config=SpadeConfig(k_image=3, k_gallery=4, mode="concat", score="top-pixels"),
    )
    assert g.levels["a"].channels == 2 and g.levels["a"].codec.proj.shape == (3, 2)
    det = Detector(backend, g)
    same = det.predict(str(images[0]))  # an image of the gallery matches itself: distance ~ 0
    other = det.predict(np.full((40, 40, 3), 250, np.uint8))
    assert same.anomaly_map.max() < 0.05 * other.anomaly_map.max()


def test_one_default_for_the_command_line_and_the_python_api(setup, tmp_path):
    """runtime/codec.py defines the storage default once: `gallery build` without storage options and
    gallery_from_images without ``storage`` store the same (int8, a coreset in per-level mode; every
    pixel in concat mode, which needs them all)."""
    from click.testing import CliRunner

    from spade_edge.cli import main
    from spade_edge.runtime.codec import DEFAULT_CORESET, DEFAULT_PRECISION

    backend, images = setup
    assert Storage() == Storage.default() == Storage.default("per-level")
    assert (Storage().precision, Storage().coreset) == (DEFAULT_PRECISION, DEFAULT_CORESET)
    assert Storage.default("concat").coreset == 1.0 and Storage.default("concat", coreset=0.5).coreset == 0.5
    for mode in ("per-level", "concat"):
        api = gallery_from_images(
            backend,
            images,
            tmp_path / f"api-{mode}.gallery",
            holdout=0.0,
            show_progress=False,
            config=SpadeConfig(mode=mode, score="top-pixels"),
        )
        res = CliRunner().invoke(
            main,
            [
                "gallery",
                "build",
                "-m",
                str(tmp_path / "tiny.onnx"),
                "-i",
                str(images[0].parent),
                "-o",
                str(tmp_path / f"cli-{mode}.gallery"),
                "--holdout",
                "0",
                "--mode",
                mode,
                "--score",
                "top-pixels",
            ],
        )
        assert res.exit_code == 0, res.output
        cli = Gallery.load(tmp_path / f"cli-{mode}.gallery")
        assert cli.storage == api.storage == Storage.default(mode).to_dict()
        assert api.levels["a"].coreset == (mode == "per-level") and api.levels["a"].data.dtype == np.int8


def test_kcenter_covers_the_extremes():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [5.0]], np.float32)
    picked = kcenter(x, 3)
    assert picked[0] == 4 and picked[1] == 0  # farthest from the mean first, then the farthest from it
    assert set(picked) == {4, 0, 5}


def test_coreset_gallery_per_level_and_correspondences(setup, tmp_path):
    backend, images = setup
    g = build(backend, images, tmp_path / "c.gallery", storage=Storage(coreset=0.25))
    st = g.levels["a"]
    assert st.coreset and len(st.rows(0)) == 16 and st.offsets[-1] == 16 * len(images)  # 8 x 8 grid, 25%
    p = Detector(backend, g).predict(str(images[0]))
    c = p.correspondence
    for y in range(8):
        for x in range(8):
            j = int(c.image[y, x])
            kept = {tuple(v) for v in st.yx[st.offsets[j] : st.offsets[j + 1]]}
            assert (c.y[y, x], c.x[y, x]) in kept
    with pytest.raises(ValueError, match="per-level"):
        build(backend, images, tmp_path / "x.gallery", storage=Storage(coreset=0.25), config=SpadeConfig(mode="concat"))


@pytest.mark.parametrize(
    "storage",
    [
        Storage.exact(),
        Storage(),
        Storage(precision="int8", projection="pca", keep=0.67),
        Storage(precision="fp16", coreset=0.5),
    ],
)
def test_add_and_remove_equal_a_rebuild(setup, tmp_path, storage):
    backend, images = setup
    a, b = images[:9], images[9:]
    full = build(backend, a + b, tmp_path / "full.gallery", storage=storage)
    codecs = {n: st.codec for n, st in full.levels.items()}
    # grow: A, then add B == A + B built from scratch with the same codecs
    build(backend, a, tmp_path / "grown.gallery", storage=storage, codecs=codecs)
    grown = add_images(tmp_path / "grown.gallery", backend, b, show_progress=False)
    # shrink: A + B, then remove B == A
    shrunk = remove_images(tmp_path / "full.gallery", [p.name for p in b], out=tmp_path / "shrunk.gallery")
    only_a = build(backend, a, tmp_path / "a.gallery", storage=storage, codecs=codecs)
    for got, want in ((grown, full), (shrunk, only_a)):
        assert got.names == want.names
        np.testing.assert_array_equal(got.global_features, want.global_features)
        for n in ("a", "b"):
            np.testing.assert_array_equal(got.levels[n].data, want.levels[n].data)
            if want.levels[n].coreset:
                np.testing.assert_array_equal(got.levels[n].offsets, want.levels[n].offsets)
                np.testing.assert_array_equal(got.levels[n].yx, want.levels[n].yx)
        probe = np.asarray(Image.open(images[3]))
        p, q = Detector(backend, got).predict(probe), Detector(backend, want).predict(probe)
        assert p.score == q.score and np.array_equal(p.anomaly_map, q.anomaly_map)
    if storage.precision == "fp32" and storage.projection == "none":  # nothing fitted: a plain rebuild is equal too
        plain = build(backend, a + b, tmp_path / "plain.gallery", storage=storage)
        np.testing.assert_array_equal(grown.levels["a"].data, plain.levels["a"].data)


def test_add_refuses_duplicates_and_remove_unknown_names(setup, tmp_path):
    from spade_edge.runtime.errors import GalleryError

    backend, images = setup
    build(backend, images[:6], tmp_path / "g.gallery")
    with pytest.raises(GalleryError, match="already in the gallery"):
        add_images(tmp_path / "g.gallery", backend, images[:1], show_progress=False)
    with pytest.raises(GalleryError, match="not in the gallery"):
        remove_images(tmp_path / "g.gallery", ["nope.png"])
    with pytest.raises(GalleryError, match="empty"):
        remove_images(tmp_path / "g.gallery", [p.name for p in images[:6]])
    assert len(Gallery.load(tmp_path / "g.gallery")) == 6


def test_killed_build_leaves_the_previous_gallery(setup, tmp_path):
    backend, images = setup
    out = tmp_path / "g.gallery"
    build(backend, images[:5], out)
    before = out.read_bytes()
    many = tmp_path / "many"
    many.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(many / f"{i:03d}.png")
    # every batch of features takes a while, so the kill lands in the middle of the build
    code = textwrap.dedent(f"""
        import time
        import spade_edge.runtime.build as build
        from spade_edge.runtime.features import backend_from_model
        from spade_edge.runtime.images import list_images
        slow = build.extract
        build.extract = lambda *a, **k: (time.sleep(10), slow(*a, **k))[1]
        build.gallery_from_images(backend_from_model({str(tmp_path / "tiny.onnx")!r}), list_images({str(many)!r}),
                                  {str(out)!r}, show_progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        proc.wait(timeout=3.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0, "the build finished before it could be killed"
    assert out.read_bytes() == before and len(Gallery.load(out)) == 5


def test_loading_a_large_gallery_maps_instead_of_reading(tmp_path):
    # 1 GB of int8 pixel features: loading (checksums included) must not make them resident
    n, grid, c = 1024, (32, 32), 1024
    path = tmp_path / "big.gallery"
    level = np.lib.format.open_memmap(tmp_path / "tmp.npy", mode="w+", dtype=np.int8, shape=(n, *grid, c))
    level[::50] = 1
    write_gallery(
        path,
        [f"{i}" for i in range(n)],
        {"global": np.zeros((n, 8), np.float32), "level/x": level},
        {"model": {"fingerprint": "sha256:x"}, "levels": {"x": {"grid": list(grid)}}},
    )
    del level
    (tmp_path / "tmp.npy").unlink()
    code = textwrap.dedent(f"""
        import re
        def rss():
            return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        from spade_edge.runtime.gallery import Gallery
        before = rss()
        g = Gallery.load({str(path)!r})
        rows = g.levels["x"].rows(3)  # scoring touches one image at a time
        print(rss() - before, g.levels["x"].data.nbytes)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew, size = map(int, out.stdout.split())
    assert size >= 1 << 30 and grew < 50 << 20, f"resident memory grew by {grew / 2**20:.1f} MB"
