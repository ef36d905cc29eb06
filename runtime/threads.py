"""One thread setting for everything that computes: BLAS (numpy's matrix products in the scorer),
OpenMP, and ONNX Runtime (passed to its session), so they do not oversubscribe the cores."""
from __future__ import annotations

import os

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


def thread_info() -> list[dict]:
    """What each native thread pool is and how many threads it uses."""
    from threadpoolctl import threadpool_info

    return [{k: d.get(k) for k in ("user_api", "internal_api", "num_threads", "architecture", "prefix")}
            for d in threadpool_info()]
