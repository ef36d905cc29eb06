"""The operator's page endpoints (``serve --ui``) without a browser: token, origin, ids only,
optimistic generations (409), concurrent reviewers, the ring's bound, rollback through the CLI.
A real ``python -m spade_edge serve --ui`` on loopback with a real (tiny) model and gallery."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, ServerProcess, _png, request

TOKEN = "t0ken-for-tests"


@pytest.fixture(scope="module")
def ui_assets(tmp_path_factory):
    """A model, a gallery whose own images score 0 (exact storage, image stage K = 1: a part added
    to it is its own nearest neighbour, as SPADE's explanation promises), a far-off part and a normal one."""
    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.codec import Storage
    from spade_edge.runtime.features import backend_from_model
    from spade_edge.runtime.spade import SpadeConfig

    from ..conftest import tiny_onnx

    d = tmp_path_factory.mktemp("ui")
    model = d / "tiny.onnx"
    tiny_onnx(model)
    rng = np.random.default_rng(0)
    good = d / "good"
    good.mkdir()
    imgs = [_png(rng.integers(100, 140, (40, 48, 3), dtype=np.uint8), good / f"a_{i:02d}.png") for i in range(12)]
    gallery = d / "parts.gallery"
    gallery_from_images(
        backend_from_model(model),
        imgs,
        gallery,
        show_progress=False,
        config=SpadeConfig(k_image=1),
        storage=Storage.exact(),
    )
    bright = _png(np.full((40, 48, 3), 250, np.uint8), d / "bright.png")
    dark = _png(np.full((40, 48, 3), 10, np.uint8), d / "dark.png")
    normal = _png(rng.integers(100, 140, (40, 48, 3), dtype=np.uint8), d / "normal.png")
    return {"dir": d, "model": model, "gallery": gallery, "bright": bright, "dark": dark, "normal": normal}


def start_ui(ui_assets, tmp: Path, *args: str, token: str | None = TOKEN) -> tuple[ServerProcess, Path]:
    """``serve --ui`` on a fresh copy of the gallery (tests change it): (server, gallery path)."""
    import shutil

    gallery = tmp / "parts.gallery"
    shutil.copyfile(ui_assets["gallery"], gallery)
    env = {"SPADE_EDGE_UI_TOKEN": token} if token else {"SPADE_EDGE_UI_TOKEN": ""}
    s = ServerProcess(
        ui_assets["model"], gallery, tmp, "--ui", "--data-dir", str(tmp / "data"), "--warmup", "0", *args, env=env
    )
    s.wait_ready()
    return s, gallery


def inspect(url: str, path: Path, name: str | None = None) -> dict:
    status, _, body = request(url, "POST", f"/inspect?name={name or path.name}", path.read_bytes())
    assert status == 200, body
    return json.loads(body)


def write(url: str, path: str, obj, token: str | None = TOKEN, headers: dict | None = None):
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    h.update(headers or {})
    status, _, body = request(url, "POST", path, json.dumps(obj).encode(), h)
    return status, json.loads(body) if body else {}


def state(url: str) -> dict:
    status, _, body = request(url, path="/ui/api/state")
    assert status == 200
    return json.loads(body)


@pytest.fixture(scope="module")
def ui(ui_assets, tmp_path_factory):
    s, gallery = start_ui(ui_assets, tmp_path_factory.mktemp("ui-serve"))
    yield s, gallery
    s.stop()


def test_page_is_off_unless_asked(ui_assets, tmp_path):
    s = ServerProcess(ui_assets["model"], ui_assets["gallery"], tmp_path, "--warmup", "0")
    try:
        s.wait_ready()
        assert request(s.url, path="/ui/")[0] == 404
        assert request(s.url, path="/ui/api/state")[0] == 404
    finally:
        s.stop()


def test_page_assets_are_the_package_own(ui):
    """Every asset comes from the service (nothing from elsewhere: the page works offline), with a
    policy that forbids loading anything else; nothing outside the three files is served."""
    s, _ = ui
    status, headers, body = request(s.url, path="/ui/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    html = body.decode()
    for ref in ('src="/ui/app.js"', 'href="/ui/style.css"'):
        assert ref in html
    assert "http://" not in html and "https://" not in html
    for asset in ("/ui/app.js", "/ui/style.css"):
        st, _, text = request(s.url, path=asset)
        assert st == 200 and b"http://" not in text and b"https://" not in text
    for bad in ("/ui/station.py", "/ui/../server.py", "/ui/%2e%2e/cli.py", "/ui/__init__.py", "/ui/index.html/x"):
        assert request(s.url, path=bad)[0] == 404, bad


def test_every_page_asset_ships_in_the_wheel():
    """Each file of spade_edge/service/ui matches the package data pyproject.toml ships (an asset
    of a new kind would otherwise be missing from an installed service's page), and each is served."""
    import fnmatch

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the [line] extra brings tomli
        import tomli as tomllib

    from spade_edge.service.station import ASSETS

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "spade_edge.service.ui" in setup["packages"]
    patterns = setup["package-data"]["spade_edge.service.ui"]
    ui = ROOT / "spade_edge" / "service" / "ui"
    files = sorted(p.name for p in ui.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc"))
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
    assert sorted(name for name, _ in ASSETS.values()) == files


def test_writes_need_the_token(ui, ui_assets):
    s, _ = ui
    r = inspect(s.url, ui_assets["bright"])
    assert r["verdict"] == "NOT_OK"
    before = state(s.url)["gallery_generation"]
    review = f"/ui/api/results/{r['id']}/review"
    assert write(s.url, review, {"decision": "good", "generation": before}, token=None)[0] == 401
    assert write(s.url, review, {"decision": "good", "generation": before}, token="wrong")[0] == 401
    assert write(s.url, "/ui/api/threshold", {"threshold": 1e9, "generation": before}, token=None)[0] == 401
    assert write(s.url, "/ui/api/rollback", {"to": None, "generation": before}, token=None)[0] == 401
    assert state(s.url)["gallery_generation"] == before
    assert [q["id"] for q in state(s.url)["queue"]].count(r["id"]) == 1  # still waiting for review


def test_without_a_token_the_page_is_read_only(ui_assets, tmp_path):
    s, gallery = start_ui(ui_assets, tmp_path, token=None)
    try:
        r = inspect(s.url, ui_assets["bright"])
        st = state(s.url)
        assert st["writable"] is False
        status, body = write(s.url, f"/ui/api/results/{r['id']}/review", {"decision": "good", "generation": 0})
        assert status == 403 and "read-only" in body["error"]
        assert write(s.url, "/ui/api/threshold", {"threshold": 5.0, "generation": 0})[0] == 403
        assert state(s.url)["gallery_generation"] == 0
        assert not (tmp_path / "parts.gallery.history").exists()
    finally:
        s.stop()


def test_other_origins_are_refused(ui, ui_assets):
    """With the right token but from another origin (or a cross-site fetch, or a form's body type):
    refused before anything is read or changed."""
    s, _ = ui
    r = inspect(s.url, ui_assets["bright"])
    gen = state(s.url)["gallery_generation"]
    path = f"/ui/api/results/{r['id']}/review"
    body = {"decision": "good", "generation": gen}
    host = s.url.split("//")[1]
    assert write(s.url, path, body, headers={"Origin": "http://evil.example"})[0] == 403
    assert write(s.url, path, body, headers={"Origin": f"http://{host}.evil.example"})[0] == 403
    assert write(s.url, path, body, headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    assert write(s.url, path, body, headers={"Sec-Fetch-Site": "same-site"})[0] == 403
    assert write(s.url, path, body, headers={"Content-Type": "text/plain"})[0] == 415
    assert write(s.url, path, body, headers={"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert state(s.url)["gallery_generation"] == gen
    # the same request from the page's own origin goes through
    ok = write(s.url, path, {"decision": "defect", "note": "scratch"}, headers={"Origin": f"http://{host}"})
    assert ok[0] == 200 and ok[1]["review"]["decision"] == "defect"


def test_ids_only_never_paths(ui, ui_assets):
    s, gallery = ui
    r = inspect(s.url, ui_assets["bright"])
    rid = r["id"]
    for bad in (
        "/ui/api/results/../../../../etc/passwd/input.png",
        "/ui/api/results/..%2f..%2fetc%2fpasswd/input.png",
        f"/ui/api/results/{rid}/../../x",
        "/ui/api/results/" + "a" * 31 + "/input.png",
        f"/ui/api/results/{rid}/gallery/999999.png",
        f"/ui/api/results/{rid}/gallery/-1.png",
        f"/ui/api/results/{rid}/gallery/..%2f..%2fparts.png",
        f"/ui/api/results/{rid}/original",
    ):
        assert request(s.url, path=bad)[0] == 404, bad
    assert request(s.url, path=f"/ui/api/results/{rid}/pixel?row=-1&col=0")[0] == 400
    assert request(s.url, path=f"/ui/api/results/{rid}/pixel?row=/etc&col=0")[0] == 400
    gen = state(s.url)["gallery_generation"]
    assert write(s.url, "/ui/api/results/..%2f..%2fetc/review", {"decision": "good", "generation": gen})[0] == 404
    assert write(s.url, "/ui/api/rollback", {"to": "../../parts.gallery", "generation": gen})[0] == 400
    assert write(s.url, "/ui/api/rollback", {"to": 999, "generation": gen})[0] == 409  # no such generation kept
    assert write(s.url, "/ui/api/threshold", {"threshold": "/etc/passwd", "generation": gen})[0] == 400
    # the image a review adds is named by the result's id, in the data directory, whatever the request named it
    evil = inspect(s.url, ui_assets["dark"], name="..%2F..%2Fevil.png")
    st, out = write(s.url, f"/ui/api/results/{evil['id']}/review", {"decision": "good", "generation": gen})
    assert st == 200, out
    saved = list((gallery.parent / "data" / "images").iterdir())
    assert [p.name for p in saved] == [f"{evil['id']}.png"]
    assert not (gallery.parent.parent / "evil.png").exists()


def test_good_part_stale_generation_and_rollback_through_the_cli(ui, ui_assets, capsys):
    """'good part' makes the next inspection of that image OK (the time it takes is printed); a
    write that saw an older generation gets 409; ``gallery rollback`` puts the previous generation
    back and a reload brings back the previous verdict; ``gallery history`` lists the changes."""
    s, gallery = ui
    r = inspect(s.url, ui_assets["bright"])
    assert r["verdict"] == "NOT_OK"
    st0 = state(s.url)
    gen, images = st0["gallery_generation"], json.loads(request(s.url, path="/health")[2])["gallery_images"]
    t0 = time.perf_counter()
    status, out = write(s.url, f"/ui/api/results/{r['id']}/review", {"decision": "good", "generation": gen})
    after = inspect(s.url, ui_assets["bright"])
    elapsed = time.perf_counter() - t0
    assert status == 200, out
    assert out["gallery_generation"] == gen + 1 and out["gallery_images"] == images + 1
    assert after["verdict"] == "OK" and after["score"] < r["threshold"]
    with capsys.disabled():
        print(
            f"\n'good part' to the next request answered with the grown gallery: {elapsed * 1e3:.1f} ms "
            f"(gallery add {out['change_ms']} ms, reload {out['reload_ms']} ms; tiny model, CPU)"
        )
    # a second reviewer who saw the old generation: 409, nothing changed
    other = inspect(s.url, ui_assets["dark"])
    status, body = write(s.url, f"/ui/api/results/{other['id']}/review", {"decision": "good", "generation": gen})
    assert status == 409 and body["gallery_generation"] == gen + 1
    status, body = write(s.url, "/ui/api/threshold", {"threshold": 1.0, "generation": gen})
    assert status == 409
    assert state(s.url)["gallery_generation"] == gen + 1
    # a result reviewed twice: 409
    status, body = write(s.url, f"/ui/api/results/{r['id']}/review", {"decision": "defect"})
    assert status == 409 and body["review"]["decision"] == "good"

    cli = [sys.executable, "-m", "spade_edge", "gallery"]
    hist = subprocess.run([*cli, "history", str(gallery)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert hist.returncode == 0, hist.stderr
    assert f"{gen + 1}" in hist.stdout and "add" in hist.stdout
    rb = subprocess.run([*cli, "rollback", str(gallery)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert rb.returncode == 0, rb.stderr
    assert state(s.url)["gallery_generation"] == gen + 2
    assert request(s.url, "POST", "/reload")[0] == 200
    back = inspect(s.url, ui_assets["bright"])
    assert back["verdict"] == "NOT_OK" and back["score"] == pytest.approx(r["score"])
    assert json.loads(request(s.url, path="/health")[2])["gallery_images"] == images
    log = [json.loads(x) for x in (gallery.parent / "parts.gallery.history" / "log.jsonl").read_text().splitlines()]
    assert [e["action"] for e in log[-2:]] == ["add", "rollback"] and log[-1]["client"].startswith("cli ")
    audit = [json.loads(x) for x in (gallery.parent / "data" / "audit.jsonl").read_text().splitlines()]
    assert any(a["action"] == "good_part" and a["result"] == r["id"] and a["client"]["address"] for a in audit)


def test_concurrent_reviewers_lose_nothing(ui, ui_assets):
    """Two reviewers mark two parts good at once, both having seen the same generation: one wins,
    the other gets 409 (and, retrying with the new generation, gets its part in too)."""
    s, gallery = ui
    a, b = inspect(s.url, ui_assets["bright"], "a.png"), inspect(s.url, ui_assets["dark"], "b.png")
    gen = state(s.url)["gallery_generation"]
    images = json.loads(request(s.url, path="/health")[2])["gallery_images"]
    answers: dict = {}

    def go(r):
        answers[r["id"]] = write(s.url, f"/ui/api/results/{r['id']}/review", {"decision": "good", "generation": gen})

    threads = [threading.Thread(target=go, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(st for st, _ in answers.values())
    assert codes == [200, 409], answers
    loser = next(rid for rid, (st, _) in answers.items() if st == 409)
    st, out = write(s.url, f"/ui/api/results/{loser}/review", {"decision": "good", "generation": gen + 1})
    assert st == 200 and out["gallery_images"] == images + 2 and out["gallery_generation"] == gen + 2
    assert inspect(s.url, ui_assets["bright"])["verdict"] == "OK"
    assert inspect(s.url, ui_assets["dark"])["verdict"] == "OK"


def test_line_triggers_reach_the_page(ui_assets, tmp_path):
    """``serve --ui --tcp``: a part triggered by the line (TCP text protocol, image uploaded to
    POST /frames) shows on the page; marked good there, the line's next trigger of it is OK."""
    import re
    import socket

    s, _ = start_ui(ui_assets, tmp_path, "--tcp", "0")

    def trigger() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(b"TRIGGER\r\n")
            return c.makefile("rb").readline().decode().strip()

    try:
        end = time.monotonic() + 30
        while not (mt := re.search(r"text protocol listening on tcp://127\.0\.0\.1:(\d+)", s.log.read_text())):
            assert time.monotonic() < end, s.log.read_text()
            time.sleep(0.05)
        port = int(mt.group(1))
        body = ui_assets["bright"].read_bytes()
        assert request(s.url, "POST", "/frames?name=from-line.png", body)[0] == 202
        assert trigger().split(",")[2] == "NOT_OK"
        st = state(s.url)
        shown = [r for r in st["results"] if r["image"] == "from-line.png"]
        assert len(shown) == 1 and shown[0]["verdict"] == "NOT_OK" and shown[0]["queued"]
        status, out = write(
            s.url,
            f"/ui/api/results/{shown[0]['id']}/review",
            {"decision": "good", "generation": st["gallery_generation"]},
        )
        assert status == 200, out
        assert request(s.url, "POST", "/frames?name=from-line.png", body)[0] == 202
        assert trigger().split(",")[2] == "OK"
    finally:
        s.stop()


def test_results_kept_are_bounded(ui_assets, tmp_path):
    s, _ = start_ui(ui_assets, tmp_path, "--ui-results", "3")
    try:
        ids = [inspect(s.url, ui_assets["normal"], f"n{i}.png")["id"] for i in range(5)]
        st = state(s.url)
        assert [r["id"] for r in st["results"]] == ids[-3:]
        assert request(s.url, path=f"/ui/api/results/{ids[0]}/input.png")[0] == 404
        assert request(s.url, path=f"/ui/api/results/{ids[-1]}/input.png")[0] == 200
        assert json.loads(request(s.url, path="/ui/api/health")[2])["results_kept"] == 3
    finally:
        s.stop()


def test_borderline_ok_results_join_the_review_queue(ui_assets, tmp_path):
    """--ui-borderline 0.9: an OK part scoring at 90 % of the threshold or more waits for review
    too; a plainly good one does not."""
    from spade_edge.runtime.gallery import Gallery

    th = Gallery.load(ui_assets["gallery"]).thresholds
    worst = th["heldout"][int(np.argmax(th["heldout_scores"]))]  # the threshold is its score
    s, _ = start_ui(ui_assets, tmp_path, "--ui-borderline", "0.9")
    try:
        near = inspect(s.url, ui_assets["dir"] / "good" / worst)
        plain = inspect(s.url, ui_assets["dir"] / "good" / ("a_00.png" if worst != "a_00.png" else "a_01.png"))
        assert near["verdict"] == "OK" and near["score"] >= 0.9 * near["threshold"]
        assert plain["verdict"] == "OK" and plain["score"] < 0.9 * plain["threshold"]
        queued = [q["id"] for q in state(s.url)["queue"]]
        assert near["id"] in queued and plain["id"] not in queued
    finally:
        s.stop()


def test_rates_per_threshold():
    from spade_edge.service.station import rates

    out = rates([1.0, 2.0, 3.0, 4.0], [2.5, 5.0], [2.0, 3.0, 5.0])
    assert [(o["false_reject"], o["miss"]) for o in out] == [(0.5, 0.0), (0.25, 0.5), (0.0, 1.0)]
    assert rates([], [], [1.0]) == [{"threshold": 1.0, "false_reject": None, "miss": None}]


def test_latency_quantiles_from_the_histogram():
    from spade_edge.service.metrics import Histogram

    h = Histogram("x", "x", buckets=(0.01, 0.02, 0.04))
    assert h.quantiles() == {"p50": None, "p90": None, "p99": None}
    for v in [0.005] * 50 + [0.015] * 40 + [0.03] * 10:
        h.observe(v)
    q = h.quantiles()
    assert q["p50"] == pytest.approx(10.0) and q["p90"] == pytest.approx(20.0) and 20.0 < q["p99"] <= 40.0


@pytest.mark.slow
def test_good_part_time_to_the_grown_gallery_lite0(lite0_onnx, elpv_normal, tmp_path, capsys):
    """With the real model (EfficientNet-Lite0, ImageNet weights) and real solar cells: after
    'good part' the next request is answered by the grown gallery, which retrieves the added cell
    as its own nearest normal image. Prints the time from 'good part' to that answer."""
    from spade_edge.runtime import cpu
    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.features import backend_from_model

    gallery = tmp_path / "elpv.gallery"
    gallery_from_images(backend_from_model(lite0_onnx), elpv_normal[:30], gallery, show_progress=False)
    s = ServerProcess(
        lite0_onnx, gallery, tmp_path, "--ui", "--data-dir", str(tmp_path / "data"), env={"SPADE_EDGE_UI_TOKEN": TOKEN}
    )
    try:
        images = s.wait_ready()["gallery_images"]
        times = []
        for cell in elpv_normal[30:33]:
            r = inspect(s.url, cell)
            gen = state(s.url)["gallery_generation"]
            t0 = time.perf_counter()
            status, out = write(s.url, f"/ui/api/results/{r['id']}/review", {"decision": "good", "generation": gen})
            again = inspect(s.url, cell)
            times.append((time.perf_counter() - t0, out.get("change_ms"), out.get("reload_ms")))
            assert status == 200, out
            assert again["generation"] == out["service_generation"] > r["generation"]
            assert again["neighbors"][0] == f"{r['id']}.png" and again["neighbor_distances"][0] < 1e-3
            assert again["score"] < r["score"]
        assert json.loads(request(s.url, path="/health")[2])["gallery_images"] == images + 3
        with capsys.disabled():
            on = cpu.measured_on()
            print(f"\nLite0 on the CPU ({on['cpu']}; {on['summary']}), gallery of {images}+ cells, --threads 1:")
            for total, add, reload in times:
                print(
                    f"  'good part' to the next answer from the grown gallery: {total * 1e3:.0f} ms (gallery add {add} ms, reload {reload} ms)"
                )
    finally:
        s.stop()
