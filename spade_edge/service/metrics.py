"""Prometheus metrics in the text exposition format (version 0.0.4), standard library only.

Three kinds, enough for a service: counters (with labels), gauges (set, or read through a
callable at scrape time) and histograms with fixed buckets. All are thread-safe and of fixed
size: labels come from a small closed set, so memory does not grow with traffic.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# request latency buckets in seconds: 5 ms .. 30 s (an image on a Jetson takes tens to hundreds of ms)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labels: Iterable[str] = ()):
        self.name, self.doc, self.label_names = name, doc, tuple(labels)
        self._lock = threading.Lock()

    def render(self) -> list[str]:
        raise NotImplementedError

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)


class Counter(_Metric):
    """A monotonically increasing count per label set. ``preset`` lists label sets shown as 0
    before they first happen (so that a dashboard sees every outcome from the start)."""

    kind = "counter"

    def __init__(self, name, doc, labels=(), preset: Iterable[dict] = ()):
        super().__init__(name, doc, labels)
        self._values: dict[tuple[str, ...], float] = {}
        for p in preset:
            self._values[self._key(p)] = 0.0

    def inc(self, amount: float = 1.0, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def value(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down; ``fn`` (if given) is called at scrape time instead."""

    kind = "gauge"

    def __init__(self, name, doc, fn: Callable[[], float] | None = None):
        super().__init__(name, doc)
        self._value, self._fn = 0.0, fn

    def set(self, v: float) -> None:
        with self._lock:
            self._value = float(v)

    def get(self) -> float:
        if self._fn is not None:
            return float(self._fn())
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.get())}"]


class Histogram(_Metric):
    """Cumulative buckets, sum and count (no labels: one distribution per metric)."""

    kind = "histogram"

    def __init__(self, name, doc, buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, doc)
        self.bounds = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0

    def observe(self, v: float) -> None:
        with self._lock:
            self._sum += v
            for i, b in enumerate(self.bounds):
                if v <= b:
                    self._counts[i] += 1
                    break

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def quantiles(self, qs: Iterable[float] = (0.5, 0.9, 0.99)) -> dict[str, float | None]:
        """Quantiles in ms, ``{"p50": ...}``, estimated from the buckets (linear within a bucket) as
        Prometheus's ``histogram_quantile`` does; None before any observation."""
        with self._lock:
            counts = list(self._counts)
        cum = [sum(counts[: i + 1]) for i in range(len(counts))]
        total = cum[-1]
        out: dict[str, float | None] = {}
        for q in qs:
            key = f"p{round(q * 100):d}"
            if not total:
                out[key] = None
                continue
            rank = q * total
            i = next(i for i, c in enumerate(cum) if c >= rank)
            lo = self.bounds[i - 1] if i else 0.0
            hi = self.bounds[i] if math.isfinite(self.bounds[i]) else lo
            below = cum[i - 1] if i else 0
            inside = cum[i] - below
            out[key] = round((lo + (hi - lo) * ((rank - below) / inside if inside else 1.0)) * 1e3, 2)
        return out

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, cum = self.header(), 0
        for b, c in zip(self.bounds, counts):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {cum}')
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {cum}"]
        return lines


M = TypeVar("M", bound=_Metric)


class Registry:
    """An ordered set of metrics rendered together. The service creates it; every adapter adds
    its own metrics to it."""

    def __init__(self):
        self._metrics: list[_Metric] = []
        self._lock = threading.Lock()

    def add(self, metric: M, shared: bool = False) -> M:
        """Register ``metric`` and return it. A name registered twice is an error, unless
        ``shared``: then the metric already there (of the same kind and labels) is returned, so
        that two adapters of one kind on one service count together."""
        with self._lock:
            old = next((m for m in self._metrics if m.name == metric.name), None)
            if old is None:
                self._metrics.append(metric)
                return metric
        if shared and isinstance(old, type(metric)) and old.label_names == metric.label_names:
            return old
        raise ValueError(f"metric {metric.name} registered twice")

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            metrics = list(self._metrics)
        for m in metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


def resident_memory_bytes() -> float:
    """This process's resident set size (VmRSS in /proc/self/status; 0 where there is no /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 0.0
