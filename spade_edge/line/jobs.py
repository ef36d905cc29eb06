"""The line's side of an inspection: numbered jobs, started by a trigger, fed by an image source,
run by the inspection service, kept until asked for, and announced to publishers (MQTT).

Every adapter (text protocol, Modbus, OPC UA) is a thin translation of this one API, so a job,
its number and its outcome mean the same thing whichever protocol started it. The service's
outcomes (:mod:`spade_edge.service.outcomes`) become line codes here (:data:`LINE_CODES`), and the
line's job metrics are added to the service's registry here."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import IntEnum

from ..service import metrics as m
from ..service.outcomes import (
    BadImage,
    Busy,
    DeadlinePassed,
    InferenceFailed,
    NotReady,
    Outcome,
    lookup,
)

log = logging.getLogger("spade_edge.line")


class Code(IntEnum):
    """Numeric status codes, the same on every adapter (docs/line.md)."""

    OK = 0
    PENDING = 1  # the job has not finished yet
    BUSY = 10  # queue full, or (Modbus) a trigger before the last result was acknowledged
    REJECTED = 11  # trigger refused: the service is not ready, or halted
    UNKNOWN_COMMAND = 20
    BAD_ARGUMENT = 21
    UNKNOWN_JOB = 22
    NO_IMAGE = 30  # the image source gave nothing in time
    BAD_IMAGE = 31  # not an image, wrong size, truncated
    DEADLINE = 32
    ABORTED = 33
    ERROR = 50  # inference failed, or anything unexpected
    RELOAD_FAILED = 51


VERDICTS = ("OK", "NOT_OK", "NOT_DECIDABLE")  # OPC 40001-101 names: OK, NotOK, NotDecidable


class LineError(Exception):
    """A refusal with its :class:`Code` and a sentence for the operator."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code, self.message = Code(code), message


@dataclass
class JobResult:
    """One finished job. ``verdict`` is OK / NOT_OK, or NOT_DECIDABLE when ``code`` is not OK."""

    job: int
    verdict: str
    score: float | None
    threshold: float | None
    code: int
    message: str
    image: str | None
    latency_ms: float
    finished_at: float

    def to_dict(self) -> dict:
        return asdict(self)


class _Pending:
    __slots__ = ("job", "started", "done", "result", "aborted")

    def __init__(self, job: int):
        self.job, self.started, self.done = job, time.perf_counter(), threading.Event()
        self.result: JobResult | None = None
        self.aborted = False


# the inspection service's outcomes -> line codes (anything else: ERROR)
LINE_CODES: dict[type, Code] = {
    Busy: Code.BUSY,
    NotReady: Code.REJECTED,
    BadImage: Code.BAD_IMAGE,  # and its kinds: too large, unsupported format, wrong size
    DeadlinePassed: Code.DEADLINE,
    InferenceFailed: Code.ERROR,
}

# line codes -> outcome label of spade_edge_line_jobs_total (OK: the verdict; anything else: error)
_METRIC = {Code.NO_IMAGE: "no_image", Code.BAD_IMAGE: "bad_image", Code.DEADLINE: "deadline", Code.ABORTED: "aborted"}


def _line_error(o: Outcome) -> LineError:
    return LineError(lookup(LINE_CODES, o, Code.ERROR), o.message)


class Line:
    """Jobs over an :class:`~spade_edge.service.inspector.InspectionService`.

    ``source``: where a trigger takes its image (:mod:`.sources`); ``deadline``: seconds from
    trigger to result, image grab included; ``keep``: finished results kept for ``result()``
    (oldest dropped); ``publishers``: callables given every :class:`JobResult` (MQTT).
    """

    def __init__(
        self,
        service,
        source=None,
        *,
        deadline: float = 10.0,
        keep: int = 1000,
        publishers: list[Callable[[JobResult], None]] | None = None,
    ):
        self.service, self.source, self.deadline, self.keep = service, source, float(deadline), int(keep)
        self.publishers = list(publishers or [])
        self._ids = itertools.count(1)
        self._jobs: OrderedDict[int, _Pending] = OrderedDict()
        self._lock = threading.Lock()
        self.halted = False
        self.done_count = 0
        r = service.registry
        self._m_jobs = r.add(
            m.Counter(
                "spade_edge_line_jobs_total",
                "Line jobs (text protocol, Modbus, OPC UA) by outcome.",
                ("outcome",),
                preset=[
                    {"outcome": o} for o in ("ok", "not_ok", "no_image", "bad_image", "deadline", "aborted", "error")
                ],
            ),
            shared=True,
        )
        self._m_latency = r.add(
            m.Histogram(
                "spade_edge_line_job_latency_seconds", "Trigger to result of successful line jobs, image grab included."
            ),
            shared=True,
        )

    # --- jobs ------------------------------------------------------------------------------------
    def trigger(self, image=None, name: str | None = None) -> int:
        """Start a job and return its number at once. The image is ``image`` (bytes or an RGB
        array) or, if None, the next one from the source. Raises :class:`LineError` (BUSY, REJECTED)."""
        if self.halted:
            raise LineError(Code.REJECTED, "halted: reset before triggering")
        if image is None and self.source is None:
            raise LineError(Code.REJECTED, "no image source configured")
        try:
            ticket = self.service.admit()
        except Outcome as o:
            raise _line_error(o) from None
        with self._lock:
            p = _Pending(next(self._ids))
            self._jobs[p.job] = p
        threading.Thread(target=self._run, args=(p, ticket, image, name), name=f"line-job-{p.job}", daemon=True).start()
        return p.job

    def _run(self, p: _Pending, ticket, image, name) -> None:
        deadline = p.started + self.deadline
        try:
            if image is None:
                try:
                    image, name = self.source.grab(max(0.0, deadline - time.perf_counter()))
                except Exception as exc:  # noqa: BLE001 - a camera failure is the job's outcome
                    ticket.release()
                    raise LineError(Code.NO_IMAGE, f"image source: {exc}") from exc
            done = self.service.run(ticket, image, name or f"job-{p.job}", deadline)
            pred, g = done.prediction, done.loaded.detector.gallery
            verdict = pred.verdict if pred.verdict in ("OK", "NOT_OK") else "NOT_DECIDABLE"
            result = self._result(p, verdict, float(pred.score), g.thresholds.get("image"), Code.OK, "", name)
        except (LineError, Outcome) as e:
            e = e if isinstance(e, LineError) else _line_error(e)
            result = self._result(p, "NOT_DECIDABLE", None, None, e.code, e.message, name)
        except Exception as exc:  # noqa: BLE001 - reported as the job's outcome, the line goes on
            log.exception("job %d failed", p.job)
            result = self._result(p, "NOT_DECIDABLE", None, None, Code.ERROR, f"{type(exc).__name__}: {exc}", name)
        if p.aborted:
            result = self._result(p, "NOT_DECIDABLE", None, None, Code.ABORTED, "aborted", name)
        self._finish(p, result)

    def _result(self, p, verdict, score, threshold, code, message, name) -> JobResult:
        return JobResult(
            p.job,
            verdict,
            score,
            threshold,
            int(code),
            message,
            name,
            round((time.perf_counter() - p.started) * 1e3, 2),
            time.time(),
        )

    def _finish(self, p: _Pending, result: JobResult) -> None:
        with self._lock:
            if p.done.is_set():
                return
            p.result = result
            self.done_count += 1
            p.done.set()
            self._m_jobs.inc(outcome=_METRIC.get(Code(result.code), "error") if result.code else result.verdict.lower())
            if result.code == Code.OK:
                self._m_latency.observe(result.latency_ms / 1e3)
            while len(self._jobs) > self.keep and next(iter(self._jobs.values())).done.is_set():
                self._jobs.popitem(last=False)  # oldest finished results go first
        for publish in self.publishers:
            try:
                publish(result)
            except Exception:  # noqa: BLE001 - a dashboard outage must not stop the line
                log.exception("publishing job %d failed", p.job)

    def result(self, job: int) -> JobResult | None:
        """The result of ``job``, or None while it runs. Raises :class:`LineError` (UNKNOWN_JOB)."""
        with self._lock:
            p = self._jobs.get(job)
        if p is None:
            raise LineError(Code.UNKNOWN_JOB, f"no job {job} (never started, or dropped after {self.keep} newer ones)")
        return p.result if p.done.is_set() else None

    def wait(self, job: int, timeout: float | None = None) -> JobResult | None:
        """Block until ``job`` has a result (None if ``timeout`` passes first)."""
        with self._lock:
            p = self._jobs.get(job)
        if p is None:
            raise LineError(Code.UNKNOWN_JOB, f"no job {job}")
        return p.result if p.done.wait(self.deadline + 5.0 if timeout is None else timeout) else None

    def inspect(self, image=None, name: str | None = None) -> JobResult:
        """Trigger and wait: the ``SW8`` pattern."""
        job = self.trigger(image, name)
        result = self.wait(job)
        if result is None:  # the worker outlived the deadline by far: answer anyway, once
            p = self._jobs[job]
            self._finish(p, self._result(p, "NOT_DECIDABLE", None, None, Code.DEADLINE, "no result in time", name))
            result = p.result
            assert result is not None  # _finish sets the result before done, once
        return result

    def abort(self, job: int) -> bool:
        """End ``job`` with ABORTED at once, if it still runs (its worker's late answer is
        discarded); True if it did. One job: the adapter that started it ends it, and jobs of
        other adapters (another PLC's trigger) run on. Raises :class:`LineError` (UNKNOWN_JOB)."""
        with self._lock:
            p = self._jobs.get(job)
        if p is None:
            raise LineError(Code.UNKNOWN_JOB, f"no job {job}")
        if p.done.is_set():
            return False
        p.aborted = True
        self._finish(p, self._result(p, "NOT_DECIDABLE", None, None, Code.ABORTED, "aborted", None))
        return True

    @property
    def running(self) -> int:
        with self._lock:
            return sum(not p.done.is_set() for p in self._jobs.values())

    # --- service ---------------------------------------------------------------------------------
    def status(self) -> dict:
        cur = self.service.current
        return {
            "state": "halted" if self.halted else self.service.state,
            "running": self.running,
            "queue_depth": self.service.queue_depth,
            "queue_capacity": self.service.config.queue_size,
            "jobs_done": self.done_count,
            "generation": cur.generation if cur else 0,
            "source": getattr(self.source, "describe", lambda: None)(),
        }

    def reload(self) -> dict:
        """Re-read model and gallery (the current ones keep serving meanwhile)."""
        try:
            return self.service.reload()
        except Exception as exc:  # noqa: BLE001
            raise LineError(Code.RELOAD_FAILED, f"{type(exc).__name__}: {exc}") from exc
