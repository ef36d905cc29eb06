import io
import struct
import zlib

import numpy as np
import pytest

from spade_edge.service.inputs import image_from_multipart, probe_image
from spade_edge.service.inspector import HttpError, ServiceConfig

from .conftest import multipart


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (valid CRC), with a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("tail", [b"", b"\r", b"\n", b"\r\n", b"--", b"\r\n--spadeEdgeTestBoundary7d1"])
def test_multipart_returns_the_exact_bytes(tail):
    rng = np.random.default_rng(len(tail))
    for n in (0, 1, 7, 5000, 300_000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes() + tail
        body, ctype = multipart(data, "cam1/p17.png")
        out, name = image_from_multipart(body, ctype)
        assert out == data and name == "cam1/p17.png"


def test_multipart_field_choice_and_errors():
    body, ctype = multipart(b"abc", field="file")
    assert image_from_multipart(body, ctype)[0] == b"abc"
    lf = b'--B\nContent-Disposition: form-data; name="image"; filename="a.png"\n\nDATA\n--B--\n'
    assert image_from_multipart(lf, "multipart/form-data; boundary=B") == (b"DATA", "a.png")
    only_text = b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--B\r\nContent-Disposition: form-data; name="y"\r\n\r\n2\r\n--B--\r\n'
    with pytest.raises(HttpError, match="fields seen: x, y"):
        image_from_multipart(only_text, "multipart/form-data; boundary=B")
    with pytest.raises(HttpError, match="boundary"):
        image_from_multipart(b"x", "multipart/form-data")
    for cut in (10, 40, len(body) - 5):
        with pytest.raises(HttpError) as e:
            image_from_multipart(body[:cut], ctype)
        assert e.value.status == 400


def _encoded(arr, fmt="PNG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_probe_limits_without_decoding():
    cfg = ServiceConfig(max_pixels=1_000_000, expect_size=None)
    ok = _encoded(np.zeros((40, 50, 3), np.uint8))
    assert probe_image(ok, cfg, "x") == (50, 40, "PNG")
    with pytest.raises(HttpError) as e:
        probe_image(png_header(100_000, 100_000), cfg, "huge.png")
    assert e.value.status == 413 and "too large" in e.value.message
    with pytest.raises(HttpError) as e:
        probe_image(png_header(2000, 1000), cfg, "big.png")
    assert e.value.status == 413 and "max-pixels" in e.value.message
    with pytest.raises(HttpError) as e:
        probe_image(ok, ServiceConfig(expect_size=(64, 48)), "p.png")
    assert e.value.status == 422 and "expects 64 x 48" in e.value.message
    with pytest.raises(HttpError) as e:
        probe_image(_encoded(np.zeros((4, 50, 3), np.uint8)), cfg, "thin.png")
    assert e.value.status == 422 and "too small" in e.value.message
    with pytest.raises(HttpError) as e:
        probe_image(b"GIF89a" + b"\0" * 20, cfg, "g.gif")
    assert e.value.status == 415
    with pytest.raises(HttpError) as e:
        probe_image(b"", cfg, "empty")
    assert e.value.status == 400 and "empty" in e.value.message
