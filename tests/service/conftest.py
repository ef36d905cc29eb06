"""Fixtures of the service tests: a tiny model, two galleries of normal images that differ (to see
which one answered), test images, and the service run in-process or as a real process."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ..conftest import tiny_onnx

ROOT = Path(__file__).resolve().parents[2]


def _png(arr, path):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """model.onnx, gallery A (names a_*), gallery B (names b_*), and test images (name -> path)."""
    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.features import backend_from_model

    d = tmp_path_factory.mktemp("service")
    model = d / "tiny.onnx"
    tiny_onnx(model)
    other = d / "other.onnx"
    tiny_onnx(other, fingerprint="sha256:another-family")
    rng = np.random.default_rng(0)
    paths = {}
    for tag, lo, hi in (("a", 100, 140), ("b", 90, 150)):
        folder = d / f"good_{tag}"
        folder.mkdir()
        imgs = [
            _png(rng.integers(lo, hi, (40, 48, 3), dtype=np.uint8), folder / f"{tag}_{i:02d}.png") for i in range(12)
        ]
        backend = backend_from_model(model)
        paths[tag] = gallery_from_images(backend, imgs, d / f"{tag}.gallery", show_progress=False).path
    tests = d / "test"
    tests.mkdir()
    images = {}
    for i in range(4):
        images[f"normal{i}.png"] = _png(rng.integers(100, 140, (40, 48, 3), dtype=np.uint8), tests / f"normal{i}.png")
    images["bright.png"] = _png(np.full((40, 48, 3), 250, np.uint8), tests / "bright.png")
    images["dark.jpg"] = tests / "dark.jpg"
    from PIL import Image

    Image.fromarray(np.full((64, 80, 3), 20, np.uint8)).save(images["dark.jpg"], quality=90)
    images["gray.png"] = _png(rng.integers(100, 140, (50, 50), dtype=np.uint8), tests / "gray.png")
    return {
        "dir": d,
        "model": model,
        "other_model": other,
        "gallery_a": paths["a"],
        "gallery_b": paths["b"],
        "images": images,
    }


def request(
    url: str, method: str = "GET", path: str = "/", body: bytes | None = None, headers=None, timeout: float = 30.0
):
    """(status, headers dict, body bytes) of one request on a new connection."""
    host, port = url.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def multipart(data: bytes, filename: str = "part.png", field: str = "image") -> tuple[bytes, str]:
    b = "spadeEdgeTestBoundary7d1e"
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="station"\r\n\r\nline-3\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{b}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={b}"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, checking every line is well formed."""
    out = {}
    label = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    pat = re.compile(
        r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{" + label + r"(?:," + label + r")*\})? "
        r"([-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|Inf|NaN))$"
    )
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        mt = pat.match(line)
        assert mt, f"malformed metrics line: {line!r}"
        out[mt.group(1) + (mt.group(2) or "")] = float(mt.group(3).replace("Inf", "inf"))
    return out


class ServerProcess:
    """``python -m spade_edge serve`` on a free loopback port, as a separate process; or
    ``command`` as given (a deployment's own command line, listening on port 0)."""

    def __init__(
        self, model, gallery, tmp: Path, *args: str, env: dict | None = None, command: list[str] | None = None
    ):
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self._logf = open(self.log, "wb")
        cmd = command or [
            sys.executable,
            "-m",
            "spade_edge",
            "serve",
            "-m",
            str(model),
            "-g",
            str(gallery),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
            "--threads",
            "1",
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.url = self._wait_url()

    def _wait_url(self, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log.read_text(errors="replace")
            mt = re.search(r"listening on (http://127\.0\.0\.1:\d+)", text)
            if mt:
                return mt.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{text}")
            time.sleep(0.05)
        raise RuntimeError("server did not start listening")

    def wait_ready(self, timeout: float = 60.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                status, _, body = request(self.url, path="/health", timeout=5)
                if status == 200:
                    return json.loads(body)
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode
