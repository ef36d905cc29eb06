import io
import struct
import zlib

import numpy as np
import pytest

from spade_edge.service.config import ServiceConfig
from spade_edge.service.inputs import image_from_multipart, probe_image
from spade_edge.service.outcomes import BadImage, TooLarge, Unsupported, WrongSize
from spade_edge.service.server import http_error

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
    with pytest.raises(BadImage, match="fields seen: x, y"):
        image_from_multipart(only_text, "multipart/form-data; boundary=B")
    with pytest.raises(BadImage, match="boundary"):
        image_from_multipart(b"x", "multipart/form-data")
    for cut in (10, 40, len(body) - 5):
        with pytest.raises(BadImage) as e:
            image_from_multipart(body[:cut], ctype)
        assert http_error(e.value).status == 400


def _encoded(arr, fmt="PNG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_probe_limits_without_decoding():
    cfg = ServiceConfig(max_pixels=1_000_000, expect_size=None)
    ok = _encoded(np.zeros((40, 50, 3), np.uint8))
    assert probe_image(ok, cfg, "x") == (50, 40, "PNG")
    # each refusal is a domain outcome; HTTP maps it (service/server.py) to the status clients see
    with pytest.raises(TooLarge) as e:
        probe_image(png_header(100_000, 100_000), cfg, "huge.png")
    assert http_error(e.value).status == 413 and "too large" in e.value.message
    with pytest.raises(TooLarge) as e:
        probe_image(png_header(2000, 1000), cfg, "big.png")
    assert http_error(e.value).status == 413 and "max-pixels" in e.value.message
    with pytest.raises(WrongSize) as e:
        probe_image(ok, ServiceConfig(expect_size=(64, 48)), "p.png")
    assert http_error(e.value).status == 422 and "expects 64 x 48" in e.value.message
    with pytest.raises(WrongSize) as e:
        probe_image(_encoded(np.zeros((4, 50, 3), np.uint8)), cfg, "thin.png")
    assert http_error(e.value).status == 422 and "too small" in e.value.message
    with pytest.raises(Unsupported) as e:
        probe_image(b"GIF89a" + b"\0" * 20, cfg, "g.gif")
    assert http_error(e.value).status == 415
    with pytest.raises(BadImage) as e:
        probe_image(b"", cfg, "empty")
    assert http_error(e.value).status == 400 and "empty" in e.value.message


def _many_fields(n: int, eol: bytes = b"\r\n", image: bytes = b"IMAGE") -> bytes:
    field = b"--B" + eol + b'Content-Disposition: form-data; name="f"' + eol + eol + eol
    return (
        field * n
        + b"--B"
        + eol
        + b'Content-Disposition: form-data; name="image"; filename="a.png"'
        + eol
        + eol
        + image
        + eol
        + b"--B--"
        + eol
    )


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_a_body_of_many_parts_is_refused_before_any_is_parsed(eol):
    """Issue 17: 1.1 MB of 20,000 empty fields (and an image) cost 7.3 s of CPU, linear in size, with
    no deadline. Parts are counted first (one byte search) and more than max_parts are refused."""
    import time

    body = _many_fields(20_000, eol)
    assert 0.8e6 < len(body) < 1.2e6
    t = time.process_time()
    with pytest.raises(BadImage, match="at most 16 are accepted") as e:
        image_from_multipart(body, "multipart/form-data; boundary=B")
    spent = time.process_time() - t
    print(f"20,000 empty fields ({len(body) / 1e6:.2f} MB, {eol!r} line ends): refused in {spent * 1e3:.1f} ms CPU")
    assert spent < 0.2 and http_error(e.value).status == 400
    assert image_from_multipart(_many_fields(15, eol), "multipart/form-data; boundary=B") == (b"IMAGE", "a.png")


def test_multipart_parsing_is_bounded_in_time_at_its_limits():
    """The worst a body within the limits can ask: 16 parts, each with 8 KiB of headers, around a
    32 MB image: parsed in well under the 10 s deadline (one copy of the payload, no email parser
    over the body)."""
    import time

    b = "spadeEdgeTestBoundary7d1e"
    head = b'Content-Disposition: form-data; name="x"\r\n' + b"X-Pad: " + b"a " * 4000 + b"\r\n"
    fields = (b"--" + b.encode() + b"\r\n" + head + b"\r\nv\r\n") * 14  # + the 2 parts of multipart()
    image = np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8).tobytes()
    body, ctype = multipart(image)
    body = fields + body
    t = time.process_time()
    out, name = image_from_multipart(body, ctype)
    spent = time.process_time() - t
    print(f"16 parts with 8 KiB headers around 32 MiB: {spent * 1e3:.0f} ms CPU")
    assert out == image and name == "part.png" and spent < 1.0
    too_long = b"--B\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\nv\r\n--B--\r\n"
    with pytest.raises(BadImage, match="headers longer than 8192"):
        image_from_multipart(too_long, "multipart/form-data; boundary=B")


def test_a_part_without_headers_and_a_preamble():
    body = b"preamble\r\n--B\r\n\r\nDATA\r\n--B--\r\nepilogue"
    assert image_from_multipart(body, "multipart/form-data; boundary=B") == (b"DATA", None)
