"""The inspection service over HTTP, standard library only (``http.server``).

Connection threads (``ThreadingHTTPServer``, one per connection, capped by ``max_connections``)
read a request, check it, decode the image and fit it to the model input; the model runs in the
:class:`~.inspector.InspectionService` worker. Bad input never reaches the worker: it gets a 4xx
with a sentence saying what is wrong. A request refused for a full queue is answered before its
body is read.

Endpoints: ``POST /inspect``, ``GET /health``, ``GET /metrics``, ``POST /reload``,
``GET /heatmaps/<id>.png``.
"""
from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import metrics as m
from .inputs import image_from_multipart, probe_image
from .capped import CappedConnections
from .inspector import HttpError, InspectionService, Loaded, ReloadBusy, _Job

log = logging.getLogger("spade_edge.service")


def _truthy(v: str | None) -> bool:
    return (v or "").lower() in ("1", "true", "yes", "on", "url", "inline")


def _round_ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


# --- HTTP ----------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    service: InspectionService  # set by make_server
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
            self._json(code, {"error": text, "status": code}, close=True)
        except OSError:
            self.close_connection = True

    def setup(self):
        self.timeout = self.service.config.read_timeout
        super().setup()

    # -- plumbing --
    def log_message(self, fmt, *args):  # access log through logging, quiet by default
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None, close: bool = False) -> None:
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

    def _linger(self) -> None:
        """Closing with unread request bytes makes the kernel reset the connection, which can destroy
        the answer in flight: end our side, then drain what the client still sends, briefly."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.2)
            while self.connection.recv(65536):
                pass
        except OSError:
            pass

    def _json(self, status: int, obj: dict, headers: dict | None = None, close: bool = False) -> None:
        self._send(status, (json.dumps(obj) + "\n").encode(), "application/json", headers, close)

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
            self._json(e.status, body, headers, close=close)
            if close:
                self._linger()
            elif unread:
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

    def _content_length(self) -> int:
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

    def _read_body(self, n: int) -> bytes:
        chunks, left = [], n
        try:
            while left > 0:
                c = self.rfile.read(min(left, 1 << 20))
                if not c:
                    break
                chunks.append(c)
                left -= len(c)
        except (TimeoutError, socket.timeout, OSError) as exc:
            raise HttpError(400, f"request body not received in time ({n - left} of {n} bytes)", close=True) from exc
        if left:
            raise HttpError(400, f"request body ended after {n - left} of {n} bytes (Content-Length)", close=True)
        return b"".join(chunks)

    def handle_expect_100(self):
        """Refuse before the client sends its body (curl sends 'Expect: 100-continue' for large files)."""
        if urlsplit(self.path).path == "/inspect" and self.command == "POST":
            try:
                if self._content_length() > self.service.config.max_bytes:
                    raise HttpError(413, self._too_large_message(), "too_large", close=True)
                if not self.service.ready:
                    self.service.admit()  # raises the 503 with the reason
                depth, cap = self.service.queue_depth, self.service.config.queue_size
                if depth >= cap:
                    raise HttpError(503, f"queue full ({depth} of {cap} requests in service); retry shortly",
                                    "queue_full", retry_after=self.service.config.retry_after,
                                    queue_depth=depth, queue_capacity=cap)
            except HttpError as e:
                e.close = True  # the client has not sent its body: this connection ends here
                self.service.count(e.outcome)
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
                return self._send(200, self.service.registry.render().encode(), m.CONTENT_TYPE)
            if url.path.startswith("/heatmaps/") and url.path.endswith(".png"):
                png = self.service.heatmap(url.path[len("/heatmaps/"):-len(".png")])
                if png is None:
                    raise HttpError(404, "no such heat map (only the most recent ones are kept)")
                return self._send(200, png, "image/png")
            if url.path in ("/inspect", "/reload"):
                raise HttpError(405, f"{url.path} takes POST", close=True)
            if url.path == "/":
                return self._json(200, {"service": "spade-edge", "endpoints": {
                    "POST /inspect": "image bytes or multipart field 'image'; ?heatmap=1|inline, ?name=, ?deadline_ms=",
                    "GET /health": "200 when ready", "GET /metrics": "Prometheus text",
                    "POST /reload": 'JSON {"model": path, "gallery": path}, both optional'}})
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
            raise HttpError(404, f"no such endpoint: POST {url.path}", close=True)
        except HttpError as e:
            self._error(e)
        except Exception as exc:  # noqa: BLE001 - answered, logged; the server goes on
            log.exception("unexpected error in POST %s", url.path)
            self._error(HttpError(500, f"internal error: {type(exc).__name__}: {exc}", "error", close=True))

    def _frame(self, url):
        """POST /frames: an image for the next line trigger (an 'upload' image source)."""
        from ..runtime.errors import SpadeError

        n = self._content_length()
        if n > self.service.config.max_bytes:
            raise HttpError(413, self._too_large_message(), "too_large", close=True)
        data = self._read_body(n)
        name = {k: v[-1] for k, v in parse_qs(url.query).items()}.get("name") or self.headers.get("X-Image-Name")
        probe_image(data, self.service.config, name or "<frame>")
        try:
            waiting = self.service.frames.put(data, name)
        except SpadeError as exc:
            raise HttpError(503, str(exc), "queue_full", retry_after=self.service.config.retry_after) from None
        self._json(202, {"waiting": waiting})

    def _method_not_allowed(self):
        self._error(HttpError(405, f"{self.command} is not supported here", close=True))

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _health(self):
        svc = self.service
        cur = svc.current
        body = {"status": svc.state, "queue_depth": svc.queue_depth, "queue_capacity": svc.config.queue_size,
                "uptime_s": round(time.time() - svc.started_at, 1)}
        if cur is not None:
            body.update(cur.describe())
        if svc.error:
            body["error"] = svc.error
        if svc.ready and svc.stalled:
            body["status"] = "stalled"
            body["error"] = f"one image has held the worker for more than {svc.config.stall_seconds:.0f} s"
        elif svc.ready:
            return self._json(200, body)
        return self._json(503, body, {"Retry-After": svc.config.retry_after})

    def _reload(self):
        svc = self.service
        n = 0 if self.headers.get("Content-Length") is None and not self.headers.get("Transfer-Encoding") \
            else self._content_length()  # a bare 'curl -X POST .../reload' sends no body and no length
        if not svc.config.allow_reload:
            raise HttpError(403, "reload is disabled on this service (--no-reload)", close=True)
        if n > 1 << 16:
            raise HttpError(413, "reload body too large: send JSON {\"model\": ..., \"gallery\": ...}", close=True)
        raw = self._read_body(n)
        try:
            req = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise HttpError(400, f"reload body is not JSON ({exc})") from exc
        if not isinstance(req, dict) or set(req) - {"model", "gallery"}:
            raise HttpError(400, 'reload body must be JSON {"model": path, "gallery": path} (both optional)')
        from ..runtime.errors import SpadeError

        try:
            result = svc.reload(req.get("model"), req.get("gallery"))
        except ReloadBusy as exc:
            raise HttpError(409, str(exc), retry_after=svc.config.retry_after) from exc
        except Exception as exc:  # noqa: BLE001 - whatever the files did, the old generation keeps serving
            if not isinstance(exc, (SpadeError, OSError, ValueError)):
                log.exception("reload failed")
            raise HttpError(422, f"reload failed, still serving generation "
                                 f"{svc.current.generation if svc.current else '-'}: {type(exc).__name__}: {exc}",
                            "unprocessable") from exc
        self._json(200, result)

    def _inspect(self, url):
        svc, cfg = self.service, self.service.config
        t0 = time.perf_counter()
        ticket, body_read, n = None, False, None
        try:
            q = {k: v[-1] for k, v in parse_qs(url.query).items()}
            n = self._content_length()
            if n > cfg.max_bytes:
                raise HttpError(413, self._too_large_message(), "too_large")  # closed: too much to read
            ticket = svc.admit()
            deadline_s = cfg.deadline
            wanted = q.get("deadline_ms") or self.headers.get("X-Deadline-Ms")
            if wanted:
                try:
                    deadline_s = min(max(float(wanted) / 1e3, 0.001), cfg.max_deadline)
                except ValueError:
                    raise HttpError(400, f"bad deadline_ms {wanted!r}") from None
            deadline = t0 + deadline_s
            body = self._read_body(n)
            body_read = True
            t_recv = time.perf_counter()
            ctype = self.headers.get("Content-Type") or ""
            name = q.get("name") or self.headers.get("X-Image-Name")
            if ctype.lower().startswith("multipart/"):
                data, filename = image_from_multipart(body, ctype)
                name = name or filename
            else:
                data = body
            del body
            mode = (q.get("heatmap") or "").lower()
            held, ticket = ticket, None  # run() returns it, whatever happens
            done = svc.run(held, data, name or "<request>", deadline, heatmap=_truthy(mode))
            del data
            pred, png, job = done.prediction, done.heatmap_png, done.job
            rid = uuid.uuid4().hex
            out = self._result(pred, done.loaded, rid, t0, t_recv, done.decoded, job)
            if png is not None:
                if mode == "inline":
                    out["heatmap"] = "data:image/png;base64," + base64.b64encode(png).decode()
                else:
                    svc.keep_heatmap(rid, png)
                    out["heatmap_url"] = f"/heatmaps/{rid}.png"
            outcome = {"OK": "ok", "NOT_OK": "not_ok"}.get(pred.verdict, "no_verdict")
            total = time.perf_counter() - t0
            out["latency_ms"]["total"] = _round_ms(total)
            svc.count(outcome)  # counted before the answer leaves, so a client reading /metrics next sees it
            svc._m_latency.observe(total)
            self._json(200, out)
        except HttpError as e:
            svc.count(e.outcome)
            if not body_read and n is None:
                e.close = True  # unknown body length: the connection cannot be reused
            self._error(e, unread=None if body_read else n)
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the thread down silently
            log.exception("unexpected error in /inspect")
            svc.count("error")
            self._error(HttpError(500, f"internal error: {type(exc).__name__}: {exc}", "error", close=True))
        finally:
            if ticket is not None:
                ticket.release()

    def _result(self, pred, loaded: Loaded, rid: str, t0, t_recv, t_dec, job: _Job) -> dict:
        g = loaded.detector.gallery
        d = pred.to_dict()
        k = self.service.config.neighbors
        timings = {"receive": _round_ms(t_recv - t0), "decode": _round_ms(t_dec - t_recv),
                   "queue": _round_ms(job.started - job.enqueued)}
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


class InspectionServer(CappedConnections, ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open connections (503 past it)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, service: InspectionService):
        self.service = service
        super().__init__(addr, handler)

    def connection_cap(self) -> int:
        return self.service.config.max_connections

    def refusal(self) -> bytes:
        self.service._m_connections_refused.inc()
        body = b'{"error": "too many open connections; retry shortly", "status": 503}\n'
        return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: %d\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (self.service.config.retry_after, len(body), body))

    @property
    def port(self) -> int:
        return self.server_address[1]


def make_server(service: InspectionService, host: str = "127.0.0.1", port: int = 8080) -> InspectionServer:
    """An HTTP server for ``service`` (not yet serving: call ``serve_forever``)."""
    handler = type("Handler", (_Handler,), {"service": service})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    cls = type("Server", (InspectionServer,), {"address_family": family})
    return cls((host, port), handler, service)


class RunningService:
    """A service serving in a background thread (tests, embedding): ``with RunningService(...) as s``."""

    def __init__(self, service: InspectionService, host: str = "127.0.0.1", port: int = 0):
        self.service = service
        self.httpd = make_server(service, host, port)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="spade-edge-http", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
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
