"""A plain TCP text protocol for PLCs and scripts, in the manner of the vision sensors lines
already know (Cognex In-Sight's ``SW8``, Keyence's ``T1`` / ``ER,...``): one command per line
(CR, LF or CR LF), one answer line per command, in order. docs/line.md has the grammar and a
transcript.

    TRIGGER | T | SW8      trigger and answer when the result is ready (result line)
    TRIGGER ASYNC | TA     answer at once: 0,<job>; fetch later with GET <job>
    GET <job>              result line, or 1,<job>,PENDING
    STATUS | PING | RELOAD | QUIT
Errors: ``ER,<command>,<code>,<message>`` with the codes of :class:`~.jobs.Code`.

Exactly one answer line per command line, whatever the bytes: a line that is empty or only
spaces and tabs gets none, every other line one (an over-long one a single ``ER``, however it
was split); no field of an answer can hold a line end. A connection idle for ``idle_timeout``
seconds is closed (so forgotten connections cannot lock the PLCs out); a client that half-closes
(EOF) gets the answers to what it sent, its last line included, and then the server closes.
``RELOAD`` is refused unless ``reload`` allows the client (off, local: this machine, remote).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import socketserver
import threading

from ..service.capped import CappedConnections
from .jobs import Code, JobResult, Line, LineError

log = logging.getLogger("spade_edge.line")

DEFAULT_FORMAT = "{code},{job},{verdict},{score:.6f}"
FIELDS = ("code", "job", "verdict", "judgement", "score", "threshold", "latency_ms", "image", "message")
_JUDGEMENT = {"OK": "OK", "NOT_OK": "NG", "NOT_DECIDABLE": "ND"}
TRIGGERS = ("TRIGGER", "T", "SW8", "T1")
COMMANDS = (*TRIGGERS, "TA", "GET", "PING", "STATUS", "RELOAD", "QUIT")
RELOAD_MODES = ("off", "local", "remote")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029,]")  # line ends, control characters, the field separator


def _field(text: str) -> str:
    """A free-text field of an answer line (image name, message): no line end, no control
    character and no comma can reach the PLC (an image named 'a.png\\r\\nOK,...' forged a line)."""
    return _UNSAFE.sub(lambda mt: ";" if mt.group() == "," else "?", text)


def format_result(fmt: str, r: JobResult) -> str:
    """One result line. Fields: code, job, verdict (OK / NOT_OK / NOT_DECIDABLE), judgement
    (OK / NG / ND), score, threshold (NaN when unknown), latency_ms, image, message."""
    nan = float("nan")
    return fmt.format(
        code=r.code,
        job=r.job,
        verdict=r.verdict,
        judgement=_JUDGEMENT[r.verdict],
        score=nan if r.score is None else r.score,
        threshold=nan if r.threshold is None else r.threshold,
        latency_ms=r.latency_ms,
        image=_field(r.image or ""),
        message=_field(r.message),
    )


def check_format(fmt: str) -> None:
    """Raise ValueError if ``fmt`` cannot format a result (unknown field, bad spec)."""
    probe = JobResult(1, "OK", 0.5, 1.0, 0, "", "x.png", 1.0, 0.0)
    try:
        format_result(fmt, probe)
        format_result(fmt, JobResult(1, "NOT_DECIDABLE", None, None, 30, "m", None, 1.0, 0.0))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"result format {fmt!r} does not work: {exc!r}; fields: {', '.join(FIELDS)}") from None
    if "\r" in fmt or "\n" in fmt:
        raise ValueError("result format must be one line")


class _Handler(socketserver.BaseRequestHandler):
    server: TextServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        srv = self.server
        sock.settimeout(srv.idle_timeout or None)  # also bounds a send to a client that never reads
        local = _is_local(self.client_address[0])
        buf, skipping = bytearray(), False
        while True:
            try:
                chunk = sock.recv(4096)
            except OSError:  # idle too long, or reset
                return
            if not chunk:  # EOF: the last line, if it has no line end, is still a command
                if buf and not skipping and not self._answer(sock, bytes(buf), local):
                    return
                return
            buf += chunk
            while True:
                cut = min((i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0), default=-1)
                if cut < 0:
                    break
                raw = bytes(buf[:cut])
                del buf[: cut + 1]
                if skipping:  # the tail of an over-long line: answered already
                    skipping = False
                    continue
                if not self._answer(sock, raw, local):
                    return
            if skipping:
                buf.clear()
            elif len(buf) > srv.max_line:  # an over-long line: one error now, the rest skipped
                buf.clear()
                skipping = True
                if not self._send(sock, srv.too_long()):
                    return

    def _answer(self, sock, raw: bytes, local: bool) -> bool:
        """Answer one line; False when the connection must end (QUIT, or the client left)."""
        srv = self.server
        if len(raw) > srv.max_line:
            return self._send(sock, srv.too_long())
        if not raw.strip(b" \t"):
            return True  # an empty line, or the LF of CR LF: no answer
        answer = srv.answer(raw, local)
        return answer is not None and self._send(sock, answer)

    def _send(self, sock, line: str) -> bool:
        try:
            sock.sendall(line.encode("utf-8", "replace") + self.server.eol.encode())
            return True
        except OSError:
            return False


def _is_local(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


class TextServer(CappedConnections, socketserver.ThreadingTCPServer):
    """The text protocol on ``(host, port)`` over a :class:`~.jobs.Line`; a thread per connection,
    at most ``max_connections`` (the next one is answered ``ER,?,10,...`` and closed), each closed
    after ``idle_timeout`` seconds without a byte from the client (0: never). ``reload``: who may
    send RELOAD (off, local: clients on this machine, remote: any)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        line: Line,
        host: str = "127.0.0.1",
        port: int = 2000,
        result_format: str = DEFAULT_FORMAT,
        eol: str = "\r\n",
        max_line: int = 256,
        max_connections: int = 32,
        idle_timeout: float = 60.0,
        reload: str = "local",
    ):
        check_format(result_format)
        if reload not in RELOAD_MODES:
            raise ValueError(f"reload must be one of {', '.join(RELOAD_MODES)}, got {reload!r}")
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0 (0: never), got {idle_timeout}")
        self.line, self.result_format, self.eol, self.max_line = line, result_format, eol, int(max_line)
        self.max_connections, self.idle_timeout, self.reload = int(max_connections), float(idle_timeout), reload
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    def connection_cap(self) -> int:
        return self.max_connections

    def refusal(self, head: bytes | None = None) -> bytes:
        return f"ER,?,{int(Code.BUSY)},{self.max_connections} connections open{self.eol}".encode()

    def too_long(self) -> str:
        return f"ER,?,{int(Code.BAD_ARGUMENT)},line longer than {self.max_line} bytes"

    @property
    def port(self) -> int:
        return self.server_address[1]

    def answer(self, raw: bytes, local: bool = True) -> str | None:
        """The answer line to one command line (None: close the connection); ``local``: the client
        is on this machine."""
        try:
            words = raw.decode("ascii").split()
        except UnicodeDecodeError:
            return f"ER,?,{int(Code.UNKNOWN_COMMAND)},not ASCII"
        if not words:  # only separators str.split knows (\x1c-\x1f, \x0b, \x0c)
            return f"ER,?,{int(Code.UNKNOWN_COMMAND)},empty command"
        cmd, args = words[0].upper(), [w.upper() for w in words[1:]]
        try:
            if cmd in TRIGGERS and args == ["ASYNC"] or cmd == "TA" and not args:
                return f"{int(Code.OK)},{self.line.trigger()}"
            if cmd in TRIGGERS and not args:
                return format_result(self.result_format, self.line.inspect())
            if cmd == "GET" and len(args) == 1:
                try:
                    job = int(args[0])
                except ValueError:
                    raise LineError(Code.BAD_ARGUMENT, f"job must be a number, got {words[1]!r}") from None
                r = self.line.result(job)
                return f"{int(Code.PENDING)},{job},PENDING" if r is None else format_result(self.result_format, r)
            if cmd == "PING" and not args:
                return f"{int(Code.OK)},PONG"
            if cmd == "STATUS" and not args:
                s = self.line.status()
                return (
                    f"{int(Code.OK)},{s['state'].upper()},{s['running']},{s['queue_depth']}/{s['queue_capacity']},"
                    f"{s['jobs_done']},{s['generation']}"
                )
            if cmd == "RELOAD" and not args:
                if self.reload == "off" or (self.reload == "local" and not local):
                    raise LineError(
                        Code.RELOAD_FAILED,
                        "reload is not allowed from this client ([reload] allow); the current model keeps serving",
                    )
                return f"{int(Code.OK)},RELOADED,{self.line.reload()['generation']}"
            if cmd == "QUIT" and not args:
                return None
            if cmd in COMMANDS:
                raise LineError(Code.BAD_ARGUMENT, f"wrong arguments for {cmd}")
            raise LineError(
                Code.UNKNOWN_COMMAND, "unknown command; use TRIGGER, TA, GET <job>, STATUS, PING, RELOAD, QUIT"
            )
        except LineError as e:
            return f"ER,{_safe(cmd)},{int(e.code)},{_field(e.message)}"
        except Exception as exc:  # noqa: BLE001 - one bad command must not end the connection
            log.exception("text protocol: %r failed", raw)
            return f"ER,{_safe(cmd)},{int(Code.ERROR)},{type(exc).__name__}"

    def start(self) -> TextServer:
        self._thread = threading.Thread(target=self.serve_forever, name="line-text", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _safe(cmd: str) -> str:
    return "".join(c for c in cmd if c.isalnum())[:16] or "?"
