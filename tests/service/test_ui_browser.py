"""The operator's page in a real browser: Debian's headless Chromium driven by Playwright against
a real ``python -m spade_edge serve --ui`` on loopback, with a real (tiny) model and gallery.

The tests run in order on one service and one page, as an operator would: a result appears, a
pixel is explained, a part is marked good, the change is undone, the threshold is moved and moved
back, and changes without the token or from another origin are refused. Each state is saved as a
screenshot under $SPADE_EDGE_UI_SCREENSHOTS (or a folder of pytest's tmp dir), printed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import ServerProcess, request
from .test_ui_api import TOKEN, inspect, start_ui, state, ui_assets  # noqa: F401 - ui_assets is a fixture

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [test] extra has it)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it as root)"),
    pytest.mark.slow,
]
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("SPADE_EDGE_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    yield d
    print(f"\noperator page screenshots: {d} ({', '.join(sorted(p.name for p in d.glob('*.png')))})")


@pytest.fixture(scope="module")
def served(ui_assets, tmp_path_factory):  # noqa: F811 - the fixture imported above
    s, gallery = start_ui(ui_assets, tmp_path_factory.mktemp("ui-browser"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless (Playwright downloads no browser: it is given this one)."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, served):
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = ctx.new_page()
    pg.goto(served.url + "/ui/")
    pg.wait_for_selector("#status.ok", timeout=WAIT_MS)
    yield pg
    ctx.close()


def wait_shown(page, rid: str) -> None:
    """The live view shows result ``rid`` (and its explanation is drawn), following live results
    again if a click on a pixel or a past result had stopped it."""
    if page.get_attribute("#follow", "aria-pressed") == "false":
        page.click("#follow")
    page.wait_for_selector(f'#banner[data-id="{rid}"]', timeout=WAIT_MS)
    page.wait_for_function("() => document.getElementById('match-info').dataset.matchedImage !== undefined")


def set_token(page, token: str) -> None:
    page.click("#settings-open")
    page.fill("#token", token)
    page.fill("#operator", "line 3 tester")
    page.click("#settings-save")


def review_card(page, rid: str):
    page.click('#tabs button[data-tab="review"]')
    card = page.locator(f'#queue .card[data-id="{rid}"]')
    card.wait_for(timeout=WAIT_MS)
    return card


def test_live_view_shows_a_new_result(page, served, ui_assets, shots):  # noqa: F811
    r = inspect(served.url, ui_assets["normal"])
    wait_shown(page, r["id"])
    verdict = {"OK": "OK", "NOT_OK": "NOT OK"}[r["verdict"]]
    assert page.inner_text("#verdict") == verdict
    assert f"{r['score']:.3f}" in page.inner_text("#score-text")
    b = inspect(served.url, ui_assets["bright"])  # a second one replaces it without a reload
    wait_shown(page, b["id"])
    assert page.inner_text("#verdict") == "NOT OK"
    assert page.locator("#recent .thumb").count() == 2
    assert page.locator("#neighbors .thumb").count() == len(b["neighbors"])
    page.screenshot(path=str(shots / "01-live-not-ok.png"))


def test_clicking_a_pixel_shows_its_correspondence(page, served, ui_assets, shots):  # noqa: F811
    """The worst pixel's match agrees with what POST /inspect said; any other pixel clicked agrees
    with the JSON API's answer for that pixel."""
    r = inspect(served.url, ui_assets["bright"])
    wait_shown(page, r["id"])
    w, size = r["worst_pixel"], state(served.url)["results"][-1]["size"]
    box = page.locator("#part").bounding_box()

    def click(row, col):
        page.mouse.click(box["x"] + (col + 0.5) * box["width"] / size, box["y"] + (row + 0.5) * box["height"] / size)
        page.wait_for_function(
            "([r, c]) => { const d = document.getElementById('match-info').dataset; return d.row === r && d.col === c; }",
            arg=[str(row), str(col)],
            timeout=WAIT_MS,
        )
        return page.eval_on_selector("#match-info", "e => ({...e.dataset})")

    shown = click(w["row"], w["col"])
    assert shown["matchedImage"] == w["matched_image"]
    assert float(shown["matchedRow"]) == w["matched_row"] and float(shown["matchedCol"]) == w["matched_col"]
    for row, col in ((size - 1, size // 2), (size // 3, size - 2)):
        shown = click(row, col)
        status, _, body = request(served.url, path=f"/ui/api/results/{r['id']}/pixel?row={row}&col={col}")
        api = json.loads(body)
        assert status == 200
        assert shown["matchedImage"] == api["matched_image"]
        assert float(shown["matchedRow"]) == api["matched_row"] and float(shown["matchedCol"]) == api["matched_col"]
        assert float(shown["distance"]) == pytest.approx(api["distance"])
        assert api["matched_image"] in page.inner_text("#match-info")
    # with a mouse, hovering explains too
    row, col = size // 2, size // 4
    page.mouse.move(box["x"] + (col + 0.5) * box["width"] / size, box["y"] + (row + 0.5) * box["height"] / size)
    page.wait_for_function(
        "([r, c]) => { const d = document.getElementById('match-info').dataset; return d.row === r && d.col === c; }",
        arg=[str(row), str(col)],
        timeout=WAIT_MS,
    )
    api = json.loads(request(served.url, path=f"/ui/api/results/{r['id']}/pixel?row={row}&col={col}")[2])
    assert page.eval_on_selector("#match-info", "e => e.dataset.matchedImage") == api["matched_image"]
    page.mouse.click(
        box["x"] + (w["col"] + 0.5) * box["width"] / size, box["y"] + (w["row"] + 0.5) * box["height"] / size
    )
    page.screenshot(path=str(shots / "02-correspondence.png"))


def test_good_part_makes_the_next_inspection_ok_and_undo_restores(page, served, ui_assets, shots):  # noqa: F811
    r = inspect(served.url, ui_assets["bright"])
    assert r["verdict"] == "NOT_OK"
    set_token(page, TOKEN)
    card = review_card(page, r["id"])
    card.locator(".note").fill("glare, part is fine")
    page.screenshot(path=str(shots / "03-review-queue.png"))
    gen = state(served.url)["gallery_generation"]
    t0 = time.perf_counter()
    with page.expect_response(lambda resp: resp.url.endswith("/review"), timeout=WAIT_MS) as resp:
        card.locator("button.good").click()
    assert resp.value.status == 200
    after = inspect(served.url, ui_assets["bright"])
    elapsed = time.perf_counter() - t0
    assert after["verdict"] == "OK", after
    assert state(served.url)["gallery_generation"] == gen + 1
    print(
        f"\nbrowser: 'good part' click to the next /inspect answered OK with the grown gallery: {elapsed * 1e3:.0f} ms"
    )
    page.click('#tabs button[data-tab="live"]')
    wait_shown(page, after["id"])
    assert page.inner_text("#verdict") == "OK"
    page.screenshot(path=str(shots / "04-after-good-part.png"))

    page.click('#tabs button[data-tab="history"]')
    page.wait_for_selector("#gen-table tbody tr", timeout=WAIT_MS)
    assert "good part added" in page.inner_text("#gen-table")
    assert "glare" not in page.inner_text("#gen-table")  # the note is in the audit log
    assert "line 3 tester" in page.inner_text("#audit-table")
    with page.expect_response(lambda resp: resp.url.endswith("/rollback"), timeout=WAIT_MS) as resp:
        page.click("#undo")
    assert resp.value.status == 200
    assert state(served.url)["gallery_generation"] == gen + 2
    back = inspect(served.url, ui_assets["bright"])
    assert back["verdict"] == "NOT_OK" and back["score"] == pytest.approx(r["score"])
    page.wait_for_selector("#gen-table tbody tr >> text=back to generation", timeout=WAIT_MS)
    page.screenshot(path=str(shots / "05-history-undone.png"))


def test_threshold_change_applies_and_is_undone(page, served, ui_assets, shots):  # noqa: F811
    r = inspect(served.url, ui_assets["bright"])
    assert r["verdict"] == "NOT_OK"
    old = r["threshold"]
    page.click('#tabs button[data-tab="threshold"]')
    page.wait_for_function("() => document.getElementById('thr-value').value !== ''", timeout=WAIT_MS)
    assert float(page.input_value("#thr-value")) == pytest.approx(old, abs=1e-4)
    new = round(r["score"] * 1.5, 1)
    page.fill("#thr-value", str(new))
    assert "false rejects" in page.inner_text("#thr-rates")
    page.screenshot(path=str(shots / "06-threshold.png"))
    with page.expect_response(lambda resp: resp.url.endswith("/threshold"), timeout=WAIT_MS) as resp:
        page.click("#thr-apply")
    assert resp.value.status == 200
    ok = inspect(served.url, ui_assets["bright"])
    assert ok["threshold"] == pytest.approx(new) and ok["verdict"] == "OK"
    page.click('#tabs button[data-tab="history"]')
    page.wait_for_selector("#gen-table tbody tr >> text=threshold", timeout=WAIT_MS)
    with page.expect_response(lambda resp: resp.url.endswith("/rollback"), timeout=WAIT_MS) as resp:
        page.click("#undo")
    assert resp.value.status == 200
    back = inspect(served.url, ui_assets["bright"])
    assert back["threshold"] == pytest.approx(old) and back["verdict"] == "NOT_OK"
    page.click('#tabs button[data-tab="health"]')
    page.wait_for_selector("#health-list dt", timeout=WAIT_MS)
    assert "Scorer" in page.inner_text("#health-list")
    page.screenshot(path=str(shots / "07-health.png"))


@pytest.fixture
def other_origin():
    """Another site on this machine (another port: another origin), serving one harmless page."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><p>another site</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_changes_without_the_token_or_from_another_origin_are_refused(
    page,
    served,
    ui_assets,  # noqa: F811
    shots,
    other_origin,
):
    r = inspect(served.url, ui_assets["bright"])
    gen = state(served.url)["gallery_generation"]
    set_token(page, "not-the-token")
    card = review_card(page, r["id"])
    with page.expect_response(lambda resp: resp.url.endswith("/review"), timeout=WAIT_MS) as resp:
        card.locator("button.good").click()
    assert resp.value.status == 401
    page.wait_for_selector("#toast.error", timeout=WAIT_MS)
    assert "401" in page.inner_text("#toast")
    page.screenshot(path=str(shots / "08-refused-without-token.png"))
    assert state(served.url)["gallery_generation"] == gen

    # another site's page, in the same browser, that knows the token, tries to mark the part good:
    # a plain (no-cors) POST and a JSON one with the token; the browser asks first (a preflight),
    # which the service refuses, and what reaches it is refused: nothing changes
    evil = page.context.new_page()
    answers: list[tuple[str, int]] = []
    evil.on("response", lambda resp: answers.append((resp.request.method, resp.status)))
    evil.goto(other_origin + "/")
    url = f"{served.url}/ui/api/results/{r['id']}/review"
    for mode in ("no-cors", "cors"):
        out = evil.evaluate(
            """([url, token, gen, mode]) => fetch(url, {method: 'POST', mode, headers: mode === 'cors' ?
                {'Content-Type': 'application/json', Authorization: 'Bearer ' + token} : {},
                body: JSON.stringify({decision: 'good', generation: gen})})
                .then(r => 'answered ' + r.type + ' ' + r.status, e => 'blocked: ' + e.message)""",
            [url, TOKEN, gen, mode],
        )
        assert out.startswith("blocked") or out == "answered opaque 0", out  # the page learns nothing
    time.sleep(0.5)  # let the last response event arrive
    evil.close()
    refused = [(m, st) for m, st in answers[1:]]  # after the other site's own page
    assert refused and all(st in (401, 403) for _, st in refused), refused
    assert state(served.url)["gallery_generation"] == gen
    assert any(q["id"] == r["id"] for q in state(served.url)["queue"])
    print(f"\nanother origin's requests, as the service answered them: {refused}")
    set_token(page, TOKEN)


def test_real_parts_screenshot(browser, lite0_onnx, elpv_normal, tmp_path, shots):
    """The page on real parts (EfficientNet-Lite0, ELPV solar cells): a cracked cell is shown NOT OK
    with the normal cell its worst pixel matched. Its screenshot is the README's picture
    (docs/img/operator-page.png: this one, resized to 880 px and reduced to 128 colours)."""
    from spade_edge.datasets import elpv_cells
    from spade_edge.runtime.build import gallery_from_images
    from spade_edge.runtime.features import backend_from_model

    gallery = tmp_path / "elpv.gallery"
    gallery_from_images(backend_from_model(lite0_onnx), elpv_normal[:40], gallery, show_progress=False)
    s = ServerProcess(lite0_onnx, gallery, tmp_path, "--ui", "--data-dir", str(tmp_path / "data"))
    try:
        s.wait_ready()
        inspect(s.url, elpv_normal[40])
        cells = elpv_cells(1.0, "mono")[:10]
        scores = [inspect(s.url, p)["score"] for p in cells]
        bad = inspect(s.url, cells[int(np.argmax(scores))])  # the most anomalous, shown last
        assert bad["verdict"] == "NOT_OK", bad
        ctx = browser.new_context(viewport={"width": 1100, "height": 900})
        pg = ctx.new_page()
        pg.goto(s.url + "/ui/")
        wait_shown(pg, bad["id"])
        assert pg.inner_text("#verdict") == "NOT OK"
        assert bad["worst_pixel"]["matched_image"] in pg.inner_text("#match-info")
        pg.wait_for_timeout(300)  # the last picture drawn
        pg.screenshot(path=str(shots / "00-real-part.png"))
        ctx.close()
    finally:
        s.stop()
