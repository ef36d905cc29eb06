"""The GPU scorer (runtime/scoring/cuda.py, kernels/topk.cu) without a GPU (DESIGN.md section 4):
CuPy and pycuda stand-ins (tests/standins) hold the memory and run cuBLAS's GemmEx in numpy; the kernels
are the .cu compiled as C++ with tests/runtime/cuda_shim.h, a block's threads as fibers that meet at
__syncthreads.

What is proven: neighbours equal a float64 brute-force search (ties to the lower gallery index, near
ties included) for fp32, fp16 and int8 galleries, per level and for the concatenated pyramid, through
CuPy's RawModule and through pycuda's SourceModule, on both paths: the fine level's product fused with
the selection (kernel fused_select, the shim's wmma emulation doing the tensor cores' part; asserted
taken from ``stats``) and every product through memory (``fused=False``); the screen's exact search again of rows it cannot
settle runs (and is exact); launches per image are counted where they are made and agree with what the
stand-ins saw; an attached gallery is not uploaded again per request.
"""

from __future__ import annotations

import numpy as np
import pytest

from spade_edge.runtime.codec import LevelCodec
from spade_edge.runtime.gallery import Gallery, LevelStore
from spade_edge.runtime.resample import interp_matrix
from spade_edge.runtime.scoring.cuda import CudaScorer

from ..scorer_contract import check_near_ties_are_decided_exactly, check_reads_the_gallery_view
from ..standins import use_standins

LOADERS = ["cupy", "pycuda"]


@pytest.fixture
def standins(monkeypatch):
    use_standins(monkeypatch)
    import _standin_cuda

    return _standin_cuda


# ---------------------------------------------------------------------------------------------
# references


def brute(q64: np.ndarray, g64: np.ndarray, kappa: int):
    """float64 distances of every pair, the kappa smallest per row, ties to the lower index."""
    d = ((q64[:, None, :] - g64[None]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :kappa]
    return idx, np.take_along_axis(d, idx, 1), d


def up64(x: np.ndarray, grid) -> np.ndarray:
    """Bilinear upsampling in float64 (the same weights as resample.interp_matrix): (H * W, C)."""
    x = np.asarray(x, np.float64)
    ay = interp_matrix(grid[0], x.shape[0]).astype(np.float64)
    ax = interp_matrix(grid[1], x.shape[1]).astype(np.float64)
    t = np.einsum("Yh,hwc->Ywc", ay, x)
    return np.einsum("Xw,Ywc->YXc", ax, t).reshape(grid[0] * grid[1], -1)


def assert_exact(top, idx, dist, d_all):
    np.testing.assert_array_equal(top.indices, idx)
    np.testing.assert_array_equal(top.distances, dist.astype(np.float32))
    assert top.indices.dtype == np.int64 and top.distances.dtype == np.float32


def stored(data64: np.ndarray, precision: str):
    """(stored array, scale) and its decoded float64 values, as the gallery's codec decodes them."""
    if precision == "fp32":
        s = data64.astype(np.float32)
        return s, None, s.astype(np.float64)
    if precision == "fp16":
        s = data64.astype(np.float16)
        return s, None, s.astype(np.float64)
    peak = np.abs(data64).reshape(-1, data64.shape[-1]).max(axis=0)
    scale = (np.maximum(peak, 1e-12) / 127.0).astype(np.float32)
    s = np.clip(np.rint(data64 / scale), -127, 127).astype(np.int8)
    return s, scale, (s.astype(np.float32) * scale).astype(np.float64)


def near_tie_rows(rng, m: int, dim: int) -> np.ndarray:
    """Rows with exact duplicates and near-duplicates (one channel moved by 2^-12): distance ties and
    differences far below what an fp16 product can resolve."""
    base = rng.integers(-6, 7, (m // 3, dim)).astype(np.float64) / 4
    g = base[rng.integers(0, len(base), m)]
    g[::5, 0] += 2.0**-12
    return g


# ---------------------------------------------------------------------------------------------
# per-level search (topk)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("kappa", [1, 4])
def test_topk_equals_float64_search(standins, loader, precision, kappa, fused):
    rng = np.random.default_rng(kappa)
    g64 = near_tie_rows(rng, 230, 20)
    q = (g64[rng.integers(0, 230, 70)] + rng.integers(-1, 2, (70, 20)) / 8).astype(np.float32)
    q[:5] = g64[:5]  # queries on gallery rows: distance 0, and its duplicates tie at 0
    data, scale, dec = stored(g64.reshape(230, 1, 1, 20).repeat(1, 0), precision)
    # a gallery of 10 images of 23 rows as the gallery file stores them (dense 23 x 1 grid)
    levels = {"l": LevelStore(data.reshape(10, 23, 1, 20), (23, 1), LevelCodec(scale=scale))}
    gallery = Gallery([f"i{j}" for j in range(10)], np.zeros((10, 2), np.float32), levels, {})
    scorer = CudaScorer(loader=loader, fused=fused)
    scorer.attach(gallery)
    images = [7, 2, 9, 0, 5]  # the retrieved images, in the order image_knn gives them
    view = gallery.level_view("l", images)
    top = scorer.topk(q, view, kappa)
    g_sel = np.concatenate([dec.reshape(10, 23, 20)[j] for j in images])
    idx, dist, d_all = brute(q.astype(np.float64), g_sel, kappa)
    assert_exact(top, idx, dist, d_all)
    assert scorer.stats["uploaded_gallery"] is False and scorer.stats["loader"] == loader
    assert scorer.stats["path"] == ("cuda fused fp16 screen" if fused else "cuda fp16 screen")  # 20 channels
    # plain arrays (no attached gallery): the same answer
    plain = CudaScorer(loader=loader, fused=fused).topk(q, [np.asarray(view[j]) for j in range(len(images))], kappa)
    assert_exact(plain, idx, dist, d_all)


@pytest.mark.parametrize("loader", LOADERS)
def test_fused_kernel_walks_several_column_tiles_per_split(standins, loader):
    """Beyond MAX_SPLITS x 64 columns each split of fused_select walks several column tiles, its lists
    carried from tile to tile; 70 query rows: a full block of 64 and a partial one; 24 channels: one
    zero-padded step of 32; blocks of every stored dtype and uneven sizes."""
    from spade_edge.runtime.scoring.cuda import FT_COLS, MAX_SPLITS

    rng = np.random.default_rng(21)
    g64 = near_tie_rows(rng, 2700, 24)
    g64[2000:] = rng.normal(size=(700, 24))
    q = np.concatenate([g64[rng.integers(0, 2700, 60)] + rng.normal(size=(60, 24)) / 8, g64[:10]]).astype(np.float32)
    cuts = [0, 1000, 1001, 1900, 2700]
    kinds = [np.float32, np.float16, np.float32, np.float16]
    blocks = [g64[a:b].astype(kind) for a, b, kind in zip(cuts, cuts[1:], kinds)]
    int8 = np.clip(np.rint(g64[1900:] * 16), -127, 127).astype(np.int8)  # an int8 block: its values as stored
    blocks[3] = int8
    g_dec = np.concatenate([b.astype(np.float64) for b in blocks])
    scorer = CudaScorer(loader=loader)
    top = scorer.topk(q, blocks, 4)
    assert scorer.stats["path"] == "cuda fused fp16 screen"
    assert scorer.stats["splits"] < -(-len(g_dec) // FT_COLS) and scorer.stats["splits"] <= MAX_SPLITS, scorer.stats
    idx, dist, d_all = brute(q.astype(np.float64), g_dec, 4)
    assert_exact(top, idx, dist, d_all)


def test_topk_blocks_of_mixed_dtypes_and_uneven_sizes(standins):
    rng = np.random.default_rng(5)
    g = rng.integers(-4, 5, (300, 12)).astype(np.float32)
    q = rng.integers(-4, 5, (130, 12)).astype(np.float32)
    blocks = [g[:150], g[150:151].astype(np.float16), g[151:].astype(np.int8)]
    top = CudaScorer().topk(q, blocks, 10)
    idx, dist, d_all = brute(q.astype(np.float64), g.astype(np.float64), 10)
    assert_exact(top, idx, dist, d_all)


def test_rows_the_screen_cannot_settle_are_searched_again_exactly(standins):
    # far from the origin (|g|^2 ~ 5.8e6) the fp16 screen's bound (~1e-3 |q||g|) covers every row:
    # no row can be settled from kappa + SPARE candidates, every one is searched again exactly
    scorer = CudaScorer()
    check_near_ties_are_decided_exactly(scorer)
    assert scorer.stats["rescored_rows"] == 3 and scorer.stats["fused"] is True  # 64 channels
    # and a mix: rows near the origin settle, rows of a far cluster do not
    rng = np.random.default_rng(11)
    near = rng.normal(size=(200, 16))
    far = 300 + rng.normal(size=(200, 16)) * 1e-3
    g = np.concatenate([near, far]).astype(np.float32)
    q = np.concatenate([near[:30] + 0.3, far[:20] + 1e-4]).astype(np.float32)
    top = scorer.topk(q, [g[:123], g[123:]], 3)
    idx, dist, d_all = brute(q.astype(np.float64), g.astype(np.float64), 3)
    assert_exact(top, idx, dist, d_all)
    assert 0 < scorer.stats["rescored_rows"] < len(q), scorer.stats
    assert scorer.stats["rescored_rows"] >= 20  # the far cluster's rows at least
    assert scorer.stats["path"] == "cuda fused fp16 screen"  # 16 channels: fused


def test_reads_the_gallery_view(standins):
    check_reads_the_gallery_view(CudaScorer())


def test_gallery_beyond_the_tile_goes_through_in_chunks(standins):
    rng = np.random.default_rng(2)
    g = near_tie_rows(rng, 400, 10)
    q = (g[:60] + rng.normal(size=(60, 10)) * 0.1).astype(np.float32)
    blocks = [g[i : i + 40].astype(np.float32) for i in range(0, 400, 40)]
    scorer = CudaScorer(tile_bytes=60 * 40 * 4 * 3)  # three images' products at a time
    top = scorer.topk(q, blocks, 5)
    assert scorer.stats["chunks"] == 4
    idx, dist, d_all = brute(q.astype(np.float64), g.astype(np.float32).astype(np.float64), 5)
    assert_exact(top, idx, dist, d_all)


# ---------------------------------------------------------------------------------------------
# the concatenated pyramid (topk_pyramid)

GRID = (8, 8)
SHAPES = [(8, 8, 6), (4, 4, 10), (2, 2, 12)]  # fine, stride 2, stride 4: 6 fine channels, not fused
# fused: 81 query rows (a full block of 64 and a partial one), 40 fine channels (two steps of 32, the
# second zero-padded), coarse grids that do not divide the fine one
FUSED_GRID = (9, 9)
FUSED_SHAPES = [(9, 9, 40), (5, 5, 24), (3, 3, 12)]
PYRAMIDS = [
    pytest.param(SHAPES, GRID, "cuda fp16 screen levels", id="through-memory"),
    pytest.param(FUSED_SHAPES, FUSED_GRID, "cuda fused fp16 screen levels", id="fused"),
]


def pyramid_gallery(rng, n_images: int, precision: str, shapes=SHAPES):
    """Dense levels with duplicate and near-duplicate images; the stored gallery and decoded float64 maps."""
    maps = {}
    for i, (h, w, c) in enumerate(shapes):
        x = rng.integers(-4, 5, (n_images, h, w, c)).astype(np.float64) / 2
        x[3] = x[1]  # a duplicate image: exact ties with image 1
        x[4] = x[1]
        x[4, 0, 0, 0] += 2.0**-10  # a near-duplicate
        maps[f"l{i}"] = x
    levels, decoded = {}, {}
    for name, x in maps.items():
        data, scale, dec = stored(x, precision)
        levels[name] = LevelStore(data, x.shape[1:3], LevelCodec(scale=scale))
        decoded[name] = dec
    gallery = Gallery([f"i{j}" for j in range(n_images)], np.zeros((n_images, 2), np.float32), levels, {})
    return gallery, decoded


@pytest.mark.parametrize(("shapes", "grid", "path"), PYRAMIDS)
@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_pyramid_equals_float64_search_of_the_upsampled_concatenation(standins, loader, precision, shapes, grid, path):
    GRID = grid  # noqa: N806 (the module's grid, per case)
    rng = np.random.default_rng(len(precision))
    gallery, decoded = pyramid_gallery(rng, 7, precision, shapes)
    names = list(decoded)
    images = [4, 1, 6, 3, 0]
    # the query: gallery image 1 slightly moved (distances near 0 tie across the duplicates 1, 3, 4)
    query = [(decoded[n][1] + rng.integers(-1, 2, decoded[n][1].shape) / 16).astype(np.float32) for n in names]
    scorer = CudaScorer(loader=loader)
    scorer.attach(gallery)
    kappa = 5
    top = scorer.topk_pyramid(query, gallery.pyramid_view(names, images, GRID), GRID, kappa)
    q64 = np.concatenate([up64(x, GRID) for x in query], axis=1)
    g64 = np.concatenate([np.concatenate([up64(decoded[n][j], GRID) for n in names], axis=1) for j in images])
    idx, dist, d_all = brute(q64, g64, kappa)
    assert_exact(top, idx, dist, d_all)
    assert scorer.stats["path"] == path and scorer.stats["uploaded_gallery"] is False
    # the same through plain level maps (uploaded for this search)
    plain = CudaScorer(loader=loader).topk_pyramid(
        query, [[decoded[n][j].astype(np.float32) for n in names] for j in images], GRID, kappa
    )
    assert_exact(plain, idx, dist, d_all)


@pytest.mark.parametrize(("shapes", "grid", "path"), PYRAMIDS)
def test_pyramid_rows_the_screen_cannot_settle(standins, shapes, grid, path):
    # every image a tiny perturbation of one far-off pyramid: the screen proves nothing, rows are searched again
    GRID = grid  # noqa: N806 (the module's grid, per case)
    rng = np.random.default_rng(4)
    base = [200 + rng.normal(size=s) for s in shapes]
    images = [[(b + rng.normal(size=b.shape) * 1e-3).astype(np.float32) for b in base] for _ in range(4)]
    query = [(b + rng.normal(size=b.shape) * 1e-3).astype(np.float32) for b in base]
    scorer = CudaScorer()
    top = scorer.topk_pyramid(query, images, GRID, 3)
    assert scorer.stats["rescored_rows"] > 0 and scorer.stats["path"] == path, scorer.stats
    q64 = np.concatenate([up64(x, GRID) for x in query], axis=1)
    g64 = np.concatenate([np.concatenate([up64(x, GRID) for x in img], axis=1) for img in images])
    idx, dist, d_all = brute(q64, g64, 3)
    assert_exact(top, idx, dist, d_all)


@pytest.mark.parametrize("fused", [True, False])
def test_launches_per_image_are_counted_and_few(standins, fused):
    """A WRN50x2-like pyramid scaled down (channels 256/512/1024 -> 16/32/64, grid 56 -> 14, strides
    4/8/16), K = 10: the scorer's own count equals what the stand-ins saw (kernels, GEMMs, CuPy
    operations), and stays within 20 per image, the gallery's one-off norms included. Fused: the fine
    level's product is made inside the selection kernel, no GEMM for it."""
    rng = np.random.default_rng(9)
    shapes = [(14, 14, 16), (7, 7, 32), (4, 4, 64)]
    n = 12
    levels = {
        f"layer{i + 1}": LevelStore(rng.normal(size=(n, h, w, c)).astype(np.float16), (h, w))
        for i, (h, w, c) in enumerate(shapes)
    }
    gallery = Gallery([f"i{j}" for j in range(n)], np.zeros((n, 2), np.float32), levels, {})
    scorer = CudaScorer(fused=fused)
    scorer.attach(gallery)
    names = list(levels)
    for _ in range(2):
        query = [rng.normal(size=s).astype(np.float32) for s in shapes]
        before = dict(standins.counters)
        scorer.topk_pyramid(query, gallery.pyramid_view(names, range(10), (14, 14)), (14, 14), 5)
        seen = {k: standins.counters.get(k, 0) - before.get(k, 0) for k in ("kernels", "gemm", "ops")}
        assert scorer.stats["launches"] == sum(seen.values()), (scorer.stats, seen)
        assert seen["gemm"] == (2 if fused else 3)  # a product per level through memory, at native resolution
        assert scorer.stats["launches"] <= 20, scorer.stats
        assert scorer.stats["fused"] is fused
    # once the norms are kept: query, gather, GEMMs (the coarse levels'; all three unfused), select, decide
    assert scorer.stats["launches"] == (6 if fused else 7)


def test_an_attached_gallery_is_not_uploaded_per_request(standins):
    rng = np.random.default_rng(6)
    shapes, grid = [(16, 16, 24), (8, 8, 40), (4, 4, 48)], (16, 16)
    levels = {
        f"l{i}": LevelStore(rng.integers(-127, 128, (6, h, w, c)).astype(np.int8), (h, w), LevelCodec(
            scale=np.full(c, 0.01, np.float32)))
        for i, (h, w, c) in enumerate(shapes)
    }  # fmt: skip
    gallery = Gallery([f"i{j}" for j in range(6)], np.zeros((6, 2), np.float32), levels, {})
    names = list(levels)
    image_bytes = sum(s.data[0].nbytes for s in levels.values())  # int8: 9.5 kB an image
    query_bytes = sum(4 * h * w * c for h, w, c in shapes)
    metadata = 8192  # descriptors, image list, bilinear taps, counters: less than one image
    assert metadata < image_bytes
    scorer = CudaScorer()
    before = standins.counters.get("h2d_bytes", 0)
    scorer.attach(gallery)
    assert standins.counters["h2d_bytes"] - before >= 6 * image_bytes  # the whole gallery, once
    for images in ([0, 1, 2], [5, 3, 1, 0]):
        query = [rng.normal(size=s).astype(np.float32) for s in shapes]
        before = standins.counters["h2d_bytes"]
        scorer.topk_pyramid(query, gallery.pyramid_view(names, images, grid), grid, 2)
        sent = standins.counters["h2d_bytes"] - before
        assert query_bytes <= sent < query_bytes + metadata, sent  # not one retrieved image's features
    # the same search without the attached gallery does upload the retrieved images: the check can fail
    before = standins.counters["h2d_bytes"]
    CudaScorer().topk_pyramid(query, gallery.pyramid_view(names, images, grid), grid, 2)
    assert standins.counters["h2d_bytes"] - before > query_bytes + len(images) * image_bytes


def test_query_already_on_the_device(standins):
    import cupy

    rng = np.random.default_rng(12)
    gallery, decoded = pyramid_gallery(rng, 5, "fp16")
    names = list(decoded)
    query = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    scorer = CudaScorer()
    scorer.attach(gallery)
    view = gallery.pyramid_view(names, [0, 2, 4], GRID)
    host = scorer.topk_pyramid(query, view, GRID, 3)
    before = standins.counters.get("h2d_bytes", 0)
    on_device = [cupy.asarray(x) for x in query]
    uploaded_query = standins.counters["h2d_bytes"] - before
    dev = scorer.topk_pyramid(on_device, view, GRID, 3)
    assert standins.counters["h2d_bytes"] - before - uploaded_query < 4096  # descriptors only
    np.testing.assert_array_equal(dev.indices, host.indices)
    np.testing.assert_array_equal(dev.distances, host.distances)


def test_reattaching_replaces_the_gallery(standins):
    rng = np.random.default_rng(13)
    g1, d1 = pyramid_gallery(rng, 5, "fp32")
    g2, d2 = pyramid_gallery(rng, 6, "fp16")
    names = list(d1)
    query = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    scorer = CudaScorer()
    scorer.attach(g1)
    scorer.attach(g2)  # a reload (gallery add): the new gallery is on the device
    top = scorer.topk_pyramid(query, g2.pyramid_view(names, [5, 0], GRID), GRID, 2)
    assert scorer.stats["uploaded_gallery"] is False
    q64 = np.concatenate([up64(x, GRID) for x in query], axis=1)
    g64 = np.concatenate([np.concatenate([up64(d2[n][j], GRID) for n in names], axis=1) for j in [5, 0]])
    idx, dist, d_all = brute(q64, g64, 2)
    assert_exact(top, idx, dist, d_all)
    # a view of the old gallery is not read from the device copy of the new one
    scorer.topk_pyramid(query, g1.pyramid_view(names, [0, 1], GRID), GRID, 2)
    assert scorer.stats["uploaded_gallery"] is True


# ---------------------------------------------------------------------------------------------
# the user's entry point


@pytest.mark.parametrize(
    ("mode", "precision", "coreset"), [("concat", "int8", 1.0), ("concat", "fp16", 1.0), ("per-level", "int8", 0.5)]
)
def test_detector_on_cuda_predicts_as_on_the_cpu(tmp_path, monkeypatch, mode, precision, coreset):
    """Detector.load(device="cuda") on the stand-ins: the CUDA scorer, the gallery attached once at load,
    the same maps, scores and verdicts as the CPU path."""
    from PIL import Image

    from spade_edge.runtime import Detector, SpadeConfig
    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.codec import Storage
    from spade_edge.runtime.features import backend_from_model

    from ..conftest import tiny_onnx
    from ..standins import use_ort_gpu_providers

    model = tmp_path / "tiny.onnx"
    tiny_onnx(model)
    rng = np.random.default_rng(0)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(100, 140, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    images = sorted(folder.iterdir())
    cfg = SpadeConfig(k_image=2, k_gallery=6, kappa=3, mode=mode)
    gallery_from_images(
        backend_from_model(model),
        images,
        tmp_path / "g.gallery",
        config=cfg,
        storage=Storage(precision=precision, coreset=coreset),
        show_progress=False,
    )
    cpu = Detector.load(model, tmp_path / "g.gallery", device="cpu")
    use_standins(monkeypatch)
    use_ort_gpu_providers(monkeypatch)
    det = Detector.load(model, tmp_path / "g.gallery", device="cuda")
    assert det.scorer.name == "cuda", det.device
    tests = [*images[:2], rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)]
    for image in tests:
        want, got = cpu.predict(image), det.predict(image)
        assert got.verdict == want.verdict
        assert got.score == pytest.approx(want.score, rel=1e-4)
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-4, atol=1e-6)
        stats = det.scorer.stats
        assert stats["uploaded_gallery"] is False, stats  # read from the copy attached at load
        fused = "fused " if stats["fused"] else ""
        assert stats["path"] == f"cuda {fused}fp16 screen" + (" levels" if mode == "concat" else "")
        assert stats["launches"] <= 20, stats
    det.close()


def test_everything_on_the_device_counts_every_launch(standins):
    """Query and gallery maps handed over as CuPy arrays (fp16 gallery maps: cast on the device): no
    upload but descriptors, and the scorer's launch count still equals what the stand-ins saw."""
    import cupy

    rng = np.random.default_rng(14)
    images = [[rng.normal(size=s).astype(np.float16) for s in SHAPES] for _ in range(3)]
    query = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    host = CudaScorer().topk_pyramid(query, images, GRID, 2)
    on_device = [[cupy.asarray(x) for x in img] for img in images]
    q_dev = [cupy.asarray(x) for x in query]
    scorer = CudaScorer()
    scorer.topk_pyramid(q_dev, on_device, GRID, 2)  # compiles, warms up
    before = dict(standins.counters)
    top = scorer.topk_pyramid(q_dev, on_device, GRID, 2)
    seen = {k: standins.counters.get(k, 0) - before.get(k, 0) for k in ("kernels", "gemm", "ops", "h2d_bytes")}
    assert scorer.stats["launches"] == seen["kernels"] + seen["gemm"] + seen["ops"], (scorer.stats, seen)
    assert seen["h2d_bytes"] < 4096  # descriptors only
    np.testing.assert_array_equal(top.indices, host.indices)
    np.testing.assert_array_equal(top.distances, host.distances)


def test_a_gallery_too_big_for_the_device_is_scored_uploading_per_request(standins, monkeypatch):
    from spade_edge.runtime.scoring import cuda_gallery

    class OutOfMemoryError(MemoryError):  # as cupy.cuda.memory.OutOfMemoryError is named
        pass

    def no_room(cp, gallery):
        raise OutOfMemoryError("Out of memory allocating 9,000,000,000 bytes")

    rng = np.random.default_rng(15)
    gallery, decoded = pyramid_gallery(rng, 5, "fp16")
    names = list(decoded)
    scorer = CudaScorer()
    monkeypatch.setattr(cuda_gallery, "from_gallery", no_room)
    with pytest.warns(UserWarning, match="does not fit on GPU 0"):
        scorer.attach(gallery)
    query = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    top = scorer.topk_pyramid(query, gallery.pyramid_view(names, [4, 2], GRID), GRID, 2)
    assert scorer.stats["uploaded_gallery"] is True
    q64 = np.concatenate([up64(x, GRID) for x in query], axis=1)
    g64 = np.concatenate([np.concatenate([up64(decoded[n][j], GRID) for n in names], axis=1) for j in [4, 2]])
    idx, dist, d_all = brute(q64, g64, 2)
    assert_exact(top, idx, dist, d_all)
    with pytest.raises(RuntimeError, match="other"):  # any other failure is not swallowed
        monkeypatch.setattr(cuda_gallery, "from_gallery", lambda cp, g: (_ for _ in ()).throw(RuntimeError("other")))
        scorer.attach(gallery)


# ---------------------------------------------------------------------------------------------
# the accumulation term of the bound, against a model of the tensor cores


def block_fma_dot(a16: np.ndarray, b16: np.ndarray, block: int) -> float:
    """A dot product as Fasi, Higham, Mikaitis and Pranesh (2021) found NVIDIA's tensor cores make it:
    ``block`` exact fp16 products at a time added to the fp32 accumulator by aligning every addend to
    the largest one's exponent, truncating the bits below its 24-bit significand, then truncating the
    sum to 24 bits (round toward zero). float64 holds every intermediate exactly."""

    def trunc(x: float, ulp: float) -> float:
        return float(np.trunc(x / ulp) * ulp)

    prods = a16.astype(np.float64) * b16.astype(np.float64)  # exact
    acc = 0.0
    for s in range(0, len(prods), block):
        addends = [acc, *prods[s : s + block]]
        top = max(abs(x) for x in addends)
        if top == 0.0:
            continue
        ulp = 2.0 ** (np.frexp(top)[1] - 24)
        total = sum(trunc(x, ulp) for x in addends)
        acc = trunc(total, 2.0 ** (np.frexp(total)[1] - 24)) if total else 0.0
    return acc


@pytest.mark.parametrize("block", [1, 4, 8, 16])
def test_accumulation_term_covers_truncating_block_fma(block):
    """The bound's accumulation term, gamma_C = C U_ACC / (1 - C U_ACC) of sum |q_i g_i|, holds for the
    tensor cores' truncating block FMA of any block size, on random data of mixed signs and scales and
    on a worst case of the model: one large product then many just below the accumulator's last bit,
    each truncated away, which reaches 99.6% of C 2^-23 sum |p|: a U_ACC below 2^-23 would fail here.
    (The earlier bound, C 2^-23, lacked the rigorous derivation's factor (b + 1) / b; this construction
    does not exceed it: the normalising truncation adds its ulp only when a sum crosses a binade.)"""
    from spade_edge.runtime.scoring.cuda import U_ACC

    rng = np.random.default_rng(block)
    c = 256
    worst_old = 0.0
    cases = []
    for _ in range(40):
        a = (rng.normal(size=c) * 2.0 ** rng.integers(-6, 6, c)).astype(np.float16)
        b = (rng.normal(size=c) * 2.0 ** rng.integers(-6, 6, c)).astype(np.float16)
        cases.append((a, b))
    a = np.full(c, (1 - 2.0**-11) * 2.0**-12, np.float16)  # products (1 - 2^-11) 2^-23: below 1.0's last bit
    b = np.full(c, 2.0**-11, np.float16)
    a[0], b[0] = 1.0, 1.0
    cases.append((a, b))
    a2, b2 = a.copy(), b.copy()
    a2[0] = -1.0  # negative: truncation toward zero moves the sum's magnitude down, crossing binades
    cases.append((a2, b2))
    for a, b in cases:
        p = a.astype(np.float64) * b.astype(np.float64)
        err = abs(block_fma_dot(a, b, block) - p.sum())
        scale = np.abs(p).sum()
        assert err <= c * U_ACC / (1 - c * U_ACC) * scale, (block, err, scale)
        assert err <= 2 * c * 2.0**-23 * scale  # the derivation's bound, before the margin
        worst_old = max(worst_old, err / (c * 2.0**-23 * scale))
    assert worst_old > 0.99, worst_old


def test_prepare_query_gives_each_level_its_own_accumulation_term(standins, monkeypatch):
    """prepare_query's per-row terms of the bound, from above and tight: |q| over the levels at the fine
    grid, and A = sqrt(sum_l gamma_l^2 |q_l|^2) with gamma_l = C_l U_ACC / (1 - C_l U_ACC), so that the
    1024-channel level of a pyramid does not widen the bound of the others."""
    from spade_edge.runtime.scoring import cuda

    seen = {}
    launch = cuda._Device.launch

    def spy(self, name, grid, block, args):
        launch(self, name, grid, block, args)
        if name == "prepare_query":
            seen["qnorm"] = args[-1]

    monkeypatch.setattr(cuda._Device, "launch", spy)
    rng = np.random.default_rng(16)
    images = [[rng.normal(size=s).astype(np.float32) for s in FUSED_SHAPES] for _ in range(2)]
    query = [(rng.normal(size=s) * (i + 1)).astype(np.float32) for i, s in enumerate(FUSED_SHAPES)]
    CudaScorer().topk_pyramid(query, images, FUSED_GRID, 2)
    got = np.asarray(seen["qnorm"]).astype(np.float64)
    p = FUSED_GRID[0] * FUSED_GRID[1]
    sq = np.stack([(up64(x, FUSED_GRID) ** 2).sum(1) for x in query])  # (levels, P)
    gamma = np.array([c * cuda.U_ACC / (1 - c * cuda.U_ACC) for _, _, c in FUSED_SHAPES])
    norm, acc = np.sqrt(sq.sum(0)), np.sqrt((gamma[:, None] ** 2 * sq).sum(0))
    assert np.all(got[:p] >= norm) and np.all(got[:p] <= norm * (1 + 2.0**-18))
    assert np.all(got[p:] >= acc) and np.all(got[p:] <= acc * (1 + 2.0**-18))
    assert np.all(acc < gamma.max() * norm * 0.9)  # tighter than the largest level's gamma for all


def test_fused_pyramid_in_chunks(standins):
    """Retrieved images beyond tile_bytes of coarse-level products go through in chunks on the fused
    path too (the fine level's products are never held, so they do not count)."""
    rng = np.random.default_rng(17)
    gallery, decoded = pyramid_gallery(rng, 7, "fp16", FUSED_SHAPES)
    names = list(decoded)
    images = [6, 1, 3, 0, 4, 2]
    query = [(decoded[n][1] + rng.integers(-1, 2, decoded[n][1].shape) / 16).astype(np.float32) for n in names]
    p = FUSED_GRID[0] * FUSED_GRID[1]
    coarse_per_image = sum(h * w for h, w, _ in FUSED_SHAPES[1:]) * p * 4
    scorer = CudaScorer(tile_bytes=2 * coarse_per_image)  # two images a chunk
    scorer.attach(gallery)
    top = scorer.topk_pyramid(query, gallery.pyramid_view(names, images, FUSED_GRID), FUSED_GRID, 4)
    assert scorer.stats["chunks"] == 3 and scorer.stats["fused"] is True, scorer.stats
    q64 = np.concatenate([up64(x, FUSED_GRID) for x in query], axis=1)
    g64 = np.concatenate([np.concatenate([up64(decoded[n][j], FUSED_GRID) for n in names], axis=1) for j in images])
    idx, dist, d_all = brute(q64, g64, 4)
    assert_exact(top, idx, dist, d_all)
