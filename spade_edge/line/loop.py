"""An asyncio event loop in its own daemon thread, for the adapters built on asyncio libraries
(pymodbus, asyncua) inside a program that is otherwise threads."""
from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable


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

    def call(self, coro: Awaitable, timeout: float = 10.0):
        """Run ``coro`` on the loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Awaitable) -> None:
        """Schedule ``coro`` on the loop from another thread, without waiting."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, shutdown: Callable[[], Awaitable] | None = None) -> None:
        if self.loop is None:
            return
        if shutdown is not None and self._thread.is_alive():
            self.call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop = None
