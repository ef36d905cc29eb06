import hashlib
import json

import numpy as np
import pytest

from spade_edge.runtime.errors import GalleryError
from spade_edge.runtime.gallery import Gallery

from ..conftest import make_info, random_gallery


@pytest.fixture
def saved(tmp_path):
    g = random_gallery(make_info(), 6, np.random.default_rng(0))
    g.thumbnails = np.zeros((6, 16, 16, 3), np.uint8)
    path = g.save(tmp_path / "g.gallery")
    return g, path


def test_round_trip_is_memory_mapped(saved):
    g, path = saved
    h = Gallery.load(path)
    assert h.names == g.names and h.fingerprint == g.fingerprint
    assert isinstance(h.global_features, np.memmap) and not h.global_features.flags.writeable
    for name, store in g.levels.items():
        assert isinstance(h.levels[name].data, np.memmap)
        np.testing.assert_array_equal(h.levels[name].data, store.data)
    np.testing.assert_array_equal(h.thumbnails, g.thumbnails)


def test_arrays_are_aligned(saved):
    _, path = saved
    manifest = Gallery.load(path).manifest
    assert all(spec["offset"] % 64 == 0 for spec in manifest["arrays"].values())


@pytest.mark.parametrize("where", ["header", "array"])
def test_a_flipped_byte_is_refused(saved, where):
    _, path = saved
    data = bytearray(path.read_bytes())
    pos = 60 if where == "header" else len(data) - 200
    data[pos] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="corrupt"):
        Gallery.load(path)


def test_truncated_and_foreign_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    (tmp_path / "t.gallery").write_bytes(data[: len(data) - 1000])
    with pytest.raises(GalleryError, match="truncated"):
        Gallery.load(tmp_path / "t.gallery")
    (tmp_path / "x.gallery").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GalleryError, match="not a spade-edge gallery"):
        Gallery.load(tmp_path / "x.gallery")
    with pytest.raises(GalleryError, match="no such gallery"):
        Gallery.load(tmp_path / "missing.gallery")


def test_interrupted_write_leaves_the_old_file(saved, monkeypatch):
    g, path = saved
    before = path.read_bytes()
    g2 = random_gallery(make_info(), 9, np.random.default_rng(1))

    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        g2.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_manifest_is_plain_json(saved):
    _, path = saved
    raw = path.read_bytes()
    n = int.from_bytes(raw[8:16], "little")
    manifest = json.loads(raw[48 : 48 + n])
    assert manifest["format"] == 1 and set(manifest["arrays"]) == {"global", "level/a", "level/b", "thumbnails"}


# -- whole-file validation (issue 17): crafted headers with their checksum recomputed ----------------


def split_file(path):
    """(manifest, data section) of a gallery file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[8:16], "little")
    return json.loads(raw[48 : 48 + n]), raw[48 + n :]


def write_file(path, manifest, data: bytes, blob: bytes | None = None, declared: int | None = None):
    """A gallery file holding ``manifest`` (or raw header bytes ``blob``) with a correct header
    checksum, before the untouched ``data`` section: what a crafted file looks like."""
    if blob is None:
        blob = json.dumps(manifest).encode()
    blob += b" " * ((-(48 + len(blob))) % 64)
    n = len(blob) if declared is None else declared
    path.write_bytes(b"SPADEGAL" + n.to_bytes(8, "little") + hashlib.sha256(blob).digest() + blob + data)


def rewrite_header(path, edit):
    manifest, data = split_file(path)
    edit(manifest)
    write_file(path, manifest, data)


def rewrite_array(path, key, edit):
    """Change array ``key``'s values with ``edit(array)`` (in place, same dtype and shape), its
    checksum recomputed: a gallery that passes every checksum with crafted contents."""
    manifest, data = split_file(path)
    spec = manifest["arrays"][key]
    data = bytearray(data)
    a = (
        np.frombuffer(data, np.dtype(spec["dtype"]), int(np.prod(spec["shape"])), spec["offset"])
        .reshape(spec["shape"])
        .copy()
    )
    edit(a)
    data[spec["offset"] : spec["offset"] + spec["nbytes"]] = a.tobytes()
    spec["sha256"] = hashlib.sha256(a.tobytes()).hexdigest()
    write_file(path, manifest, bytes(data))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Real galleries of the tiny model, as 'gallery build' writes them: the default storage (int8,
    coreset, per-level) and a dense one with a PCA projection; and a test image."""
    from PIL import Image

    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.codec import Storage
    from spade_edge.runtime.features import backend_from_model
    from spade_edge.runtime.spade import SpadeConfig

    from ..conftest import tiny_onnx

    root = tmp_path_factory.mktemp("built")
    model = root / "tiny.onnx"
    tiny_onnx(model)
    rng = np.random.default_rng(0)
    images = []
    for i in range(10):
        images.append(root / f"{i:02d}.png")
        Image.fromarray(rng.integers(90, 150, (40, 48, 3), dtype=np.uint8)).save(images[-1])
    backend = backend_from_model(model)
    out = {"model": model, "image": images[0]}
    out["coreset"] = root / "coreset.gallery"
    gallery_from_images(
        backend, images[1:], out["coreset"], config=SpadeConfig(k_image=2, k_gallery=3), show_progress=False
    )
    out["dense"] = root / "dense.gallery"
    gallery_from_images(
        backend,
        images[1:],
        out["dense"],
        storage=Storage(precision="int8", projection="pca", keep=0.67, coreset=1.0),
        config=SpadeConfig(k_image=2, k_gallery=3, mode="concat"),
        show_progress=False,
    )
    return out


def _set(path_in_manifest, value):
    def edit(m):
        *parents, last = path_in_manifest
        for p in parents:
            m = m[p]
        m[last] = value

    return edit


def _delete(path_in_manifest):
    def edit(m):
        *parents, last = path_in_manifest
        for p in parents:
            m = m[p]
        del m[last]

    return edit


def _names_short(m):
    m["names"] = m["names"][:-1]


def _overlap(m):
    m["arrays"]["global"]["offset"] = m["arrays"]["level/a"]["offset"]


def _nbytes(m):
    m["arrays"]["global"]["nbytes"] -= 4


def _offset_past_end(m):
    m["arrays"]["thumbnails"]["offset"] = 1 << 40


def _unknown_array(m):
    m["arrays"]["pickle"] = dict(m["arrays"]["global"])


def _duplicate_names(m):
    m["names"][1] = m["names"][0]


def _global_short(m):
    spec = m["arrays"]["global"]
    spec["shape"][0] -= 1
    spec["nbytes"] -= spec["shape"][1] * 4


def _level_without_array(m):
    m["levels"]["c"] = {"grid": [2, 2]}


CRAFTED = {  # what is changed -> what the error must name
    "object dtype": (_set(["arrays", "level/a", "dtype"], "|O"), "dtype"),
    "big-endian dtype": (_set(["arrays", "global", "dtype"], ">f4"), "dtype"),
    "float64 offsets": (_set(["arrays", "offsets/a", "dtype"], "<f8"), "dtype"),
    "names shorter than the arrays": (_names_short, "names"),
    "duplicate names": (_duplicate_names, "names"),
    "grid 0": (_set(["levels", "a", "grid"], [0, 8]), "grid"),
    "grid of another shape": (_set(["levels", "b", "grid"], [4]), "grid"),
    "k_image 1e9": (_set(["config", "k_image"], 1e9), "k_image"),
    "k_gallery 0": (_set(["config", "k_gallery"], 0), "k_gallery"),
    "kappa beyond the gallery": (_set(["config", "kappa"], 10**6), "kappa"),
    "kappa a string": (_set(["config", "kappa"], "1"), "kappa"),
    "sigma 1e9": (_set(["config", "sigma"], 1e9), "sigma"),
    "sigma NaN": (_set(["config", "sigma"], float("nan")), "sigma"),
    "unknown mode": (_set(["config", "mode"], "fast"), "mode"),
    "coreset in concat mode": (_set(["config", "mode"], "concat"), "mode"),
    "unknown level in config": (_set(["config", "levels"], ["zz"]), "levels"),
    "unknown config key": (_set(["config", "k"], 1), "config"),
    "threshold NaN": (_set(["thresholds", "image"], float("nan")), "thresholds.image"),
    "threshold a string": (_set(["thresholds", "pixel"], "high"), "thresholds.pixel"),
    "normal median 0": (_set(["normal", "image"], 0.0), "normal.image"),
    "preprocess size 0": (_set(["preprocess", "size"], 0), "preprocess.size"),
    "preprocess unknown key": (_set(["preprocess", "mean"], 1), "preprocess"),
    "storage precision vs dtype": (_set(["storage", "precision"], "fp16"), "storage.precision"),
    "storage keep 7": (_set(["storage", "keep"], 7), "storage.keep"),
    "no fingerprint": (_delete(["model", "fingerprint"]), "model.fingerprint"),
    "model levels vs gallery": (_set(["model", "levels", 0, "stride"], 2), "grid"),
    "overlapping arrays": (_overlap, "overlaps"),
    "nbytes vs shape": (_nbytes, "nbytes"),
    "array past the end": (_offset_past_end, "past the end"),
    "unknown array": (_unknown_array, "pickle"),
    "level without its array": (_level_without_array, "level/c"),
    "negative shape": (_set(["arrays", "global", "shape"], [-9, 3]), "shape"),
    "boolean in a shape": (_set(["arrays", "global", "shape"], [True, 3]), "shape"),
    "global of another count": (_global_short, "global"),
    "no arrays table": (_delete(["arrays"]), "arrays"),
    "names not a list": (_set(["names"], "img.png"), "names"),
    "bad sha256": (_set(["arrays", "global", "sha256"], 12), "sha256"),
    "thresholds null": (_set(["thresholds"], None), "thresholds"),  # found by the fuzz test (seed 11)
    "storage a list": (_set(["storage"], []), "storage"),
    "scale of the wrong width": (_set(["arrays", "scale/a", "shape"], [2]), "scale/a"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_header_is_refused_naming_the_field(built, tmp_path, case):
    edit, field_name = CRAFTED[case]
    path = tmp_path / "crafted.gallery"
    path.write_bytes(built["coreset"].read_bytes())
    rewrite_header(path, edit)
    with pytest.raises(GalleryError) as err:
        Gallery.load(path)
    assert str(path) in str(err.value) and field_name in str(err.value), str(err.value)


def test_the_dense_gallery_is_checked_too(built, tmp_path):
    path = tmp_path / "crafted.gallery"
    for edit, field_name in [
        (_set(["arrays", "proj/a", "shape"], [3, 3]), "proj/a"),
        (_set(["arrays", "level/a", "shape"], [8, 8, 7, 2]), "level/a"),
        (_set(["arrays", "thumbnails", "shape"], [8, 16, 15, 3]), "thumbnails"),
        (_delete(["arrays", "proj/a"]), "center/a"),
    ]:
        path.write_bytes(built["dense"].read_bytes())
        rewrite_header(path, edit)
        with pytest.raises(GalleryError, match=field_name):
            Gallery.load(path)


@pytest.mark.parametrize(
    "blob, declared, message",
    [
        (b"{not json", None, "JSON"),
        (b"\xff\xfe{}", None, "JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b"[" * 100_000, None, "JSON"),
        (b"{}", 1 << 62, "header"),
        (b"{}", None, "format"),
    ],
)
def test_a_crafted_header_blob_is_refused(built, tmp_path, blob, declared, message):
    path = tmp_path / "crafted.gallery"
    _, data = split_file(built["coreset"])
    write_file(path, None, data, blob=blob, declared=declared)
    with pytest.raises(GalleryError, match=message):
        Gallery.load(path)


@pytest.mark.parametrize(
    "key, edit, message",
    [
        ("offsets/a", lambda a: a.__setitem__(3, a[3] + 1000), "offsets/a"),
        ("offsets/a", lambda a: a.__setitem__(3, a[2]), "offsets/a"),
        ("offsets/b", lambda a: a.__setitem__(0, 1), "offsets/b"),
        ("yx/a", lambda a: a.__setitem__((5, 0), 200), "yx/a"),
        ("scale/b", lambda a: a.__setitem__(0, np.nan), "scale/b"),
    ],
)
def test_crafted_index_arrays_are_refused(built, tmp_path, key, edit, message):
    path = tmp_path / "crafted.gallery"
    path.write_bytes(built["coreset"].read_bytes())
    rewrite_array(path, key, edit)
    with pytest.raises(GalleryError, match=message):
        Gallery.load(path)


def test_built_galleries_pass_and_untouched_fields_are_free(built, tmp_path):
    for kind in ("coreset", "dense"):
        Gallery.load(built[kind])
    path = tmp_path / "g.gallery"
    path.write_bytes(built["coreset"].read_bytes())
    rewrite_header(path, lambda m: m.update(history=["note"], comment="kept"))  # unknown top-level keys: ignored
    assert Gallery.load(path).manifest["comment"] == "kept"


OBJECT_LOAD = """
import sys
from spade_edge.runtime.errors import GalleryError
from spade_edge.runtime.gallery import Gallery
try:
    g = Gallery.load(sys.argv[1])
except GalleryError as exc:
    print("refused:", exc)
    sys.exit(3)
print(g.levels["a"].rows(0).sum())
"""


def test_an_object_dtype_is_refused_not_a_segfault(built, tmp_path):
    """The issue's crash: '|O' mapped from the file is pointers read from disk. In a subprocess, so a
    segmentation fault fails this test instead of ending the test run."""
    import subprocess
    import sys

    path = tmp_path / "object.gallery"
    path.write_bytes(built["coreset"].read_bytes())
    rewrite_header(path, _set(["arrays", "level/a", "dtype"], "|O"))
    res = subprocess.run([sys.executable, "-c", OBJECT_LOAD, str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
    assert "refused:" in res.stdout and "dtype" in res.stdout


@pytest.mark.parametrize("case", ["object dtype", "names shorter than the arrays", "grid 0", "k_image 1e9"])
def test_gallery_verify_refuses_the_issues_crafted_headers(built, tmp_path, case):
    from click.testing import CliRunner

    from spade_edge.cli import main

    path = tmp_path / "crafted.gallery"
    path.write_bytes(built["coreset"].read_bytes())
    rewrite_header(path, CRAFTED[case][0])
    res = CliRunner().invoke(main, ["gallery", "verify", str(path)])
    assert res.exit_code == 1 and CRAFTED[case][1] in res.output and "Traceback" not in res.output, res.output


def test_a_gallery_that_does_not_fit_the_model_is_refused(built, tmp_path):
    """Same fingerprint, other shapes: refused at load against the model, not an error at inference."""
    from spade_edge.runtime.errors import MismatchError

    from ..conftest import make_info

    g = random_gallery(make_info(levels=(("a", 5, 4), ("b", 9, 8))), 4, np.random.default_rng(0))
    with pytest.raises(MismatchError, match="channels"):
        Gallery.load(g.save(tmp_path / "c.gallery")).check_model(make_info())
    g = random_gallery(make_info(global_channels=4), 4, np.random.default_rng(0))
    with pytest.raises(MismatchError, match="global"):
        Gallery.load(g.save(tmp_path / "g.gallery")).check_model(make_info())
    g = random_gallery(make_info(size=64), 4, np.random.default_rng(0))
    with pytest.raises(MismatchError, match="grid"):
        Gallery.load(g.save(tmp_path / "s.gallery")).check_model(make_info())


# -- gallery add / remove: one writer at a time, nothing left behind (issue 17) ----------------------


@pytest.fixture
def growing(built, tmp_path):
    """A copy of the built gallery, two new normal images and the model."""
    from PIL import Image

    path = tmp_path / "g.gallery"
    path.write_bytes(built["coreset"].read_bytes())
    rng = np.random.default_rng(7)
    new = []
    for name in ("new_x.png", "new_y.png"):
        new.append(tmp_path / name)
        Image.fromarray(rng.integers(90, 150, (40, 48, 3), dtype=np.uint8)).save(new[-1])
    return path, new, built["model"]


def test_two_concurrent_adds_keep_both_images(growing, monkeypatch):
    """Both adds read the gallery before either writes (extraction slowed down): without a lock the
    second write drops the first's image, and both succeed."""
    import threading
    import time

    from spade_edge.runtime import build
    from spade_edge.runtime.features import backend_from_model

    path, new, model = growing
    before = Gallery.load(path).names
    real = build.extract

    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(0.4)
        return out

    monkeypatch.setattr(build, "extract", slow)
    errors = []

    def add(image):
        try:
            build.add_images(path, backend_from_model(model), [image], show_progress=False)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(image,)) for image in new]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    assert not errors
    assert Gallery.load(path).names == before + [new[0].name, new[1].name]


def test_two_concurrent_add_commands(growing):
    import subprocess
    import sys

    path, new, model = growing
    before = len(Gallery.load(path))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spade_edge",
                "gallery",
                "add",
                str(path),
                str(image),
                "-m",
                str(model),
                "--device",
                "cpu",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for image in new
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    names = Gallery.load(path).names
    assert len(names) == before + 2 and {new[0].name, new[1].name} <= set(names)


KILLED_ADD = """
import os, signal, sys
from spade_edge.runtime.build import add_images
from spade_edge.runtime.features import backend_from_model
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed with the new file written, not renamed
add_images(sys.argv[1], backend_from_model(sys.argv[2]), [sys.argv[3]], show_progress=False)
"""


def test_a_killed_add_leaves_a_part_file_that_the_next_writer_removes(growing):
    import subprocess
    import sys

    path, new, model = growing
    before = path.read_bytes()
    res = subprocess.run([sys.executable, "-c", KILLED_ADD, str(path), str(model), str(new[0])], timeout=120)
    assert res.returncode == -9
    parts = sorted(p.name for p in path.parent.glob(f".{path.name}.*.part"))
    assert len(parts) == 1 and path.read_bytes() == before  # the old gallery is intact
    other = path.parent / f".other.gallery.{parts[0].split('.')[-2]}.part"  # another gallery's: not ours
    other.write_bytes(b"x")
    g = Gallery.load(path)
    from spade_edge.runtime.build import remove_images

    remove_images(path, [g.names[-1]])
    assert not list(path.parent.glob(f".{path.name}.*.part")) and other.exists()


def test_part_files_are_kept_while_another_writer_holds_the_lock(growing):
    import threading

    from spade_edge.runtime.build import gallery_lock, remove_stale_parts

    path, _, _ = growing
    part = path.parent / f".{path.name}.abc123xy.part"
    part.write_bytes(b"being written")
    held, release = threading.Event(), threading.Event()

    def writer():
        with gallery_lock(path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    held.wait(10)
    try:
        assert remove_stale_parts(path) == [] and part.exists()  # a live writer's file
        with pytest.raises(GalleryError, match="another process"):
            with gallery_lock(path, timeout=0.2):
                pass
    finally:
        release.set()
        t.join(10)
    assert remove_stale_parts(path) == [part] and not part.exists()


@pytest.mark.parametrize(
    "key, kind", [("global", "coreset"), ("scale/a", "coreset"), ("proj/b", "dense"), ("center/a", "dense")]
)
def test_stored_floats_must_be_finite(built, tmp_path, key, kind):
    """A NaN feature makes a NaN score, and NaN > threshold is false: the verdict would say OK."""
    path = tmp_path / "nan.gallery"
    path.write_bytes(built[kind].read_bytes())
    rewrite_array(path, key, lambda a: a.reshape(-1).__setitem__(0, np.nan))
    with pytest.raises(GalleryError, match=f"{key}.*not finite"):
        Gallery.load(path)


def test_fp32_level_features_are_checked_on_a_verified_load(saved, tmp_path):
    _, path = saved
    rewrite_array(path, "level/b", lambda a: a.reshape(-1).__setitem__(7, np.inf))
    with pytest.raises(GalleryError, match="level/b.*not finite"):
        Gallery.load(path)
    Gallery.load(path, verify=False)  # reads only the small arrays
