"""The service in-process (a thread on a loopback port): answers, queue bound, deadlines, reload."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time

import pytest

from spade_edge.runtime.detector import Detector
from spade_edge.service import InspectionService, RunningService, ServiceConfig

from .conftest import multipart, parse_metrics, request


class Gate:
    """Wraps a feature backend: calls wait until the gate opens (to hold the worker on purpose)."""

    def __init__(self, backend):
        self.backend, self.info = backend, backend.info
        self.open = threading.Event()
        self.open.set()
        self.calls = 0
        self.fail_next = False

    def __call__(self, batch):
        self.calls += 1
        assert self.open.wait(30), "gate never opened"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated device failure")
        return self.backend(batch)


@pytest.fixture
def serve(assets):
    """serve(config=..., gated=False, load=True) -> (RunningService, gate or None)."""
    started = []

    def make(config: ServiceConfig | None = None, gated: bool = False, load: bool = True, loader=None):
        gates = []

        def gated_loader(model, gallery):
            det = Detector.load(model, gallery, device="cpu", threads=1)
            if gated:
                det.backend = Gate(det.backend)
                gates.append(det.backend)
            return det

        svc = InspectionService(config or ServiceConfig(), loader=loader or gated_loader)
        rs = RunningService(svc)
        started.append(rs)
        if load:
            svc.load(assets["model"], assets["gallery_a"])
        return rs, (gates[0] if gates else None)

    yield make
    for rs in started:
        for g in [getattr(rs.service.current.detector, "backend", None)] if rs.service.current else []:
            if isinstance(g, Gate):
                g.open.set()
        rs.stop()


def post_image(url, data, query="", headers=None, timeout=30.0):
    status, h, body = request(url, "POST", "/inspect" + query, data, headers, timeout)
    return status, h, json.loads(body) if body else None


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_not_ready_until_loaded_then_inspects(serve, assets):
    rs, _ = serve(load=False)
    status, h, body = request(rs.url, path="/health")
    assert status == 503 and json.loads(body)["status"] == "starting" and h["retry-after"] == "1"
    status, h, out = post_image(rs.url, assets["images"]["normal0.png"].read_bytes())
    assert status == 503 and "starting" in out["error"] and "retry-after" in h
    rs.service.load(assets["model"], assets["gallery_a"])
    status, _, body = request(rs.url, path="/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ready" and health["generation"] == 1
    assert health["gallery"] == str(assets["gallery_a"])

    g = rs.service.current.detector.gallery
    for name, path in assets["images"].items():
        status, _, out = post_image(rs.url, path.read_bytes(), f"?name={name}")
        assert status == 200, out
        assert out["image"] == name and out["verdict"] in ("OK", "NOT_OK")
        assert out["threshold"] == g.thresholds["image"] and out["pixel_threshold"] == g.thresholds["pixel"]
        assert len(out["neighbors"]) == 5 and all(n.startswith("a_") for n in out["neighbors"])
        assert out["neighbor_distances"] == sorted(out["neighbor_distances"])
        assert {"receive", "decode", "queue", "backbone", "image_knn", "pixel_scoring", "map", "total"} <= set(
            out["latency_ms"]
        )
        assert out["generation"] == 1 and len(out["id"]) == 32
    status, _, out = post_image(rs.url, assets["images"]["bright.png"].read_bytes())
    assert out["verdict"] == "NOT_OK" and out["score"] > out["threshold"]
    # the same answer as the library gives
    direct = Detector.load(assets["model"], assets["gallery_a"]).predict(assets["images"]["normal1.png"])
    _, _, out = post_image(rs.url, assets["images"]["normal1.png"].read_bytes())
    assert out["score"] == pytest.approx(direct.score, rel=1e-5) and out["verdict"] == direct.verdict


def test_multipart_and_curl(serve, assets):
    import shutil
    import subprocess

    rs, _ = serve()
    body, ctype = multipart(assets["images"]["dark.jpg"].read_bytes(), "cam2/dark.jpg")
    status, _, out = post_image(rs.url, body, headers={"Content-Type": ctype})
    assert status == 200 and out["image"] == "cam2/dark.jpg"
    if shutil.which("curl") is None:
        pytest.skip("curl not installed: the README's curl examples were not run")
    img = assets["images"]["bright.png"]
    for args in (["-F", f"image=@{img}"], ["--data-binary", f"@{img}", "-H", "Content-Type: image/png"]):
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "20", *args, rs.url + "/inspect?heatmap=1"],
            capture_output=True,
            text=True,
            check=True,
        )
        out = json.loads(r.stdout)
        assert out["verdict"] == "NOT_OK" and out["heatmap_url"].startswith("/heatmaps/")


def test_heatmap_by_url_and_inline_and_the_cache_is_bounded(serve, assets):
    from PIL import Image

    rs, _ = serve(ServiceConfig(heatmap_cache=2))
    data = assets["images"]["bright.png"].read_bytes()
    urls = [post_image(rs.url, data, "?heatmap=1")[2]["heatmap_url"] for _ in range(3)]
    status, h, png = request(rs.url, path=urls[-1])
    assert status == 200 and h["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png)).size[0] > 3 * 32
    assert request(rs.url, path=urls[0])[0] == 404  # dropped: only the 2 newest are kept
    _, _, out = post_image(rs.url, data, "?heatmap=inline")
    assert out["heatmap"].startswith("data:image/png;base64,") and "heatmap_url" not in out
    Image.open(io.BytesIO(base64.b64decode(out["heatmap"].split(",", 1)[1]))).verify()
    assert "heatmap" in out["latency_ms"]


def test_full_queue_answers_503_at_once_and_recovers(serve, assets):
    rs, gate = serve(ServiceConfig(queue_size=2), gated=True)
    gate.open.clear()
    data = assets["images"]["normal0.png"].read_bytes()
    results = []
    threads = [threading.Thread(target=lambda: results.append(post_image(rs.url, data))) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: rs.service.queue_depth == 2)
    t0 = time.monotonic()
    status, h, out = post_image(rs.url, data)
    assert status == 503 and time.monotonic() - t0 < 2.0
    assert h["retry-after"] == "1" and out["queue_depth"] == 2 == out["queue_capacity"]
    # 'Expect: 100-continue' is refused before the body is sent
    with socket.create_connection(("127.0.0.1", rs.httpd.port), timeout=5) as s:
        s.sendall(b"POST /inspect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    assert request(rs.url, path="/health")[0] == 200  # health is not behind the queue
    gate.open.set()
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200, 200]
    assert post_image(rs.url, data)[0] == 200
    vals = parse_metrics(request(rs.url, path="/metrics")[2].decode())
    assert vals['spade_edge_inspect_requests_total{outcome="queue_full"}'] == 2
    assert vals["spade_edge_queue_depth"] == 0 and vals["spade_edge_queue_capacity"] == 2


def test_deadline_gives_504_and_a_queued_request_is_dropped_unrun(serve, assets):
    rs, gate = serve(ServiceConfig(queue_size=4), gated=True)
    gate.open.clear()
    calls = gate.calls
    data = assets["images"]["normal0.png"].read_bytes()
    results = {}
    first = threading.Thread(
        target=lambda: results.__setitem__("running", post_image(rs.url, data, "?deadline_ms=400"))
    )
    first.start()
    wait_for(lambda: gate.calls == calls + 1)
    t0 = time.monotonic()
    status, _, out = post_image(rs.url, data, "?deadline_ms=300")
    assert status == 504 and "queued" in out["error"] and 0.25 < time.monotonic() - t0 < 5
    first.join()
    assert results["running"][0] == 504 and "running" in results["running"][2]["error"]
    gate.open.set()
    wait_for(lambda: rs.service.queue_depth == 0)
    assert gate.calls == calls + 1  # the request that timed out in the queue never ran
    assert post_image(rs.url, data, headers={"X-Deadline-Ms": "5000"})[0] == 200
    assert post_image(rs.url, data, "?deadline_ms=soon")[0] == 400
    vals = parse_metrics(request(rs.url, path="/metrics")[2].decode())
    assert vals['spade_edge_inspect_requests_total{outcome="deadline"}'] == 2


def test_errors_are_4xx_and_the_connection_stays_usable(serve, assets):
    import http.client

    rs, gate = serve(gated=True)
    conn = http.client.HTTPConnection("127.0.0.1", rs.httpd.port, timeout=10)
    good = assets["images"]["normal2.png"].read_bytes()

    def post(body, headers=None, path="/inspect"):
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()

    assert post(b"not an image")[0] == 415
    assert post(good)[0] == 200  # same connection
    assert post(good[: len(good) // 2])[0] == 400
    assert post(b"")[0] == 400
    status, body = post(good, {"Content-Type": "multipart/form-data"})
    assert status == 400 and b"boundary" in body
    assert post(good)[0] == 200
    gate.fail_next = True
    status, body = post(good)
    assert status == 500 and b"simulated device failure" in body
    assert post(good)[0] == 200  # the worker survived
    conn.close()
    assert request(rs.url, "PUT", "/inspect", b"x")[0] == 405
    assert request(rs.url, "POST", "/nope", b"x")[0] == 404
    assert request(rs.url, path="/nope")[0] == 404
    assert request(rs.url, path="/inspect")[0] == 405
    status, _, body = request(rs.url, "POST", "/inspect", b"x" * 100, {"Transfer-Encoding": "chunked"})
    assert status in (400, 411)


def test_too_large_body_is_refused_before_reading(serve, assets):
    rs, _ = serve(ServiceConfig(max_bytes=1000))
    status, h, out = post_image(rs.url, b"\0" * 5000)
    assert status == 413 and "MiB" in out["error"] and h.get("connection") == "close"


def test_reload_swaps_generation_and_refuses_bad_input(serve, assets):
    rs, _ = serve(ServiceConfig(reload_dirs=(str(assets["dir"]),)))
    (assets["dir"] / "corrupt.onnx").write_bytes(b"\x08\x01garbage" * 10)
    data = assets["images"]["normal3.png"].read_bytes()
    status, _, body = request(rs.url, "POST", "/reload", json.dumps({"gallery": str(assets["gallery_b"])}).encode())
    info = json.loads(body)
    assert status == 200 and info["generation"] == 2 and info["gallery"] == os.path.realpath(assets["gallery_b"])
    out = post_image(rs.url, data)[2]
    assert out["generation"] == 2 and all(n.startswith("b_") for n in out["neighbors"])
    # failures keep generation 2 serving
    cases = [
        (json.dumps({"gallery": "/nonexistent/x.gallery"}).encode(), 403, "not a file this service may load"),
        (json.dumps({"model": str(assets["other_model"])}).encode(), 422, "rebuild the gallery"),
        (json.dumps({"model": str(assets["dir"] / "corrupt.onnx")}).encode(), 422, "reload failed"),
        (b"{not json", 400, "not JSON"),
        (json.dumps({"gallery": "x", "extra": 1}).encode(), 400, "must be JSON"),
        (json.dumps(["x"]).encode(), 400, "must be JSON"),
    ]
    for payload, code, words in cases:
        status, _, body = request(rs.url, "POST", "/reload", payload)
        assert status == code and words in json.loads(body)["error"], body
    assert post_image(rs.url, data)[2]["generation"] == 2
    status, _, body = request(rs.url, "POST", "/reload")  # no body: re-read the same files
    assert status == 200 and json.loads(body)["generation"] == 3
    vals = parse_metrics(request(rs.url, path="/metrics")[2].decode())
    assert (
        vals['spade_edge_reloads_total{outcome="ok"}'] == 2 and vals['spade_edge_reloads_total{outcome="failed"}'] == 2
    )
    assert vals["spade_edge_model_generation"] == 3


def test_reload_loads_only_files_under_its_directories_and_says_nothing_of_others(serve, assets, tmp_path):
    """Issue 17: /reload loaded any path, and its errors told whether a path existed ('no such
    gallery' for one, a parse error for another). Now only files under reload_dirs (symlinks and
    '..' resolved first), and one answer for every other path, existing or not."""
    allowed = tmp_path / "galleries"
    allowed.mkdir()
    (allowed / "b.gallery").write_bytes(assets["gallery_b"].read_bytes())
    (allowed / "escape.gallery").symlink_to(assets["gallery_a"])  # points out of the directory
    outside = tmp_path / "secret.txt"
    outside.write_text("not for you")
    rs, _ = serve(ServiceConfig(reload_dirs=(str(allowed),)))
    answers = {}
    for name, path in {
        "missing": "/nonexistent/x.gallery",
        "exists": str(outside),
        "passwd": "/etc/passwd",
        "dotdot": str(allowed / ".." / "secret.txt"),
        "symlink": str(allowed / "escape.gallery"),
        "dir": str(allowed),
        "missing inside": str(allowed / "nope.gallery"),
    }.items():
        status, _, body = request(rs.url, "POST", "/reload", json.dumps({"gallery": path}).encode())
        answers[name] = (status, json.loads(body)["error"])
    assert len(set(answers.values())) == 1, answers  # the same answer, whatever exists
    status, error = answers["missing"]
    assert status == 403 and "/" not in error and "nonexistent" not in error
    status, _, body = request(rs.url, "POST", "/reload", json.dumps({"gallery": str(allowed / "b.gallery")}).encode())
    assert status == 200 and json.loads(body)["generation"] == 2
    (allowed / "bad.gallery").write_bytes(b"garbage" * 100)
    status, _, body = request(rs.url, "POST", "/reload", json.dumps({"gallery": str(allowed / "bad.gallery")}).encode())
    error = json.loads(body)["error"]
    assert status == 422 and str(allowed) not in error and "bad.gallery" in error, error
    # without reload directories only the current files are re-read
    rs2, _ = serve(ServiceConfig())
    status, _, body = request(rs2.url, "POST", "/reload", json.dumps({"gallery": str(allowed / "b.gallery")}).encode())
    assert status == 403 and "--reload-dir" in json.loads(body)["error"]
    assert request(rs2.url, "POST", "/reload")[0] == 200


def test_reload_token(serve, assets):
    rs, _ = serve(ServiceConfig(reload_token="s3cret-token"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Reload-Token": "s3cret-toke"}):
        status, h, body = request(rs.url, "POST", "/reload", b"{}", headers)
        assert status == 401 and "token" in json.loads(body)["error"] and h.get("connection") == "close"
    assert request(rs.url, "POST", "/reload", b"{}", {"Authorization": "Bearer s3cret-token"})[0] == 200
    assert request(rs.url, "POST", "/reload", b"{}", {"X-Reload-Token": "s3cret-token"})[0] == 200
    assert rs.service.current.generation == 3


def _public_address() -> str | None:
    """An address of this machine that is not loopback (a client connecting to it is 'remote')."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


@pytest.mark.parametrize("mode,expected", [("local", 403), ("remote", 200), ("off", 403)])
def test_reload_from_another_machine_needs_remote(assets, mode, expected):
    """Issue 17: reload was open to anyone who could reach the port. By default (local) only
    clients on this machine may reload; 'remote' lets others; 'off' nobody."""
    addr = _public_address()
    if addr is None:
        pytest.skip("no non-loopback address on this machine to connect from")
    svc = InspectionService(ServiceConfig(reload=mode, warmup=0), device="cpu", threads=1)
    rs = RunningService(svc, host="0.0.0.0")
    try:
        svc.load(assets["model"], assets["gallery_a"])
        port = rs.httpd.port
        status, _, body = request(f"http://{addr}:{port}", "POST", "/reload", b"{}")
        assert status == expected, body
        if mode != "remote":
            assert "reload" in json.loads(body)["error"]
        local = request(f"http://127.0.0.1:{port}", "POST", "/reload", b"{}")[0]
        assert local == (403 if mode == "off" else 200)
    finally:
        rs.stop()


def test_a_second_reload_while_one_runs_is_409(serve, assets):
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slow_loader(model, gallery):
        calls.append(gallery)
        if len(calls) > 1:
            entered.set()
            assert release.wait(30)
        return Detector.load(model, gallery, device="cpu", threads=1)

    rs, _ = serve(loader=slow_loader)
    t = threading.Thread(target=lambda: request(rs.url, "POST", "/reload", b"{}"))
    t.start()
    assert entered.wait(10)
    status, h, body = request(rs.url, "POST", "/reload", b"{}")
    assert status == 409 and "in progress" in json.loads(body)["error"]
    assert post_image(rs.url, assets["images"]["normal0.png"].read_bytes())[0] == 200  # serving meanwhile
    release.set()
    t.join()
    assert rs.service.current.generation == 2


def test_reload_can_be_disabled(serve):
    rs, _ = serve(ServiceConfig(reload="off"))
    status, _, body = request(rs.url, "POST", "/reload", b"{}")
    assert status == 403 and "disabled" in json.loads(body)["error"]


def test_open_connections_are_capped(serve, assets):
    rs, _ = serve(ServiceConfig(max_connections=2, read_timeout=2.0))
    idle = [socket.create_connection(("127.0.0.1", rs.httpd.port)) for _ in range(2)]
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", rs.httpd.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 503")
    with socket.create_connection(("127.0.0.1", rs.httpd.port), timeout=5) as s:  # health is still answered
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    for s in idle:
        s.close()
    # the server notices each closed socket on its own thread: until both slots are free, a request
    # may still meet the cap, so ask until the metrics come
    answers = []
    wait_for(lambda: answers.append(request(rs.url, path="/metrics")) or answers[-1][0] == 200)
    vals = parse_metrics(answers[-1][2].decode())
    assert vals["spade_edge_connections_refused_total"] >= 1


def test_health_says_stalled_when_one_image_holds_the_worker(serve, assets):
    rs, gate = serve(ServiceConfig(stall_after=0.3, deadline=30), gated=True)
    gate.open.clear()
    t = threading.Thread(target=lambda: post_image(rs.url, assets["images"]["normal0.png"].read_bytes()))
    t.start()
    wait_for(lambda: rs.service.busy)
    time.sleep(0.4)
    status, _, body = request(rs.url, path="/health")
    assert status == 503 and json.loads(body)["status"] == "stalled"
    gate.open.set()
    t.join()
    assert request(rs.url, path="/health")[0] == 200


def test_a_client_that_stalls_mid_body_gets_408_and_frees_its_slot(serve, assets):
    rs, _ = serve(ServiceConfig(read_timeout=0.5, queue_size=1))
    with socket.create_connection(("127.0.0.1", rs.httpd.port), timeout=10) as s:
        s.sendall(b"POST /inspect HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"not received within 0.5 s" in answer
    wait_for(lambda: rs.service.queue_depth == 0)
    assert post_image(rs.url, assets["images"]["normal0.png"].read_bytes())[0] == 200
