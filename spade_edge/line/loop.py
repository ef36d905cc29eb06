"""An asyncio event loop in its own daemon thread, for the adapters built on asyncio libraries
(pymodbus, asyncua) inside a program that is otherwise threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


class LoopThread:
    """``start(boot)`` runs ``boot()`` on a new loop in a thread and returns once it has (raising
    what it raised); the loop then runs until ``stop(shutdown)``."""

    def __init__(self, name: str):
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, boot: Callable[[], Awaitable], timeout: float = 60.0) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        error: list[BaseException] = []

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(boot())
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                error.append(exc)
                return
            finally:
                started.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"{self.name} did not start within {timeout:.0f} s")
        if error:
            raise error[0]

    def _running(self) -> asyncio.AbstractEventLoop:
        if self.loop is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.loop

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        """Run ``coro`` on the loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._running()).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Schedule ``coro`` on the loop from another thread, without waiting."""
        asyncio.run_coroutine_threadsafe(coro, self._running())

    def stop(self, shutdown: Callable[[], Coroutine[Any, Any, Any]] | None = None) -> None:
        if self.loop is None:
            return
        assert self._thread is not None  # start() sets the loop and then the thread
        if shutdown is not None and self._thread.is_alive():
            self.call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop = None
