"""Fuzzing POST /inspect on a real service process: whatever the body, the service answers (4xx for
bad input, never 5xx), stays alive, and its memory does not jump."""

from __future__ import annotations

import io
import json
import socket
import struct

import numpy as np
import pytest

from spade_edge.runtime.errors import ImageError
from spade_edge.runtime.images import load_image
from spade_edge.service.inputs import ACCEPTED_FORMATS

from .conftest import ServerProcess, multipart, parse_metrics, request, rss_bytes
from .test_inputs import png_header


def _encode(arr, fmt, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decodes(data: bytes, max_pixels: int = 40_000_000) -> bool:
    """Would the runtime itself accept these bytes within the service's limits? (Then 200 is right.)"""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS).size
        if w * h > max_pixels:
            return False
        arr = load_image(data)
    except (ImageError, Exception):
        return False
    return min(arr.shape[:2]) >= 8


def _patch_jpeg_size(jpeg: bytes, w: int, h: int) -> bytes:
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9 :]


def _bodies() -> list[tuple[str, bytes, dict]]:
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    png, jpeg = _encode(noise, "PNG"), _encode(noise, "JPEG", quality=90)
    cases = [("zero-length", b"", {})]
    for n in (1, 2, 7, 8, 100, 1000, 50_000):
        cases.append((f"random {n} bytes", rng.integers(0, 256, n, dtype=np.uint8).tobytes(), {}))
    for magic in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"RIFF"):
        cases.append((f"random after magic {magic!r}", magic + rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), {}))
    for cut in sorted(set(np.linspace(1, len(png) - 1, 25).astype(int))):
        cases.append((f"PNG truncated at {cut}/{len(png)}", png[:cut], {}))
    for cut in sorted(set(np.linspace(1, len(jpeg) - 1, 25).astype(int))):
        cases.append((f"JPEG truncated at {cut}/{len(jpeg)}", jpeg[:cut], {}))
    for k in range(15):
        b = bytearray(png if k % 2 else jpeg)
        for pos in rng.integers(20, len(b), 4):
            b[pos] ^= 1 << int(rng.integers(0, 8))
        cases.append((f"{'PNG' if k % 2 else 'JPEG'} with flipped bits #{k}", bytes(b), {}))
    for w, h in ((100_000, 100_000), (20_000, 20_000), (9_000, 9_000), (1, 1_000_000)):
        cases.append((f"PNG header claiming {w} x {h}", png_header(w, h), {}))
    cases.append(("JPEG header claiming 65000 x 65000", _patch_jpeg_size(jpeg, 65000, 65000), {}))
    cases.append(("JPEG header claiming 8000 x 6000", _patch_jpeg_size(jpeg, 8000, 6000), {}))
    bmp = bytearray(_encode(noise, "BMP"))
    bmp[18:26] = struct.pack("<ii", 50_000, 50_000)
    cases.append(("BMP header claiming 50000 x 50000", bytes(bmp), {}))
    cases.append(("RGBA PNG", _encode(np.zeros((32, 32, 4), np.uint8), "PNG"), {}))
    cases.append(("1 x 1 PNG", _encode(np.zeros((1, 1, 3), np.uint8), "PNG"), {}))
    cases.append(("GIF", _encode(noise, "GIF"), {}))
    cases.append(("text", b"hello, I am not an image\n" * 10, {"Content-Type": "text/plain"}))
    body, ctype = multipart(png)
    cases.append(("multipart cut short", body[: len(body) // 2], {"Content-Type": ctype}))
    cases.append(("multipart with another boundary", body, {"Content-Type": "multipart/form-data; boundary=zzz"}))
    cases.append(("multipart without boundary", body, {"Content-Type": "multipart/form-data"}))
    cases.append(("multipart holding noise", multipart(b"\0" * 500)[0], {"Content-Type": multipart(b"")[1]}))
    return cases


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    s = ServerProcess(assets["model"], assets["gallery_a"], tmp_path_factory.mktemp("fuzz"), "--max-pixels", "40000000")
    s.wait_ready()
    yield s
    assert s.stop() == 0, s.log.read_text()


def test_fuzzed_bodies_get_4xx_and_the_service_survives(server, assets):
    rss0 = rss_bytes(server.proc.pid)
    sent, got_200, seen = 0, 0, {}
    for label, body, headers in _bodies():
        status, _, raw = request(server.url, "POST", "/inspect", body, headers, timeout=30)
        sent += 1
        out = json.loads(raw)
        expect_ok = not headers.get("Content-Type", "").startswith(("multipart", "text")) and _decodes(body)
        if expect_ok:  # e.g. a flipped bit in JPEG pixel data: still an image
            assert status == 200, (label, out)
            got_200 += 1
        else:
            assert 400 <= status < 500, (label, status, out)
            assert out["error"] and out["status"] == status
        seen[status] = seen.get(status, 0) + 1
        assert server.alive, (label, server.log.read_text())
    assert {400, 413, 415, 422} <= set(seen), seen
    # still serving, and every request was counted
    assert request(server.url, path="/health")[0] == 200
    status, _, raw = request(server.url, "POST", "/inspect", assets["images"]["normal0.png"].read_bytes())
    assert status == 200 and json.loads(raw)["verdict"] in ("OK", "NOT_OK")
    vals = parse_metrics(request(server.url, path="/metrics")[2].decode())
    counted = sum(v for k, v in vals.items() if k.startswith("spade_edge_inspect_requests_total"))
    assert counted == sent + 1
    assert rss_bytes(server.proc.pid) < rss0 + 150e6  # no giant buffer was ever allocated


def _raw(port: int, payload: bytes, shut_write: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(payload)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
    return b"".join(chunks)


def test_broken_http_framing_gets_4xx(server):
    port = int(server.url.rsplit(":", 1)[1])
    cases = {
        "body shorter than Content-Length": b"POST /inspect HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
        "negative Content-Length": b"POST /inspect HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        "non-numeric Content-Length": b"POST /inspect HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        "no Content-Length": b"POST /inspect HTTP/1.1\r\nHost: x\r\n\r\n",
        "chunked": b"POST /inspect HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "huge Content-Length": b"POST /inspect HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
        "garbage request line": b"\x00\x01\x02 nonsense\r\n\r\n",
        "header line too long": b"POST /inspect HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
    }
    for label, payload in cases.items():
        answer = _raw(port, payload)
        assert answer.startswith(b"HTTP/1."), (label, answer[:100])
        code = int(answer.split(b" ", 2)[1])
        assert 400 <= code < 500, (label, answer[:200])
        assert server.alive
    assert request(server.url, path="/health")[0] == 200
