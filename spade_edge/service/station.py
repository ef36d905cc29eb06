"""The operator's station (``serve --ui``): the page's JSON and image endpoints under ``/ui/``.

Read side: the last results (a bounded ring, :class:`.results.Ring`), for each its input, heat map and
SPADE's correspondences (which normal image and location every pixel matched), the review queue,
the threshold data, the gallery's generations, health. Write side (``POST``): a review ("good
part" adds the image to the gallery), a new image threshold, a rollback to an earlier gallery
generation. Every write:

- needs the station's token (``--ui-token``); without one the station is read-only (403);
- is refused from another origin (``Origin`` / ``Sec-Fetch-Site``) and unless its body is JSON
  (a cross-site form cannot send ``application/json`` without a preflight, which is never allowed);
- names results and generations by id only: nothing a client sends becomes a path;
- changes the gallery under its lock, after checking the generation the client saw
  (409 otherwise: another reviewer came first), keeping the replaced file (generations.py);
- is recorded in ``DATA_DIR/audit.jsonl`` (what, when, which client), and the service reloads
  before the answer: the next request uses the changed gallery.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import generations
from .results import Entry, Ring

if TYPE_CHECKING:
    from .inspector import Done, InspectionService

log = logging.getLogger("spade_edge.service")

ASSETS = {  # URL -> (file in spade_edge/service/ui, content type): the only files served
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_ID = re.compile(r"[0-9a-f]{32}\Z")
MAX_BODY = 1 << 14  # a write's JSON body
MAX_NOTE = 500


@dataclass(frozen=True)
class StationConfig:
    """The page's settings (``serve --ui ...``)."""

    data_dir: Path
    token: str | None = None  # None: read-only page (every write 403)
    results: int = 50  # results kept in memory (the ring), with their images and maps
    max_mb: float = 256.0  # and at most this many MiB of them (the oldest dropped first)
    borderline: float = 0.0  # OK results scoring >= this share of the threshold join the review queue (0: none)
    keep_generations: int = generations.KEEP


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def rates(normal: list[float], defect: list[float], thresholds: list[float]) -> list[dict]:
    """For each threshold: the share of normal scores above it (false rejects) and of defect
    scores at or below it (misses). A score equal to the threshold is OK (detector.py)."""
    n, d = np.asarray(normal, float), np.asarray(defect, float)
    out = []
    for t in thresholds:
        out.append(
            {
                "threshold": t,
                "false_reject": float((n > t).mean()) if len(n) else None,
                "miss": float((d <= t).mean()) if len(d) else None,
            }
        )
    return out


class Station:
    """The page's state and endpoints, attached to an HTTP server (``server.station``)."""

    def __init__(self, service: InspectionService, config: StationConfig):
        self.service, self.config = service, config
        self.ring = Ring(config.results, int(config.max_mb * (1 << 20)))
        self.data_dir = Path(config.data_dir)
        (self.data_dir / "images").mkdir(parents=True, exist_ok=True)
        self._change = threading.Lock()  # one write at a time in this process (the gallery lock: across processes)
        self._reviewed = self._load_reviews()

    # --- recording ------------------------------------------------------------------------------
    def record(self, done: Done, data) -> None:
        """Keep a finished inspection for the page (the service's ``on_result``: HTTP and line
        alike); names it with ``done.id``, which ``POST /inspect`` answers as its ``id``."""
        p, g = done.prediction, done.loaded.detector.gallery
        d = p.to_dict()
        k = self.service.config.neighbors
        neighbors = list(p.neighbors[:k])
        summary = {
            "image": p.name,
            "verdict": p.verdict,
            "score": float(p.score),
            "threshold": g.thresholds.get("image"),
            "neighbors": neighbors,
            "neighbor_distances": [round(float(x), 6) for x in p.neighbor_distances[:k]],
            "neighbor_ids": [self._index(g.names, n) for n in neighbors],
            "worst_pixel": d.get("worst_pixel"),
            "generation": done.loaded.generation,
            "latency_ms": {**d.get("timings_ms", {}), "queue": round(done.queued * 1e3, 2)},
            "size": int(p.input_image.shape[0]),
        }
        done.id = uuid.uuid4().hex
        kept = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
        self.ring.add(
            Entry(
                done.id,
                0,
                time.time(),
                summary,
                kept,
                p.input_image,
                np.asarray(p.anomaly_map, np.float32),
                p.correspondence,
                p.correspondence_names,
                g,
                g.thresholds.get("pixel"),
            )
        )

    @staticmethod
    def _index(names: list[str], name: str) -> int:
        try:
            return names.index(name)
        except ValueError:
            return -1

    def _queued(self, e: Entry) -> bool:
        if e.review is not None:
            return False
        s = e.summary
        if s["verdict"] == "NOT_OK":
            return True
        thr, b = s.get("threshold"), self.config.borderline
        return bool(b and thr and s["verdict"] == "OK" and s["score"] >= b * thr)

    def _view(self, e: Entry) -> dict:
        return {"id": e.id, "seq": e.seq, "time": e.time, **e.summary, "review": e.review, "queued": self._queued(e)}

    # --- HTTP -----------------------------------------------------------------------------------
    def handle_get(self, h, url) -> None:
        from urllib.parse import parse_qs

        from .server import HttpError

        path = url.path
        if path == "/ui":
            return h.send_body(302, b"", "text/plain", {"Location": "/ui/"})
        if path in ASSETS:
            name, ctype = ASSETS[path]
            body = resources.files("spade_edge.service.ui").joinpath(name).read_bytes()
            return h.send_body(200, body, ctype, PAGE_HEADERS)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if path == "/ui/api/state":
            return h.send_json(200, self.state(int(q.get("after") or 0)))
        if path == "/ui/api/health":
            return h.send_json(200, self.health(h.server))
        if path == "/ui/api/thresholds":
            return h.send_json(200, self.thresholds())
        if path == "/ui/api/history":
            return h.send_json(200, self.history())
        parts = path.split("/")  # '', 'ui', 'api', 'results', ID, what[, n]
        if len(parts) in (6, 7) and parts[:4] == ["", "ui", "api", "results"] and _ID.match(parts[4]):
            e = self.ring.get(parts[4])
            if e is None:
                raise HttpError(404, "no such result (only the most recent ones are kept)")
            what = parts[5]
            if len(parts) == 6 and what == "input.png":
                return h.send_body(200, self._cached(e, "input", lambda: _png(e.input_image)), "image/png")
            if len(parts) == 6 and what == "heat.png":
                return h.send_body(200, self._cached(e, "heat", lambda: self._heat(e)), "image/png")
            if len(parts) == 6 and what == "pixel":
                return h.send_json(200, self.pixel(e, q.get("row"), q.get("col")))
            if len(parts) == 7 and what == "gallery" and re.fullmatch(r"\d{1,9}\.png", parts[6]):
                j = int(parts[6][:-4])
                return h.send_body(200, self._cached(e, f"g{j}", lambda: self._thumb(e, j)), "image/png")
        raise HttpError(404, f"no such endpoint: GET {path}")

    def handle_post(self, h, url) -> None:
        from .server import HttpError

        self._check_write(h)
        n = h.content_length()
        if n > MAX_BODY:
            raise HttpError(413, "body too large", close=True)
        raw = h.read_body(n)
        try:
            req = json.loads(raw or b"{}")
        except ValueError as exc:
            raise HttpError(400, f"body is not JSON ({exc})") from None
        if not isinstance(req, dict):
            raise HttpError(400, "body must be a JSON object")
        client = self._client(h)
        path = url.path
        parts = path.split("/")
        if len(parts) == 6 and parts[:4] == ["", "ui", "api", "results"] and parts[5] == "review":
            if not _ID.match(parts[4]):
                raise HttpError(404, "no such result")
            return h.send_json(200, self.review(parts[4], req, client))
        if path == "/ui/api/threshold":
            return h.send_json(200, self.set_threshold(req, client))
        if path == "/ui/api/rollback":
            return h.send_json(200, self.rollback(req, client))
        raise HttpError(404, f"no such endpoint: POST {path}")

    def _check_write(self, h) -> None:
        """Origin, then body type, then token: the cheapest refusal first; none reads the body."""
        import hmac

        from .server import HttpError

        host = h.headers.get("Host") or ""
        origin = h.headers.get("Origin")
        if origin is not None and origin != f"http://{host}":
            raise HttpError(403, "cross-origin request refused", close=True)
        site = h.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise HttpError(403, f"cross-site request refused (Sec-Fetch-Site: {site})", close=True)
        if (h.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
            raise HttpError(415, "send the body as application/json", close=True)
        token = self.config.token
        if token is None:
            raise HttpError(403, "this station is read-only: start the service with --ui-token to allow changes")
        auth = h.headers.get("Authorization") or ""
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise HttpError(401, "changes need the station's token: 'Authorization: Bearer <token>'")

    @staticmethod
    def _client(h) -> dict:
        op = re.sub(r"[^\w .@-]", "", h.headers.get("X-Operator") or "")[:40]
        return {"address": h.client_address[0], "operator": op or None}

    # --- read side ------------------------------------------------------------------------------
    def state(self, after: int = 0) -> dict:
        entries = self.ring.entries()
        cur = self.service.current
        return {
            "seq": self.ring.seq,
            "results": [self._view(e) for e in entries if e.seq > after],
            "queue": [self._view(e) for e in entries if self._queued(e)],
            "gallery_generation": generations.current(cur.gallery) if cur else None,
            "service_generation": cur.generation if cur else None,
            "threshold": cur.detector.gallery.thresholds.get("image") if cur else None,
            "writable": self.config.token is not None,
            "status": self.service.state,
        }

    def pixel(self, e: Entry, row, col) -> dict:
        from .server import HttpError

        s = e.summary["size"]
        try:
            r, c = int(row), int(col)
        except (TypeError, ValueError):
            raise HttpError(400, "row and col must be integers (model-input pixels)") from None
        if not (0 <= r < s and 0 <= c < s):
            raise HttpError(400, f"row and col must be within 0..{s - 1}")
        j, mr, mc = e.corr.at(r, c)
        return {
            "row": r,
            "col": c,
            "matched_image": e.names[j],
            "matched_id": j,
            "matched_row": round(float(mr), 1),
            "matched_col": round(float(mc), 1),
            "distance": round(float(e.amap[r, c]), 6),
            "pixel_threshold": e.pixel_threshold,
        }

    def _cached(self, e: Entry, key: str, make) -> bytes:
        if key not in e.cache:
            e.cache[key] = make()
        return e.cache[key]

    def _heat(self, e: Entry) -> bytes:
        from ..render import overlay

        thr = e.pixel_threshold
        vmax = 2.0 * thr if thr else float(e.amap.max())
        return _png(overlay(e.input_image, e.amap, vmax, thr))

    def _thumb(self, e: Entry, j: int) -> bytes:
        from PIL import Image

        from .server import HttpError

        g = e.gallery
        if not 0 <= j < len(e.names):
            raise HttpError(404, "no such gallery image")
        s = e.summary["size"]
        if g.thumbnails is None:
            return _png(np.full((s, s, 3), 64, np.uint8))
        img = Image.fromarray(np.asarray(g.thumbnails[j])).resize((s, s), Image.Resampling.BILINEAR)
        return _png(np.asarray(img))

    def health(self, server) -> dict:
        from .server import health

        status, body, _ = health(self.service)
        cur = self.service.current
        body = dict(body, http_status=status)
        body["gallery_generation"] = generations.current(cur.gallery) if cur else None
        body["latency_ms"] = server.latency.quantiles()
        body["worker_busy_ms"] = self.service.busy_seconds.quantiles()
        body["results_kept"] = len(self.ring.entries())
        body["results_kept_mib"] = round(self.ring.nbytes / (1 << 20), 2)
        body["writable"] = self.config.token is not None
        return body

    def thresholds(self) -> dict:
        cur = self.service.current
        th = cur.detector.gallery.thresholds if cur else {}
        heldout = [float(x) for x in th.get("heldout_scores", [])]
        good = [r["score"] for r in self._reviewed if r["decision"] == "good"]
        defect = [r["score"] for r in self._reviewed if r["decision"] == "defect"]
        current = th.get("image")
        cands = sorted({*heldout, *good, *defect, *([current] if current is not None else [])})
        return {
            "threshold": current,
            "gallery_generation": generations.current(cur.gallery) if cur else None,
            "heldout_normal": heldout,
            "reviewed_good": good,
            "reviewed_defect": defect,
            "rates": rates(heldout + good, defect, cands),
        }

    def history(self) -> dict:
        cur = self.service.current
        if cur is None:
            return {"generations": [], "restorable": [], "audit": []}
        return {
            "gallery_generation": generations.current(cur.gallery),
            "generations": generations.log(cur.gallery)[-50:],
            "restorable": generations.restorable(cur.gallery),
            "audit": self._audit_tail(50),
        }

    # --- write side -----------------------------------------------------------------------------
    def _expected(self, req: dict) -> int:
        from .server import HttpError

        g = req.get("generation")
        if not isinstance(g, int) or isinstance(g, bool):
            raise HttpError(400, "send the gallery generation you saw: {'generation': N}")
        return g

    def _apply(self, action: str, fn, client: dict, expected: int, detail: dict) -> dict:
        """A recorded gallery change, then the reload that makes the next request use it."""
        from ..runtime.errors import SpadeError
        from .inspector import ReloadBusy
        from .server import HttpError

        cur = self.service.current
        if cur is None:
            raise HttpError(503, "the service is not ready")
        t0 = time.perf_counter()
        try:
            entry = fn(cur, expected)
        except generations.StaleGeneration as exc:
            raise HttpError(409, str(exc), extra={"gallery_generation": exc.current}) from None
        except SpadeError as exc:  # the gallery is as it was (nothing is recorded before the write)
            log.warning("station: %s failed: %s", action, exc)
            text = str(exc).replace(str(cur.gallery), "the gallery")
            raise HttpError(422, f"{action} failed, nothing changed: {text}") from None
        t1 = time.perf_counter()
        for _ in range(600):  # a SIGHUP or /reload under way: wait for it, then reload ours
            try:
                info = self.service.reload()
                break
            except ReloadBusy:
                time.sleep(0.05)
            except Exception as exc:  # noqa: BLE001 - answered; the old generation keeps serving
                log.exception("station: reload after %s failed", action)
                raise HttpError(
                    500,
                    f"the change is saved as gallery generation {entry['generation']}, but the reload failed "
                    f"({type(exc).__name__}); the service still serves the previous one: undo it or reload",
                ) from None
        else:
            raise HttpError(503, "the service kept reloading; the change is saved, reload it to use it")
        t2 = time.perf_counter()
        out = {
            "gallery_generation": entry["generation"],
            "service_generation": info["generation"],
            "gallery_images": info.get("gallery_images"),
            "threshold": (info.get("thresholds") or {}).get("image"),
            "change_ms": round((t1 - t0) * 1e3, 1),
            "reload_ms": round((t2 - t1) * 1e3, 1),
        }
        self._audit({"action": action, **detail, **out, "client": client})
        return out

    def review(self, rid: str, req: dict, client: dict) -> dict:
        from .server import HttpError

        decision, note = req.get("decision"), req.get("note") or ""
        if decision not in ("good", "defect"):
            raise HttpError(400, "decision must be 'good' (a good part: add it to the gallery) or 'defect'")
        if not isinstance(note, str) or len(note) > MAX_NOTE:
            raise HttpError(400, f"note must be text of at most {MAX_NOTE} characters")
        with self._change:
            e = self.ring.get(rid)
            if e is None:
                raise HttpError(404, "no such result (only the most recent ones are kept)")
            if e.review is not None:
                raise HttpError(
                    409, f"already reviewed: {e.review['decision']} at {e.review['time']}", extra={"review": e.review}
                )
            detail: dict = {"result": rid, "image": e.summary["image"], "score": e.summary["score"]}
            out: dict = {}
            if decision == "good":
                expected = self._expected(req)
                img = self._save_image(e)

                def add(cur, expected):
                    from ..runtime.build import add_images

                    det = cur.detector
                    on_worker = _WorkerBackend(self.service, det.backend)
                    return generations.change(
                        cur.gallery,
                        "add",
                        lambda: add_images(cur.gallery, on_worker, [img], show_progress=False, locked=True),
                        client=_who(client),
                        expected=expected,
                        detail={"added": img.name, "result": rid},
                        keep=self.config.keep_generations,
                    )

                out = self._apply("good_part", add, client, expected, {**detail, "added": img.name})
            e.review = {"decision": decision, "note": note, "time": _now(), "client": client}
            rec = {"id": rid, "image": e.summary["image"], "score": e.summary["score"], "verdict": e.summary["verdict"]}
            rec.update(e.review)
            self._append("reviews.jsonl", rec)
            self._reviewed.append(rec)
            if decision == "defect":
                self._audit({"action": "defect_confirmed", **detail, "note": note, "client": client})
            return {"review": e.review, **out}

    def _save_image(self, e: Entry) -> Path:
        """The result's image in DATA_DIR/images, named by its id (the gallery's name for it)."""
        from PIL import Image

        if isinstance(e.data, np.ndarray):  # a camera's frame: kept losslessly
            path, raw = self.data_dir / "images" / f"{e.id}.png", _png(e.data)
        else:
            try:
                fmt = (Image.open(io.BytesIO(e.data)).format or "img").lower()
            except Exception:  # noqa: BLE001 - it decoded for the inspection; the name only needs an extension
                fmt = "img"
            path, raw = self.data_dir / "images" / f"{e.id}.{fmt if fmt.isalnum() else 'img'}", e.data
        tmp = path.with_suffix(".part")
        tmp.write_bytes(raw)
        os.replace(tmp, path)
        return path

    def set_threshold(self, req: dict, client: dict) -> dict:
        from .server import HttpError

        t = req.get("threshold")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise HttpError(400, "threshold must be a positive number")
        expected = self._expected(req)
        with self._change:
            cur = self.service.current
            old = cur.detector.gallery.thresholds.get("image") if cur else None

            def apply(cur, expected):
                return generations.change(
                    cur.gallery,
                    "threshold",
                    lambda: generations.set_threshold(Path(cur.gallery), float(t)),
                    client=_who(client),
                    expected=expected,
                    detail={"from": old, "to": float(t)},
                    keep=self.config.keep_generations,
                )

            return self._apply("threshold", apply, client, expected, {"from": old, "to": float(t)})

    def rollback(self, req: dict, client: dict) -> dict:
        from ..runtime.errors import GalleryError
        from .server import HttpError

        to = req.get("to")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool)):
            raise HttpError(400, "to must be a generation number (or null: the one before the current)")
        expected = self._expected(req)
        with self._change:

            def apply(cur, expected):
                try:
                    return generations.rollback(cur.gallery, to, client=_who(client), expected=expected)
                except generations.StaleGeneration:
                    raise
                except GalleryError as exc:
                    raise HttpError(409, str(exc).replace(str(cur.gallery), "the gallery")) from None

            return self._apply("rollback", apply, client, expected, {"to": to})

    # --- files ----------------------------------------------------------------------------------
    def _append(self, name: str, rec: dict) -> None:
        with open(self.data_dir / name, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _audit(self, rec: dict) -> None:
        self._append("audit.jsonl", {"time": _now(), **rec})
        log.info("station: %s", json.dumps(rec))

    def _audit_tail(self, n: int) -> list[dict]:
        path = self.data_dir / "audit.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines()[-n:]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def _load_reviews(self) -> list[dict]:
        path = self.data_dir / "reviews.jsonl"
        out = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    float(rec["score"])
                    out.append(rec)
                except (ValueError, KeyError, TypeError):
                    continue
        return out


def _who(client: dict) -> str:
    return f"ui {client['address']}" + (f" ({client['operator']})" if client.get("operator") else "")


class _WorkerBackend:
    """The serving feature backend, called on the service's worker thread (``gallery add``'s
    features come from the same model instance, between two inspections)."""

    def __init__(self, service, backend):
        self.service, self.backend, self.info = service, backend, backend.info

    def __call__(self, x):
        return self.service.on_worker(lambda: self.backend(x))
