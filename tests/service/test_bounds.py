"""The service's resource bounds, each reproduced as an attacker or a careless client would hit it:
clients that trickle their request (slot, deadline, connection cap), bodies held while they
arrive, and the memory of decoding large 16-bit and grey images."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from spade_edge.runtime.errors import ImageError
from spade_edge.runtime.images import Preprocess, decode_cost, fit_image, load_image
from spade_edge.service import ServiceConfig

from .conftest import ROOT, ServerProcess, parse_metrics, request
from .test_server import post_image, serve, wait_for  # noqa: F401 - the in-process service fixture


# --- clients that trickle --------------------------------------------------------------------------
class Trickler(threading.Thread):
    """Sends ``head`` at once, then one byte every ``interval`` seconds until stopped or the server
    answers or closes; ``answer`` is what came back, ``ended`` when (monotonic)."""

    def __init__(self, port: int, head: bytes, interval: float = 0.2, limit: float = 30.0):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
        self.head, self.interval, self.limit = head, interval, limit
        self.stop = threading.Event()
        self.answer, self.ended, self.started = b"", None, time.monotonic()

    def run(self):
        s = self.sock
        try:
            s.sendall(self.head)
            s.settimeout(self.interval)
            while not self.stop.is_set() and time.monotonic() - self.started < self.limit:
                try:
                    got = s.recv(4096)
                    self.answer += got
                    if not got or self.answer:
                        break
                except TimeoutError:
                    pass
                s.send(b"x")
        except OSError:
            pass
        finally:
            self.ended = time.monotonic()
            s.close()


def _body_head(n: int = 10_000, path: str = "/inspect") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {n}\r\n\r\n".encode()


def test_slow_bodies_take_no_queue_slot(serve, assets):  # noqa: F811
    """Issue 17: 8 clients trickling their body at 1 byte/s held every queue slot (the slot was taken
    before the body was read): real inspections got 503 for as long as the tricklers liked."""
    rs, _ = serve(ServiceConfig(queue_size=2, read_timeout=20))
    slow = [Trickler(rs.httpd.port, _body_head()) for _ in range(4)]
    for t in slow:
        t.start()
    time.sleep(0.6)
    assert rs.service.queue_depth == 0
    status, _, out = post_image(rs.url, assets["images"]["normal0.png"].read_bytes())
    assert status == 200, out
    for t in slow:
        t.stop.set()
        t.join()


def test_the_whole_request_must_arrive_within_read_timeout(serve):  # noqa: F811
    """The 10 s read timeout was per recv: a byte every few seconds kept a request open forever.
    Now headers and body together get ``read_timeout`` from the request's first byte."""
    rs, _ = serve(ServiceConfig(read_timeout=1.0))
    body = Trickler(rs.httpd.port, _body_head(), interval=0.2, limit=6)
    head = Trickler(rs.httpd.port, b"GET /health HTTP/1.1\r\nX-Slow: ", interval=0.2, limit=6)
    for t in (body, head):
        t.start()
    for t in (body, head):
        t.join()
    assert body.answer.startswith(b"HTTP/1.1 408") and b"1.0 s" in body.answer, body.answer
    assert body.ended - body.started < 2.5
    assert head.ended - head.started < 2.5  # closed (408 or nothing): the headers never ended
    vals = parse_metrics(request(rs.url, path="/metrics")[2].decode())
    assert vals['spade_edge_inspect_requests_total{outcome="bad_request"}'] == 1


def test_health_and_metrics_answer_at_the_connection_cap(serve, assets):  # noqa: F811
    """70 trickling connections (over the cap of 64) made /health answer 503: a load balancer or
    systemd would restart a healthy service. Past the cap /health and /metrics are still answered;
    everything else gets 503 and is closed."""
    rs, _ = serve(ServiceConfig(max_connections=3, read_timeout=20))
    hold = [Trickler(rs.httpd.port, b"GET /health HTTP/1.1\r\nX-Slow: ", interval=0.5) for _ in range(3)]
    idle = [socket.create_connection(("127.0.0.1", rs.httpd.port)) for _ in range(3)]  # over the cap, silent
    for t in hold:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    status, h, body = request(rs.url, path="/health", timeout=10)
    assert status == 200 and json.loads(body)["status"] == "ready" and time.monotonic() - t0 < 2
    assert h.get("connection") == "close"
    status, _, out = post_image(rs.url, assets["images"]["normal0.png"].read_bytes(), timeout=10)
    assert status == 503 and "connections" in out["error"]
    status, _, body = request(rs.url, path="/metrics", timeout=10)
    assert status == 200 and parse_metrics(body.decode())["spade_edge_connections_refused_total"] >= 1
    for t in hold:
        t.stop.set()
        t.join()
    for s in idle:
        s.close()
    wait_for(lambda: post_image(rs.url, assets["images"]["normal0.png"].read_bytes())[0] == 200)


def test_bodies_being_received_are_bounded_in_bytes(serve, assets):  # noqa: F811
    """Bodies are read before a slot is taken, so their memory has its own bound: bytes received
    and not yet done with, at most queue_size x max_bytes, counted as they arrive (a trickler
    holds only what it sent)."""
    data = assets["images"]["normal0.png"].read_bytes()
    rs, _ = serve(ServiceConfig(queue_size=1, max_bytes=100_000, read_timeout=20))
    big = socket.create_connection(("127.0.0.1", rs.httpd.port), timeout=10)
    big.sendall(_body_head(100_000) + b"\0" * 95_000)  # 95 % of the budget, then silence
    wait_for(lambda: rs.httpd.receiving.used >= 95_000)
    status, h, out = post_image(rs.url, b"\0" * 20_000)
    assert status == 503 and "request bodies" in out["error"] and h["retry-after"] == "1"
    big.close()  # its bytes are given back when the server sees it leave
    wait_for(lambda: rs.httpd.receiving.used == 0)
    assert post_image(rs.url, data)[0] == 200
    # given back when the request ends, just after its answer is sent: the client may read it first
    wait_for(lambda: rs.httpd.receiving.used == 0)


# --- decoded pixels ----------------------------------------------------------------------------------
def _old_load_image(src) -> np.ndarray:
    """The decode before issue 17 (float64 for 16 bits, grey tripled at full size): the known answer."""
    from PIL import Image

    img = src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src))
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    else:
        if img.mode == "P":
            img = img.convert("RGB")
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def _encode(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _modes(rng):
    from PIL import Image

    h, w = 61, 83
    g8 = rng.integers(0, 256, (h, w), dtype=np.uint8)
    yield "L", _encode(Image.fromarray(g8))
    yield "RGB", _encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    yield "I;16 wide", _encode(Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)))
    yield "I;16 narrow", _encode(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint16)))
    yield (
        "I;16B tiff",
        _encode(Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).convert("I;16B"), "TIFF"),
    )
    yield "I", _encode(Image.fromarray(rng.integers(-300, 90_000, (h, w)).astype(np.int32)), "TIFF")
    yield "F", _encode(Image.fromarray(rng.normal(120, 90, (h, w)).astype(np.float32)), "TIFF")
    yield "1", _encode(Image.fromarray(g8 > 100))
    yield "P", _encode(Image.fromarray(g8).convert("P"))
    yield "CMYK", _encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("CMYK"), "JPEG")
    yield "JPEG L", _encode(Image.fromarray(g8), "JPEG")


@pytest.mark.parametrize("pre", [Preprocess(32, crop=True), Preprocess(40, crop=False), Preprocess(224)])
def test_bounded_decode_gives_the_same_pixels(pre):
    """fit_image (what Detector.prepare runs) gives, bit for bit, what the full-size path gave, for
    every mode a camera or a file may have: the scores a gallery was built with do not move."""
    from PIL import Image

    for kind, data in _modes(np.random.default_rng(7)):
        want_x, want_g = pre(_old_load_image(data))
        got_x, got_g = fit_image(data, pre, kind)
        assert got_x.dtype == np.uint8 and got_x.shape == want_x.shape, kind
        np.testing.assert_array_equal(got_x, want_x, err_msg=kind)
        assert got_g == want_g, kind
        np.testing.assert_array_equal(load_image(data), _old_load_image(data), err_msg=kind)
        got_x2, _ = fit_image(Image.open(io.BytesIO(data)), pre, kind)  # a Pillow image the same way
        np.testing.assert_array_equal(got_x2, want_x, err_msg=kind)
    grey = np.random.default_rng(1).integers(0, 256, (50, 70), dtype=np.uint8)
    np.testing.assert_array_equal(fit_image(grey, pre)[0], pre(np.repeat(grey[:, :, None], 3, 2))[0])
    with pytest.raises(ImageError, match="alpha"):
        fit_image(_encode(Image.new("RGBA", (20, 20))), pre)
    with pytest.raises(ImageError, match="too small"):
        fit_image(_encode(Image.new("L", (5, 20))), pre)


_PEAK = """
import sys, time
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM"):
            return int(l.split()[1]) * 1024
from PIL import Image
from spade_edge.runtime.images import Preprocess, decode_cost, fit_image
data = open(sys.argv[1], "rb").read()
pre = Preprocess(224)
fit_image(open(sys.argv[2], "rb").read(), pre)  # every code path once
im = Image.open(sys.argv[1])
cost = decode_cost(im.mode, *im.size, im.format)
base = hwm()
fit_image(data, pre, "big")
print(hwm() - base, cost)
"""


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    """6000 x 6000: a 16-bit grey PNG (a few hundred KB on disk) and an 8-bit grey one."""
    from PIL import Image

    d = tmp_path_factory.mktemp("big")
    ramp = (np.arange(6000, dtype=np.uint32)[None, :] * 9 + np.arange(6000, dtype=np.uint32)[:, None] * 5) % 65536
    Image.fromarray(ramp.astype(np.uint16)).save(d / "g16.png", compress_level=1)
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(d / "g8.png", compress_level=1)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "small.png")
    return d


@pytest.mark.parametrize("name,limit_mb", [("g16.png", 120), ("g8.png", 45)])
def test_one_large_grey_image_decodes_within_its_cost(big_images, name, limit_mb):
    """A 6000 x 6000 16-bit PNG cost ~0.9 GB to decode (float64 copies, grey tripled); now Pillow's
    16-bit image and its 8-bit copy, 3 bytes a pixel (108 MB), plus strips of a few MB."""
    r = subprocess.run(
        [sys.executable, "-c", _PEAK, str(big_images / name), str(big_images / "small.png")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    peak, cost = (int(v) for v in r.stdout.split())
    print(f"{name}: peak +{peak / 1e6:.1f} MB, decode_cost {cost / 1e6:.1f} MB")
    assert peak < cost + 16e6 and peak < limit_mb * 1e6


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_eight_concurrent_16bit_images_stay_within_the_budget(assets, big_images, tmp_path):
    """8 such PNGs at once reached 5.9 GB against a documented ~1.2 GB. The queue admits 8 decodes at
    once, each within decode_cost (3 bytes a pixel here) and a few MB of strips: the service's peak
    grows by about 8 x 108 MB."""
    from PIL import Image

    data = (big_images / "g16.png").read_bytes()
    im = Image.open(big_images / "g16.png")
    cost = decode_cost(im.mode, *im.size, im.format)
    srv = ServerProcess(assets["model"], assets["gallery_a"], tmp_path, "--queue-size", "8", "--deadline", "60")
    try:
        srv.wait_ready()
        assert post_image(srv.url, (big_images / "small.png").read_bytes())[0] == 200  # warm every path
        base = _hwm(srv.proc.pid)
        out = []
        threads = [
            threading.Thread(target=lambda: out.append(post_image(srv.url, data, "?name=g16.png", timeout=120)))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        grown = _hwm(srv.proc.pid) - base
        print(
            f"8 concurrent 6000x6000 16-bit PNGs: peak RSS +{grown / 1e6:.0f} MB (decode_cost {cost / 1e6:.0f} MB each)"
        )
        assert [o[0] for o in out] == [200] * 8, [o[2] for o in out]
        assert grown < 8 * (cost + 8e6) + 64e6  # 1.0 GB; 5.8 GB before
    finally:
        assert srv.stop() == 0


def test_an_image_whose_decode_would_exceed_the_budget_is_refused_from_its_header():
    """The budget per request is 4 bytes x max_pixels of decoded pixels (decode_cost, from the
    header): an RGB image at max_pixels fits; a palette or CMYK image that needs more is 413."""
    from PIL import Image

    from spade_edge.service.inputs import probe_image
    from spade_edge.service.outcomes import TooLarge

    cfg = ServiceConfig(max_pixels=10_000)
    assert probe_image(_encode(Image.new("RGB", (100, 100))), cfg, "rgb")[:2] == (100, 100)
    assert probe_image(_encode(Image.fromarray(np.zeros((100, 100), np.uint16))), cfg, "g16")[:2] == (100, 100)
    with pytest.raises(TooLarge, match="decoding .* would need 0.05 MB"):
        probe_image(_encode(Image.new("L", (100, 100)).convert("P")), cfg, "palette")
