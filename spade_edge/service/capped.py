"""A cap on the open connections of a threading socket server, for the HTTP service and the line's
text protocol alike: past the cap a newcomer is told why, in its own protocol, and closed, so a
misbehaving client cannot exhaust the device with threads.

A server may also look at what an over-the-cap client asks before answering (``overflow_peek``
seconds, HTTP: so that ``/health`` and ``/metrics`` are answered even when every connection is
held by a slow client). Those clients are served by one thread with a selector, never a thread
each, at most :data:`OVERFLOW_PENDING` at once; past that they are refused at once."""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time

log = logging.getLogger("spade_edge.service")

OVERFLOW_PENDING = 256  # over-the-cap connections being read at once; more are refused at once
OVERFLOW_HEAD = 8192  # bytes of an over-the-cap request read before answering
_DRAIN_SECONDS = 0.5  # after answering, what the client still sends is read and dropped this long


class CappedConnections:
    """Mix in before ``socketserver.ThreadingMixIn``; subclasses give ``connection_cap()`` and
    ``refusal(head)`` (the bytes an over-the-cap client receives; ``head``: what it sent within
    ``overflow_peek`` seconds, None when it was not read)."""

    overflow_peek: float = 0.0  # seconds to read an over-the-cap client's request; 0: refuse at once

    def __init__(self, *args, **kwargs):
        self._open, self._open_lock = 0, threading.Lock()
        self._overflow: _Overflow | None = None
        super().__init__(*args, **kwargs)

    def connection_cap(self) -> int:
        raise NotImplementedError

    def refusal(self, head: bytes | None) -> bytes:
        raise NotImplementedError

    @property
    def open_connections(self) -> int:
        return self._open

    def process_request(self, request, client_address):
        with self._open_lock:
            full = self._open >= self.connection_cap()
            if not full:
                self._open += 1
        if full:
            if self.overflow_peek > 0:
                with self._open_lock:
                    if self._overflow is None:
                        self._overflow = _Overflow(self, self.overflow_peek)
                        self._overflow.start()
                if self._overflow.add(request):
                    return
            try:
                request.sendall(self.refusal(None))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        # ThreadingMixIn's, with the slot given back before the socket is closed: a client that
        # reconnects as soon as it sees the close (a PLC) must find the slot free
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1
            self.shutdown_request(request)

    def server_close(self):
        super().server_close()
        if self._overflow is not None:
            self._overflow.stop()


class _Overflow(threading.Thread):
    """Reads the request head of over-the-cap connections (one selector, no thread each), answers
    with the server's ``refusal(head)``, drains briefly, and closes."""

    def __init__(self, server: CappedConnections, peek: float):
        super().__init__(name="capped-overflow", daemon=True)
        self.server, self.peek = server, peek
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._inbox: list[socket.socket] = []
        self._state: dict[socket.socket, list] = {}  # sock -> [deadline, head bytes, answered]
        self._stopped = False

    def add(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._stopped or len(self._state) + len(self._inbox) >= OVERFLOW_PENDING:
                return False
            self._inbox.append(sock)
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        return True

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self.join(timeout=5)

    def run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        break
                now = time.monotonic()
                wait = min((st[0] for st in self._state.values()), default=now + 1.0) - now
                for key, _ in self.sel.select(max(0.0, min(wait, 1.0))):
                    if key.fileobj is self._wake_r:
                        self._take_inbox()
                    else:
                        self._readable(key.fileobj)
                now = time.monotonic()
                for sock, st in list(self._state.items()):
                    if st[0] <= now:
                        self._answer(sock) if not st[2] else self._close(sock)
        finally:
            for sock in list(self._state) + self._inbox:
                self._close(sock)
            self.sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_inbox(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        with self._lock:
            new, self._inbox = self._inbox, []
        for sock in new:
            try:
                sock.setblocking(False)
                self.sel.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                self._close(sock)
                continue
            self._state[sock] = [time.monotonic() + self.peek, b"", False]

    def _readable(self, sock) -> None:
        st = self._state.get(sock)
        if st is None:
            return
        try:
            data = sock.recv(OVERFLOW_HEAD)
        except BlockingIOError:
            return
        except OSError:
            self._close(sock)
            return
        if st[2]:  # answered: draining until the client closes
            if not data:
                self._close(sock)
            return
        st[1] += data
        if not data or b"\r\n\r\n" in st[1] or b"\n\n" in st[1] or len(st[1]) >= OVERFLOW_HEAD:
            self._answer(sock)

    def _answer(self, sock) -> None:
        st = self._state[sock]
        try:
            answer = self.server.refusal(st[1])
        except Exception:  # noqa: BLE001 - whatever the server did, this client gets closed
            log.exception("answering an over-the-cap connection")
            self._close(sock)
            return
        try:
            sock.setblocking(True)
            sock.settimeout(1.0)
            sock.sendall(answer)
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            self._close(sock)
            return
        st[0], st[2] = time.monotonic() + _DRAIN_SECONDS, True

    def _close(self, sock) -> None:
        self._state.pop(sock, None)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            sock.close()
        except OSError:
            pass
