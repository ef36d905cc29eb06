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
