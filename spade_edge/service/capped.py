"""A cap on the open connections of a threading socket server, for the HTTP service and the line's
text protocol alike: past the cap a newcomer is told why, in its own protocol, and closed, so a
misbehaving client cannot exhaust the device with threads."""
from __future__ import annotations

import threading


class CappedConnections:
    """Mix in before ``socketserver.ThreadingMixIn``; subclasses give ``connection_cap()`` and
    ``refusal()`` (the bytes a refused client receives)."""

    def __init__(self, *args, **kwargs):
        self._open, self._open_lock = 0, threading.Lock()
        super().__init__(*args, **kwargs)

    def connection_cap(self) -> int:
        raise NotImplementedError

    def refusal(self) -> bytes:
        raise NotImplementedError

    def process_request(self, request, client_address):
        with self._open_lock:
            full = self._open >= self.connection_cap()
            if not full:
                self._open += 1
        if full:
            try:
                request.sendall(self.refusal())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1
