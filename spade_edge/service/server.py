"""The inspection service over HTTP, standard library only (``http.server``).

Connection threads (``ThreadingHTTPServer``, one per connection, capped by ``max_connections``)
read a request, check it, decode the image and fit it to the model input; the model runs in the
:class:`~.inspector.InspectionService` worker. Bad input never reaches the worker: it gets a 4xx
with a sentence saying what is wrong. A request refused for a full queue is answered before its
body is read. The service raises domain outcomes (:mod:`.outcomes`); :data:`HTTP_STATUS` is where
they become status codes, and the HTTP metrics (requests by outcome, latency, refused
connections) are this module's own, added to the service's registry.

Bounds against slow or hostile clients (docs/service.md lists them with their numbers): a whole
request (line, headers, body) must arrive within ``read_timeout`` of its first byte; a queue slot
is taken only once the body is in; bodies being received are bounded in bytes as they arrive
(:class:`ByteBudget`); past ``max_connections``, ``GET /health`` and ``GET /metrics`` are still
answered (:mod:`.capped`). ``POST /reload`` is refused unless allowed for the client
(``reload``: off, local, remote), names files under ``reload_dirs`` only, may need a token, and
its errors do not say what exists on the file system.

Endpoints: ``POST /inspect``, ``GET /health``, ``GET /metrics``, ``POST /reload``,
``GET /heatmaps/<id>.png``; with ``serve --ui`` the operator's page under ``/ui/`` (:mod:`.station`).
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast
from urllib.parse import parse_qs, urlsplit

from . import metrics as m
from .capped import CappedConnections
from .inputs import image_from_multipart, probe_image
from .inspector import Done, InspectionService, ReloadBusy
from .outcomes import (
    BadImage,
    Busy,
    DeadlinePassed,
    InferenceFailed,
    NotReady,
    Outcome,
    TooLarge,
    Unsupported,
    WrongSize,
    lookup,
)

log = logging.getLogger("spade_edge.service")


class HttpError(Exception):
    """An answer other than 200: status, the sentence the client sees, the metrics label of
    ``POST /inspect``, ``Retry-After`` seconds, whether to close, and extra body fields."""

    def __init__(
        self,
        status: int,
        message: str,
        outcome: str = "bad_request",
        retry_after: int | None = None,
        close: bool = False,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.outcome = int(status), message, outcome
        self.retry_after, self.close, self.extra = retry_after, close, extra or {}


# the service's outcomes -> (status, outcome label of spade_edge_inspect_requests_total)
HTTP_STATUS: dict[type, tuple[int, str]] = {
    Busy: (503, "queue_full"),
    NotReady: (503, "not_ready"),
    TooLarge: (413, "too_large"),
    Unsupported: (415, "unsupported_media_type"),
    WrongSize: (422, "unprocessable"),
    BadImage: (400, "bad_request"),
    DeadlinePassed: (504, "deadline"),
    InferenceFailed: (500, "error"),
}
# labels of spade_edge_inspect_requests_total: the verdicts of 200 answers, then every error
OUTCOMES = (
    "ok",
    "not_ok",
    "no_verdict",
    "bad_request",
    "unsupported_media_type",
    "too_large",
    "unprocessable",
    "queue_full",
    "not_ready",
    "deadline",
    "error",
)


def http_error(o: Outcome) -> HttpError:
    """The answer to a domain outcome: its status, ``Retry-After`` when it has one, and the queue
    of a :class:`Busy` in the body."""
    status, label = lookup(HTTP_STATUS, o, (500, "error"))
    extra = {"queue_depth": o.queue_depth, "queue_capacity": o.capacity} if isinstance(o, Busy) else {}
    return HttpError(status, o.message, label, getattr(o, "retry_after", None), extra=extra)


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true", "yes", "on", "url", "inline")


def _round_ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


class ByteBudget:
    """Bytes held at once by request bodies, counted as they arrive (a slow client holds only what
    it has sent); :meth:`take` fails instead of going past ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity, self.used, self._lock = int(capacity), 0, threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.capacity:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class _RequestReader(io.RawIOBase):
    """The socket, read under a deadline for a whole request: the clock starts at the request's
    first byte and every ``recv`` waits at most what is left, so a client that trickles a byte
    every few seconds cannot hold a connection (the socket's own timeout is per ``recv``). Before
    the first byte (an idle keep-alive connection) it waits ``idle`` seconds."""

    def __init__(self, sock: socket.socket, limit: float):
        self.sock, self.limit = sock, limit
        self.deadline: float | None = None  # None: between requests

    def readable(self) -> bool:
        return True

    def next_request(self) -> None:
        self.deadline = None

    def readinto(self, b) -> int:
        wait = self.limit if self.deadline is None else self.deadline - time.monotonic()
        if wait <= 0:
            raise TimeoutError(f"request not received within {self.limit:.1f} s")
        self.sock.settimeout(wait)
        try:
            n = self.sock.recv_into(b)
        finally:
            self.sock.settimeout(self.limit)  # what writes to the client get
        if n and self.deadline is None:
            self.deadline = time.monotonic() + self.limit
        return n


def _is_local(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def health(svc: InspectionService) -> tuple[int, dict, dict | None]:
    """``GET /health``: (status, body, extra headers)."""
    cur = svc.current
    body = {
        "status": svc.state,
        "queue_depth": svc.queue_depth,
        "queue_capacity": svc.config.queue_size,
        "uptime_s": round(time.time() - svc.started_at, 1),
    }
    if cur is not None:
        body.update(cur.describe())
    if svc.error:
        body["error"] = svc.error
    if svc.ready and svc.stalled:
        body["status"] = "stalled"
        body["error"] = f"one image has held the worker for more than {svc.config.stall_seconds:.0f} s"
    elif svc.ready:
        return 200, body, None
    return 503, body, {"Retry-After": svc.config.retry_after}


def _http_response(status: int, body: bytes, ctype: str, headers: dict | None = None, head: bool = False) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection (for over-the-cap clients)."""
    from http import HTTPStatus

    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


# --- HTTP ----------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    service: InspectionService  # set by make_server
    server: InspectionServer
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's, made by send_response (not in its stubs)
    protocol_version = "HTTP/1.1"  # keep-alive: a line controller reuses its connection
    server_version = "spade-edge"
    sys_version = ""

    default_request_version = "HTTP/1.0"  # a garbled request line still gets a status line

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too long...) as JSON like ours."""
        short, long = self.responses.get(code, ("error", ""))
        text = message or short
        if explain or long:
            text = f"{text}: {explain or long}"
        try:
            self.send_json(code, {"error": text, "status": code}, close=True)
        except OSError:
            self.close_connection = True

    def setup(self):
        self.timeout = self.service.config.read_timeout
        super().setup()
        self._reader = _RequestReader(self.connection, self.service.config.read_timeout)
        self.rfile = io.BufferedReader(self._reader, 1 << 16)
        self._held = 0  # bytes of ByteBudget this request holds

    def handle_one_request(self):
        self._reader.next_request()
        try:
            super().handle_one_request()
        finally:
            if self._held:
                self.server.receiving.give(self._held)
                self._held = 0

    # -- plumbing --
    def log_message(self, fmt, *args):  # access log through logging, quiet by default
        log.debug("%s %s", self.address_string(), fmt % args)

    def send_body(self, status: int, body: bytes, ctype: str, headers: dict | None = None, close: bool = False) -> None:
        """Answer with ``body`` (also for the operator's page, station.py); ``close``: end the connection."""
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        # headers and body in one write, so a client sees the whole answer together
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()
        if close:
            self._linger()

    def send_json(self, status: int, obj: dict, headers: dict | None = None, close: bool = False) -> None:
        """Answer with ``obj`` as JSON."""
        self.send_body(status, (json.dumps(obj) + "\n").encode(), "application/json", headers, close)

    def _error(self, e: HttpError, unread: int | None = None) -> None:
        """Answer ``e``. ``unread``: bytes of body still on the wire; they are read and dropped
        after the answer (so the client gets it at once and the connection stays usable) when
        they are within --max-bytes, else the connection is closed."""
        headers = {"Retry-After": e.retry_after} if e.retry_after is not None else None
        body = {"error": e.message, "status": e.status, **e.extra}
        if e.status >= 500 and e.outcome not in ("queue_full", "not_ready"):
            log.warning("%s %s: %d %s", self.command, self.path, e.status, e.message)
        else:
            log.info("%s %s: %d %s", self.command, self.path, e.status, e.message)
        close = e.close or (unread is not None and unread > self.service.config.max_bytes)
        try:
            self.send_json(e.status, body, headers, close=close)  # lingers before closing
            if not close and unread:
                self._discard(unread)
        except OSError:  # the client left
            self.close_connection = True

    def _discard(self, n: int) -> None:
        left = n
        try:
            while left > 0:
                c = self.rfile.read(min(left, 1 << 16))
                if not c:
                    break
                left -= len(c)
        except OSError:
            pass
        if left:
            self.close_connection = True

    def _linger(self, limit: int = 1 << 20, seconds: float = 0.5) -> None:
        """Before closing, read (and drop) what the client is still sending for a moment: closing
        a socket with unread bytes resets the connection, and the client may lose our answer."""
        try:
            self.wfile.flush()
            self.connection.settimeout(seconds)
            end, got = time.monotonic() + seconds, 0
            while got < limit and time.monotonic() < end:
                c = self.connection.recv(1 << 16)
                if not c:
                    break
                got += len(c)
        except OSError:
            pass

    def content_length(self) -> int:
        """The request's declared body size; chunked bodies and bad values are HTTP errors."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise HttpError(411, "chunked bodies are not accepted; send Content-Length", close=True)
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpError(411, "Content-Length is required", close=True)
        try:
            n = int(raw)
        except ValueError:
            raise HttpError(400, f"bad Content-Length {raw!r}", close=True) from None
        if n < 0:
            raise HttpError(400, f"bad Content-Length {raw!r}", close=True)
        return n

    def read_body(self, n: int) -> bytes:
        """The body, within the request's deadline, its bytes counted in the server's
        :class:`ByteBudget` as they arrive (given back when this request ends)."""
        chunks, left = [], n
        budget, limit = self.server.receiving, self.service.config.read_timeout
        try:
            while left > 0:
                c = self.rfile.read1(min(left, 1 << 16))
                if not c:
                    break
                if not budget.take(len(c)):
                    raise HttpError(
                        503,
                        "too many request bodies being received at once; retry shortly",
                        "queue_full",
                        retry_after=self.service.config.retry_after,
                        close=True,
                    )
                self._held += len(c)
                chunks.append(c)
                left -= len(c)
        except TimeoutError as exc:
            raise HttpError(
                408,
                f"request not received within {limit:.1f} s (read timeout): {n - left} of {n} body bytes came",
                close=True,
            ) from exc
        except OSError as exc:
            raise HttpError(400, f"request body not received ({n - left} of {n} bytes): {exc}", close=True) from exc
        if left:
            raise HttpError(400, f"request body ended after {n - left} of {n} bytes (Content-Length)", close=True)
        return b"".join(chunks)

    def handle_expect_100(self):
        """Refuse before the client sends its body (curl sends 'Expect: 100-continue' for large files)."""
        if urlsplit(self.path).path == "/inspect" and self.command == "POST":
            try:
                if self.content_length() > self.service.config.max_bytes:
                    raise HttpError(413, self._too_large_message(), "too_large", close=True)
                refusal = self.service.refusal()
                if refusal is not None:
                    raise http_error(refusal)
            except HttpError as e:
                e.close = True  # the client has not sent its body: this connection ends here
                self.server.requests.inc(outcome=e.outcome)
                self._error(e)
                return False
        return super().handle_expect_100()

    def _too_large_message(self) -> str:
        mb = self.service.config.max_bytes / (1 << 20)
        return f"request body larger than {mb:.1f} MiB (--max-bytes)"

    # -- routes --
    def do_GET(self):
        url = urlsplit(self.path)
        try:
            if url.path == "/health":
                return self._health()
            if url.path == "/metrics":
                return self.send_body(200, self.service.registry.render().encode(), m.CONTENT_TYPE)
            if url.path.startswith("/heatmaps/") and url.path.endswith(".png"):
                png = self.service.heatmap(url.path[len("/heatmaps/") : -len(".png")])
                if png is None:
                    raise HttpError(404, "no such heat map (only the most recent ones are kept)")
                return self.send_body(200, png, "image/png")
            if url.path in ("/inspect", "/reload"):
                raise HttpError(405, f"{url.path} takes POST", close=True)
            if self.server.station is not None and (url.path == "/ui" or url.path.startswith("/ui/")):
                return self.server.station.handle_get(self, url)  # the operator's page (serve --ui)
            if url.path == "/":
                return self.send_json(
                    200,
                    {
                        "service": "spade-edge",
                        "endpoints": {
                            "POST /inspect": "image bytes or multipart field 'image'; ?heatmap=1|inline, ?name=, ?deadline_ms=",
                            "GET /health": "200 when ready",
                            "GET /metrics": "Prometheus text",
                            "POST /reload": 'JSON {"model": path, "gallery": path}, both optional',
                        },
                    },
                )
            raise HttpError(404, f"no such endpoint: GET {url.path}")
        except HttpError as e:
            self._error(e)
        except Exception as exc:  # noqa: BLE001 - answered, logged; the server goes on
            log.exception("unexpected error in GET %s", url.path)
            self._error(HttpError(500, f"internal error: {type(exc).__name__}: {exc}", "error", close=True))

    do_HEAD = do_GET

    def do_POST(self):
        url = urlsplit(self.path)
        if url.path == "/inspect":
            return self._inspect(url)
        try:
            if url.path == "/reload":
                return self._reload()
            if url.path == "/frames" and self.service.frames is not None:
                return self._frame(url)
            if self.server.station is not None and url.path.startswith("/ui/"):
                return self.server.station.handle_post(self, url)
            raise HttpError(404, f"no such endpoint: POST {url.path}", close=True)
        except HttpError as e:
            self._error(e)
        except Exception as exc:  # noqa: BLE001 - answered, logged; the server goes on
            log.exception("unexpected error in POST %s", url.path)
            self._error(HttpError(500, f"internal error: {type(exc).__name__}: {exc}", "error", close=True))

    def _frame(self, url):
        """POST /frames: an image for the next line trigger (an 'upload' image source)."""
        from ..runtime.errors import SpadeError

        n = self.content_length()
        if n > self.service.config.max_bytes:
            raise HttpError(413, self._too_large_message(), "too_large", close=True)
        data = self.read_body(n)
        name = {k: v[-1] for k, v in parse_qs(url.query).items()}.get("name") or self.headers.get("X-Image-Name")
        try:
            probe_image(data, self.service.config, name or "<frame>")
        except Outcome as o:
            raise http_error(o) from None
        try:
            waiting = self.service.frames.put(data, name)
        except SpadeError as exc:
            raise HttpError(503, str(exc), "queue_full", retry_after=self.service.config.retry_after) from None
        self.send_json(202, {"waiting": waiting})

    def _method_not_allowed(self):
        self._error(HttpError(405, f"{self.command} is not supported here", close=True))

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def do_OPTIONS(self):
        """A browser's preflight (CORS, local network access) from another origin: never granted."""
        self._error(HttpError(403, "cross-origin requests are not allowed here (no CORS)", close=True))

    def _health(self):
        status, body, headers = health(self.service)
        return self.send_json(status, body, headers)

    def _reload(self):
        svc, cfg = self.service, self.service.config
        n = (
            0
            if self.headers.get("Content-Length") is None and not self.headers.get("Transfer-Encoding")
            else self.content_length()
        )  # a bare 'curl -X POST .../reload' sends no body and no length
        if cfg.reload == "off":
            raise HttpError(403, "reload is disabled on this service (--reload off)", close=True)
        if cfg.reload == "local" and not _is_local(self.client_address[0]):
            raise HttpError(
                403, "reload is allowed from this machine only (--reload remote allows other clients)", close=True
            )
        if cfg.reload_token is not None and not self._token_ok(cfg.reload_token):
            raise HttpError(401, "reload needs the service's token: 'Authorization: Bearer <token>'", close=True)
        if n > 1 << 16:
            raise HttpError(413, 'reload body too large: send JSON {"model": ..., "gallery": ...}', close=True)
        raw = self.read_body(n)
        try:
            req = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise HttpError(400, f"reload body is not JSON ({exc})") from exc
        if not isinstance(req, dict) or set(req) - {"model", "gallery"}:
            raise HttpError(400, 'reload body must be JSON {"model": path, "gallery": path} (both optional)')
        paths = {k: self._reload_path(k, v) for k, v in req.items() if v is not None}
        from ..runtime.errors import SpadeError

        try:
            result = svc.reload(paths.get("model"), paths.get("gallery"))
        except ReloadBusy as exc:
            raise HttpError(409, str(exc), retry_after=cfg.retry_after) from exc
        except Exception as exc:  # noqa: BLE001 - whatever the files did, the old generation keeps serving
            log.warning("reload failed: %s: %s", type(exc).__name__, exc)
            if not isinstance(exc, (SpadeError, OSError, ValueError)):
                log.exception("reload failed")
            raise HttpError(
                422,
                f"reload failed, still serving generation "
                f"{svc.current.generation if svc.current else '-'}: {_public_error(exc, req)}",
                "unprocessable",
            ) from exc
        self.send_json(200, result)

    def _token_ok(self, token: str) -> bool:
        given = self.headers.get("X-Reload-Token")
        auth = self.headers.get("Authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), token.encode())

    def _reload_path(self, key: str, value) -> str:
        """The real path of a file ``/reload`` names, if it lies under a reload directory; else one
        403 that says the same whether the file exists or not."""
        dirs = self.service.config.reload_dirs
        if not isinstance(value, str) or not value:
            raise HttpError(400, f"{key} must be a path (a string)")
        if not dirs:
            raise HttpError(
                403,
                f"{key}: this service only re-reads its current files (a body without paths); "
                "start it with --reload-dir DIR to load other files from DIR",
            )
        real = os.path.realpath(value)
        for d in dirs:
            root = os.path.realpath(d)
            if real.startswith(root.rstrip(os.sep) + os.sep) and os.path.isfile(real):
                return real
        raise HttpError(
            403, f"{key}: not a file this service may load; name a file under one of its {len(dirs)} reload directories"
        )

    def _inspect(self, url):
        svc, cfg = self.service, self.service.config
        t0 = time.perf_counter()
        ticket, body_read, n = None, False, None
        try:
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            n = self.content_length()
            if n > cfg.max_bytes:
                raise HttpError(413, self._too_large_message(), "too_large")  # closed: too much to read
            refusal = svc.refusal()  # Busy, NotReady: answered before the body is read
            if refusal is not None:
                raise refusal
            deadline_s = cfg.deadline
            wanted = q.get("deadline_ms") or self.headers.get("X-Deadline-Ms")
            if wanted:
                try:
                    deadline_s = min(max(float(wanted) / 1e3, 0.001), cfg.max_deadline)
                except ValueError:
                    raise HttpError(400, f"bad deadline_ms {wanted!r}") from None
            deadline = t0 + deadline_s
            body = self.read_body(n)  # within read_timeout, before any slot is taken
            body_read = True
            ticket = svc.admit()  # a slot only for a body that is in
            t_recv = time.perf_counter()
            ctype = self.headers.get("Content-Type") or ""
            name = q.get("name") or self.headers.get("X-Image-Name")
            if ctype.lower().startswith("multipart/"):
                data, filename = image_from_multipart(body, ctype, cfg.max_parts)
                name = name or filename
            else:
                data = body
            del body
            mode = (q.get("heatmap") or "").lower()
            held, ticket = ticket, None  # run() returns it, whatever happens
            done = svc.run(held, data, name or "<request>", deadline, heatmap=_truthy(mode))
            del data
            pred, png = done.prediction, done.heatmap_png
            rid = done.id or uuid.uuid4().hex  # the operator's page's id for it, when it keeps it
            out = self._result(done, rid, t0, t_recv)
            if png is not None:
                if mode == "inline":
                    out["heatmap"] = "data:image/png;base64," + base64.b64encode(png).decode()
                else:
                    svc.keep_heatmap(rid, png)
                    out["heatmap_url"] = f"/heatmaps/{rid}.png"
            outcome = {"OK": "ok", "NOT_OK": "not_ok"}.get(pred.verdict, "no_verdict")
            total = time.perf_counter() - t0
            out["latency_ms"]["total"] = _round_ms(total)
            self.server.requests.inc(outcome=outcome)  # before the answer leaves: /metrics next sees it
            self.server.latency.observe(total)
            self.send_json(200, out)
        except (HttpError, Outcome) as e:
            if isinstance(e, Outcome):
                e = http_error(e)
            self.server.requests.inc(outcome=e.outcome)
            if not body_read and n is None:
                e.close = True  # unknown body length: the connection cannot be reused
            self._error(e, unread=None if body_read else n)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the thread down silently
            log.exception("unexpected error in /inspect")
            self.server.requests.inc(outcome="error")
            self._error(HttpError(500, f"internal error: {type(exc).__name__}: {exc}", "error", close=True))
        finally:
            if ticket is not None:
                ticket.release()

    def _result(self, done: Done, rid: str, t0: float, t_recv: float) -> dict:
        pred, loaded = done.prediction, done.loaded
        g = loaded.detector.gallery
        d = pred.to_dict()
        k = self.service.config.neighbors
        timings = {
            "receive": _round_ms(t_recv - t0),
            "decode": _round_ms(done.decoded - t_recv),
            "queue": _round_ms(done.queued),
        }
        timings.update(d.get("timings_ms", {}))
        return {
            "id": rid,
            "image": pred.name,
            "verdict": pred.verdict,
            "score": float(pred.score),  # unrounded: a line compares it with the threshold
            "threshold": g.thresholds.get("image"),
            "image_score": float(pred.image_score),
            "max_pixel_score": float(pred.max_pixel_score),
            "pixel_threshold": g.thresholds.get("pixel"),
            "neighbors": list(pred.neighbors[:k]),
            "neighbor_distances": [round(float(x), 6) for x in pred.neighbor_distances[:k]],
            "worst_pixel": d.get("worst_pixel"),
            "latency_ms": timings,
            "generation": loaded.generation,
        }


def _public_error(exc: Exception, req: dict) -> str:
    """What a reload failure may tell the client: the service's own sentences (SpadeError) with
    file paths cut to the names the client gave; for other errors only their kind (the log has
    the rest), so that an error never says what else exists on the file system."""
    from ..runtime.errors import SpadeError

    if not isinstance(exc, SpadeError):
        return f"{type(exc).__name__} (details in the service log)"
    text = str(exc)
    for given in (v for v in req.values() if isinstance(v, str) and v):
        real = os.path.realpath(given)
        text = text.replace(real, os.path.basename(given)).replace(given, os.path.basename(given))
    return text


class InspectionServer(CappedConnections, ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open connections (past it ``GET /health`` and
    ``GET /metrics`` are answered, anything else 503), a byte budget for bodies being received,
    and the HTTP metrics."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    station = None  # the operator's page (station.Station), with serve --ui

    def __init__(self, addr, handler, service: InspectionService):
        self.service = service
        self.overflow_peek = min(2.0, service.config.read_timeout)  # to read an over-the-cap request
        self.receiving = ByteBudget(service.config.max_receiving_bytes)
        r = service.registry
        self.requests = r.add(
            m.Counter(
                "spade_edge_inspect_requests_total",
                "POST /inspect answers by outcome.",
                ("outcome",),
                preset=[{"outcome": o} for o in OUTCOMES],
            ),
            shared=True,
        )
        self.latency = r.add(
            m.Histogram("spade_edge_inspect_latency_seconds", "Arrival to answer of successful inspections (seconds)."),
            shared=True,
        )
        self.refused = r.add(
            m.Counter(
                "spade_edge_connections_refused_total", "Connections answered 503 because max_connections were open."
            ),
            shared=True,
        )
        super().__init__(addr, handler)

    def connection_cap(self) -> int:
        return self.service.config.max_connections

    def refusal(self, head: bytes | None = None) -> bytes:
        """The answer to a client over the connection cap: ``GET /health`` and ``GET /metrics``
        (so that a health check or a scraper still sees the truth), else 503."""
        words = (head or b"").split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        if len(words) == 3 and words[0] in (b"GET", b"HEAD") and words[2].startswith(b"HTTP/"):
            path = urlsplit(words[1].decode("latin-1")).path
            is_head = words[0] == b"HEAD"
            if path == "/health":
                status, info, headers = health(self.service)
                return _http_response(status, (json.dumps(info) + "\n").encode(), "application/json", headers, is_head)
            if path == "/metrics":
                return _http_response(200, self.service.registry.render().encode(), m.CONTENT_TYPE, None, is_head)
        self.refused.inc()
        body = b'{"error": "too many open connections; retry shortly", "status": 503}\n'
        return _http_response(503, body, "application/json", {"Retry-After": self.service.config.retry_after})

    @property
    def port(self) -> int:
        return self.server_address[1]


def make_server(
    service: InspectionService, host: str = "127.0.0.1", port: int = 8080, station=None
) -> InspectionServer:
    """An HTTP server for ``service`` (not yet serving: call ``serve_forever``); ``station``: the
    operator's page under /ui/ (station.Station), or None."""
    handler = type("Handler", (_Handler,), {"service": service})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("Server", (InspectionServer,), {"address_family": family})
    httpd = cls((host, port), handler, service)
    httpd.station = station
    if station is not None:
        service.on_result = station.record  # every inspection, HTTP or line, for the page
    return httpd


class RunningService:
    """A service serving in a background thread (tests, embedding): ``with RunningService(...) as s``."""

    def __init__(self, service: InspectionService, host: str = "127.0.0.1", port: int = 0):
        self.service = service
        self.httpd = make_server(service, host, port)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="spade-edge-http", daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = cast(tuple, self.httpd.server_address)[:2]  # AF_INET or AF_INET6: (host, port, ...)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def stop(self, drain_timeout: float = 10.0) -> None:
        self.service.close(drain_timeout)
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
