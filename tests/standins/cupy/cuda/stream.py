"""``cupy.cuda.Stream`` stand-in: a stream of the fake machine, made on the current device.

Faithful: ``.ptr`` is the handle TensorRT and ``memcpyAsync`` take (0 for ``Stream.null``); work
queued on it runs at ``synchronize()``; ``with stream:`` makes it the thread's current stream;
``get_current_stream()`` is per thread (the null stream by default). ``non_blocking=True``: the
stream does not wait for the null stream (nor the null stream for it), as
cudaStreamNonBlocking.
"""

from __future__ import annotations

import threading
import weakref

from .._machine import machine
from .runtime import current_context, errors


class Stream:
    null: Stream  # set below

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False, priority=None):
        if null:
            self._stream, self.ptr, self.device_id = None, 0, None
            return
        ctx = current_context()
        self._stream = machine.create_stream(ctx, blocking=not non_blocking)
        self.ptr, self.device_id = self._stream.handle, ctx.device
        weakref.finalize(self, machine.destroy_stream, self._stream)

    def synchronize(self) -> None:
        with errors():
            if self._stream is None:
                machine.wait_null_stream(machine.runtime_context())
            else:
                self._stream.synchronize()

    @property
    def done(self) -> bool:
        return self._stream is None or self._stream.pending == 0

    def use(self) -> Stream:
        _current.stream = self
        return self

    def __enter__(self):
        stack = getattr(_current, "previous", None)
        if stack is None:
            stack = _current.previous = []
        stack.append(get_current_stream())
        return self.use()

    def __exit__(self, *exc) -> None:
        _current.stream = _current.previous.pop()

    def __eq__(self, other) -> bool:
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(("Stream", self.ptr))

    def __repr__(self) -> str:
        return f"<Stream 0x{self.ptr:x} (device {self.device_id})>"


Stream.null = Stream(null=True)
_current = threading.local()


def get_current_stream(device_id=None) -> Stream:
    return getattr(_current, "stream", None) or Stream.null


def after_current_stream(ctx) -> None:
    """Work done now by a CuPy operation on the current stream must follow what is queued on it
    (on the null stream: what is queued on the blocking streams)."""
    stream = get_current_stream()
    with errors():
        if stream._stream is None:
            machine.wait_null_stream(ctx)
        else:
            stream._stream.synchronize()
