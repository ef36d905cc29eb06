"""One thread setting for everything that computes: BLAS (numpy's matrix products in the scorer),
OpenMP, and ONNX Runtime (passed to its session), so they do not oversubscribe the cores."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from functools import lru_cache

_limiter = None
_threads: int | None = None


def set_threads(n: int | None) -> None:
    """Limit BLAS and OpenMP pools of this process to ``n`` threads (None: leave them)."""
    global _limiter, _threads
    if not n:
        return
    _threads = int(n)
    from threadpoolctl import threadpool_limits

    _limiter = threadpool_limits(limits=int(n))  # kept: the limit holds until the process ends


def compute_threads() -> int:
    """Threads for our own parallel loops (the AMX scorer): the :func:`set_threads` setting, else
    the cores this process may run on."""
    if _threads:
        return _threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@lru_cache(maxsize=1)
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_single = {"depth": 0, "limiter": None}
_single_lock = threading.Lock()


@contextmanager
def blas_single_threaded():
    """Inside, BLAS calls run on their calling thread alone (restored when the last one leaves):
    for code that splits work over threads of its own, so that no idle BLAS pool spins on their cores."""
    with _single_lock:
        if _single["depth"] == 0:
            _single["limiter"] = _controller().limit(limits=1, user_api="blas")
        _single["depth"] += 1
    try:
        yield
    finally:
        with _single_lock:
            _single["depth"] -= 1
            if _single["depth"] == 0:
                _single["limiter"].restore_original_limits()


def thread_info() -> list[dict]:
    """What each native thread pool is and how many threads it uses."""
    from threadpoolctl import threadpool_info

    return [
        {k: d.get(k) for k in ("user_api", "internal_api", "num_threads", "architecture", "prefix")}
        for d in threadpool_info()
    ]
