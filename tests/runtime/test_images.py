"""Bad input is refused with an error that names the problem."""

import io

import numpy as np
import pytest
from PIL import Image

from spade_edge.runtime.errors import ImageError
from spade_edge.runtime.images import Preprocess, load_image, map_to_original


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_accepts_every_documented_form(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    for src in (path, str(path), path.read_bytes(), Image.open(path), rgb):
        np.testing.assert_array_equal(load_image(src), rgb)
    gray = rgb[:, :, 0]
    out = load_image(gray)
    assert out.shape == (40, 50, 3) and (out[:, :, 2] == gray).all()


@pytest.mark.parametrize(
    "arr,match",
    [
        (np.zeros((20, 20, 3), np.float32), "dtype is float32"),
        (np.zeros((0, 0), np.uint8), "empty"),
        (np.zeros((20, 20, 4), np.uint8), "4 channels"),
        (np.zeros((20, 20, 2), np.uint8), "2 channels"),
        (np.zeros((2, 20, 20, 3), np.uint8), "4 dimensions"),
    ],
)
def test_bad_arrays(arr, match):
    with pytest.raises(ImageError, match=match):
        load_image(arr)


def test_bad_files(tmp_path):
    data = png_bytes(np.full((64, 64), 128, np.uint8))
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="trunc.png.*(corrupt|truncated)"):
        load_image(tmp_path / "trunc.png")
    with pytest.raises(ImageError, match="junk.png.*cannot decode"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="no such image"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="empty byte"):
        load_image(b"")
    with pytest.raises(ImageError, match="alpha"):
        load_image(png_bytes(np.zeros((16, 16, 4), np.uint8)))
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(42)


def test_sixteen_bit_gray_is_scaled():
    arr = np.arange(256 * 16, dtype=np.uint16).reshape(64, 64) * 16
    out = load_image(Image.fromarray(arr))
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0


def test_crop_geometry_maps_back():
    img = np.zeros((300, 400, 3), np.uint8)
    x, geom = Preprocess(224, crop=True)(img)
    assert x.shape == (224, 224, 3)
    # short side 300 -> 256: the 224 crop covers 224/256 of the height, centred
    assert geom.crop_height == pytest.approx(300 * 224 / 256) and geom.top == pytest.approx(16 * 300 / 256)
    full = map_to_original(np.ones((224, 224), np.float32), geom)
    assert full.shape == (300, 400)
    assert full[150, 200] == pytest.approx(1) and full[0, 0] == 0 and full[150, 5] == 0
    x, geom = Preprocess(224, crop=False)(img)
    assert (geom.top, geom.left, geom.crop_height, geom.crop_width) == (0, 0, 300, 400)
    assert (map_to_original(np.ones((224, 224), np.float32), geom) == 1).all()
