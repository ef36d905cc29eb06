"""The model side of the inspection service: the current detector, bounded admission, one
worker thread, atomic reload and its own metrics. No protocol here: what goes wrong is raised as a
domain outcome (:mod:`.outcomes`), which each adapter maps to its own codes (HTTP: :mod:`.server`).

- Admission: at most ``queue_size`` requests are in the service at once (decoding, waiting or
  running); past that :meth:`InspectionService.admit` refuses at once (:class:`Busy`), so memory
  stays flat under overload.
- One worker thread runs the model and the scorer, one image at a time: the accelerator and the
  CPU's BLAS are not shared between requests.
- A reload loads and warms the new model and gallery in the caller's thread while the worker
  goes on with the current ones, then swaps them in one assignment. A request is served entirely
  by the generation that was current when it was admitted: nothing is dropped or mixed.
- Every request has a deadline; one still waiting when it passes is dropped unrun.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import metrics as m
from .config import ServiceConfig
from .inputs import probe_image
from .outcomes import BadImage, Busy, DeadlinePassed, InferenceFailed, NotReady

if TYPE_CHECKING:
    from ..runtime.detector import Detector, Prediction

__all__ = ["Done", "InspectionService", "Loaded", "ReloadBusy", "ServiceConfig", "sd_notify"]

log = logging.getLogger("spade_edge.service")


class ReloadBusy(Exception):
    pass


@dataclass
class Loaded:
    """What the service runs: a detector and where it came from."""

    detector: Detector
    model: str
    gallery: str
    generation: int
    loaded_at: float
    model_stamp: tuple | None = None  # the model file's (size, mtime) at load: unchanged, a reload keeps the backend
    # requests using this generation, and whether a newer one replaced it: the last user of a
    # replaced generation closes its detector (GPU memory is not left to the garbage collector)
    _users: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def use(self) -> Loaded:
        with self._lock:
            self._users += 1
        return self

    def done(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._retired and self._users == 0
        if last:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            last = self._users == 0
        if last:
            self._close()

    def _close(self) -> None:
        close = getattr(self.detector, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - a failed release must not fail the request that triggered it
                log.exception("closing generation %d failed", self.generation)

    def describe(self) -> dict:
        det = self.detector
        info = getattr(getattr(det, "backend", None), "info", None)
        g = getattr(det, "gallery", None)
        return {
            "generation": self.generation,
            "model": self.model,
            "gallery": self.gallery,
            "device": getattr(det, "device", None),
            "device_fallback": getattr(det, "fallback", None),
            "scorer": getattr(getattr(det, "scorer", None), "name", None),
            "backbone": getattr(info, "backbone", None),
            "model_fingerprint": getattr(info, "fingerprint", None),
            "gallery_images": len(g) if g is not None else None,
            "thresholds": {k: (g.thresholds.get(k) if g is not None else None) for k in ("image", "pixel")},
            "loaded_at": round(self.loaded_at, 3),
        }


def _stamp(path: str) -> tuple | None:
    """(size, mtime in ns) of a model file; None where it cannot be read (then it is loaded again)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class _Slots:
    """Admission control: a fixed number of tickets; a ticket is returned exactly once."""

    def __init__(self, n: int):
        self.capacity, self.used = n, 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def try_acquire(self) -> tuple[_Ticket | None, int]:
        """(a ticket or None, the number in use when asked)."""
        with self._lock:
            used = self.used
            if used >= self.capacity:
                return None, used
            self.used += 1
            return _Ticket(self), used

    def give_back(self) -> None:
        with self._lock:
            self.used -= 1
            if self.used == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._lock:
            return self._idle.wait_for(lambda: self.used == 0, timeout)


class _Ticket:
    __slots__ = ("_slots", "_held", "_lock")

    def __init__(self, slots: _Slots):
        self._slots, self._held, self._lock = slots, True, threading.Lock()

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._slots.give_back()


class _Job:
    """One admitted image on its way through the worker."""

    def __init__(
        self, loaded: Loaded, x: np.ndarray, geom, name: str | None, heatmap: bool, deadline: float, ticket: _Ticket
    ):
        self.loaded, self.x, self.geom, self.name, self.heatmap = loaded, x, geom, name, heatmap
        self.deadline, self.ticket = deadline, ticket
        self.enqueued = time.perf_counter()
        self.started = 0.0
        self.state = "queued"  # queued -> running -> done | cancelled | expired
        self.result: tuple[Prediction, bytes | None] | None = None  # (Prediction, heat-map PNG bytes or None)
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def claim(self) -> bool:
        with self._lock:
            if self.state != "queued":
                return False
            if time.perf_counter() >= self.deadline:
                self.state = "expired"
                return False
            self.state = "running"
            self.started = time.perf_counter()
            return True

    def finish(self) -> None:
        with self._lock:
            if self.state == "running":
                self.state = "done"
        self.done.set()

    def cancel(self) -> bool:
        """Drop the job if the worker has not started it (True), else let it finish (False)."""
        with self._lock:
            if self.state == "queued":
                self.state = "cancelled"
                return True
            return False


class _Call:
    """A function for the worker thread (:meth:`InspectionService.on_worker`)."""

    def __init__(self, fn: Callable):
        self.fn, self.done = fn, threading.Event()
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc
        finally:
            self.done.set()


@dataclass
class Done:
    """A finished inspection: the prediction, its heat map (PNG bytes, if asked), the generation
    that served it, when decoding ended (``perf_counter``) and the seconds it waited for the worker."""

    prediction: Prediction
    heatmap_png: bytes | None
    loaded: Loaded
    decoded: float
    queued: float
    id: str | None = None  # given by :attr:`InspectionService.on_result` (the operator's page) to keep it


def _warmup_image(det) -> np.ndarray:
    s = int(det.backend.info.input_size)
    rng = np.random.default_rng(0)
    return np.clip(rng.normal(128, 20, (s, s, 3)), 0, 255).astype(np.uint8)


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


class InspectionService:
    """The model side of the service: current detector, admission, worker, reload, metrics.

    ``loader(model, gallery)`` returns a detector (default: :meth:`Detector.load` with
    ``load_options``). It knows no protocol: HTTP lives in :mod:`.server`, the line in
    :mod:`spade_edge.line`; both add their metrics to :attr:`registry`.
    """

    def __init__(self, config: ServiceConfig | None = None, loader: Callable | None = None, **load_options):
        self.config = config or ServiceConfig()
        self._loader = loader or self._default_loader
        self._load_options = load_options
        self._current: Loaded | None = None
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._slots = _Slots(self.config.queue_size)
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots, not by itself
        self._heatmaps: OrderedDict[str, bytes] = OrderedDict()
        self._heatmaps_lock = threading.Lock()
        self.state = "starting"  # starting -> ready -> stopping; or failed
        self._busy_since: float | None = None
        self.error: str | None = None
        self.started_at = time.time()
        self.frames = None  # an UploadSource fed by POST /frames, when a line trigger takes uploads
        # called with (Done, the image as given) for every finished inspection, HTTP or line alike
        # (serve --ui: station.Station.record); it may set Done.id
        self.on_result: Callable | None = None
        self._worker = threading.Thread(target=self._work, name="spade-edge-worker", daemon=True)
        self._worker.start()
        self._init_metrics()

    # --- loading -----------------------------------------------------------------------------
    def _default_loader(self, model: str, gallery: str):
        from ..runtime.detector import Detector

        return Detector.load(model, gallery, **self._load_options)

    def _load_and_warm(self, model: str, gallery: str) -> tuple[Detector, float, float]:
        t0 = time.perf_counter()
        det = self._loader(model, gallery)
        t1 = time.perf_counter()
        try:
            if self.config.warmup:
                img = _warmup_image(det)
                for _ in range(self.config.warmup):
                    det.predict(img, name="warm-up")
        except BaseException:
            Loaded(det, model, gallery, 0, 0.0).retire()  # release what the loader took
            raise
        return det, t1 - t0, time.perf_counter() - t1

    def _regallery(self, det, gallery: str) -> tuple[Detector, float, float]:
        """The running detector's backend with ``gallery`` loaded anew: no model load, no warm-up
        (the backend is warm)."""
        from ..runtime.gallery import Gallery

        t0 = time.perf_counter()
        new = det.with_gallery(Gallery.load(gallery))
        return new, time.perf_counter() - t0, 0.0

    def load(self, model: str | os.PathLike, gallery: str | os.PathLike) -> dict:
        """First load (the service is not ready before it returns); raises what the loader raises."""
        model, gallery = os.fspath(model), os.fspath(gallery)
        try:
            det, t_load, t_warm = self._load_and_warm(model, gallery)
        except BaseException as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        with self._lock:
            self._current = Loaded(det, model, gallery, 1, time.time(), _stamp(model))
            self.state = "ready"
        self._m_generation.set(1)
        log.info("ready: %s + %s (load %.2f s, warm-up %.2f s)", model, gallery, t_load, t_warm)
        sd_notify(f"READY=1\nSTATUS=serving {os.path.basename(model)} + {os.path.basename(gallery)}")
        return {**self._current.describe(), "load_ms": round(t_load * 1e3, 1), "warmup_ms": round(t_warm * 1e3, 1)}

    def reload(self, model: str | None = None, gallery: str | None = None) -> dict:
        """Load (and warm up) a new model and/or gallery while the current one keeps serving, then
        swap. Unset paths keep the current ones (re-read from disk: a gallery changed in place
        with 'gallery add' is picked up). The same model file, unchanged on disk, is not loaded
        again: the new gallery joins the running backend (:meth:`Detector.with_gallery`), so growing
        the gallery costs its load, not the model's. Raises :class:`ReloadBusy` if a reload is under way."""
        if not self._reload_lock.acquire(blocking=False):
            raise ReloadBusy("another reload is in progress; try again when it has finished")
        try:
            cur = self.current
            if cur is None:
                raise ReloadBusy("the service has not finished its first load")
            model = os.fspath(model) if model else cur.model
            gallery = os.fspath(gallery) if gallery else cur.gallery
            sd_notify("RELOADING=1")
            try:
                # another loader (tests, embedders) may build detectors its own way: it loads all again
                same_model = model == cur.model and cur.model_stamp is not None and _stamp(model) == cur.model_stamp
                if same_model and self._loader == self._default_loader:
                    det, t_load, t_warm = self._regallery(cur.detector, gallery)
                else:
                    det, t_load, t_warm = self._load_and_warm(model, gallery)
            except BaseException:
                self._m_reloads.inc(outcome="failed")
                sd_notify("READY=1")
                raise
            with self._lock:
                old = self._current
                if old is None:  # close() ran while the new generation loaded
                    raise ReloadBusy("the service is closing")
                new = Loaded(det, model, gallery, old.generation + 1, time.time(), _stamp(model))
                self._current = new  # the swap: requests admitted from now on use ``new``
            old.retire()
            self._m_generation.set(new.generation)
            self._m_reloads.inc(outcome="ok")
            sd_notify(f"READY=1\nSTATUS=serving {os.path.basename(model)} + {os.path.basename(gallery)}")
            log.info("reloaded: generation %d, %s + %s", new.generation, model, gallery)
            return {**new.describe(), "load_ms": round(t_load * 1e3, 1), "warmup_ms": round(t_warm * 1e3, 1)}
        finally:
            self._reload_lock.release()

    @property
    def current(self) -> Loaded | None:
        with self._lock:
            return self._current

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def stalled(self) -> bool:
        """One image has held the worker far longer than any should (a hung device)."""
        since = self._busy_since
        return since is not None and time.monotonic() - since > self.config.stall_seconds

    @property
    def busy(self) -> bool:
        """The worker is running an image now."""
        return self._busy_since is not None

    # --- admission and the worker ---------------------------------------------------------------
    def refusal(self) -> NotReady | Busy | None:
        """What :meth:`admit` would raise now (None: it would admit), without taking a slot."""
        if not self.ready:
            return NotReady(self.state, self.error, self.config.retry_after)
        used = self._slots.used
        return Busy(used, self._slots.capacity, self.config.retry_after) if used >= self._slots.capacity else None

    def admit(self) -> _Ticket:
        """A ticket for one request; raises :class:`NotReady` or :class:`Busy`."""
        if not self.ready:
            raise NotReady(self.state, self.error, self.config.retry_after)
        t, used = self._slots.try_acquire()
        if t is None:
            raise Busy(used, self._slots.capacity, self.config.retry_after)
        return t

    def run(self, ticket: _Ticket, data: bytes | np.ndarray, name: str, deadline: float, heatmap: bool = False) -> Done:
        """Inspect one image with an admitted ``ticket`` (always returned): check and decode it here,
        run it on the worker, wait until ``deadline`` (a ``time.perf_counter()`` instant). Raises
        :class:`BadImage` (or one of its kinds), :class:`DeadlinePassed` or :class:`InferenceFailed`.
        ``data`` is encoded image bytes, or an RGB uint8 array from a camera."""
        from ..runtime.errors import ImageError

        loaded = None
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                probe_image(bytes(data), self.config, name)
            with self._lock:  # the generation that serves this request, start to end
                if self._current is None:  # closed since the ticket was admitted
                    raise NotReady(self.state, self.error, self.config.retry_after)
                loaded = self._current.use()
            try:
                x, geom = loaded.detector.prepare(data, name)
            except ImageError as exc:
                raise BadImage(str(exc)) from exc
            decoded = time.perf_counter()
            if decoded >= deadline:
                raise DeadlinePassed("while receiving and decoding")
            job = _Job(loaded, x, geom, name, heatmap, deadline, ticket)
        except BaseException:
            ticket.release()
            if loaded is not None:
                loaded.done()
            raise
        self._queue.put(job)  # the worker returns the ticket and the generation from now on
        if not job.done.wait(max(0.0, deadline - time.perf_counter())):
            job.cancel()
            raise DeadlinePassed(f"({'running' if job.state == 'running' else 'still queued'})")
        if job.state in ("cancelled", "expired"):
            raise DeadlinePassed("while queued")
        if job.error is not None:
            if isinstance(job.error, ImageError):
                raise BadImage(str(job.error))
            log.error("inference failed for %s", name, exc_info=job.error)
            raise InferenceFailed(job.error)
        assert job.result is not None  # the worker set a result or an error before finish()
        pred, png = job.result
        done = Done(pred, png, loaded, decoded, job.started - job.enqueued)
        if self.on_result is not None:
            try:
                self.on_result(done, data)
            except Exception:  # noqa: BLE001 - the page's bookkeeping must not fail an inspection
                log.exception("on_result failed for %s", name)
        return done

    def on_worker(self, fn: Callable, timeout: float = 600.0):
        """``fn()`` run on the worker thread between images (the feature backend is the worker's
        alone: a TensorRT context is not shared between threads); returns what it returns."""
        call = _Call(fn)
        self._queue.put(call)
        if not call.done.wait(timeout):
            raise TimeoutError(f"the worker did not run the call within {timeout:.0f} s")
        if call.error is not None:
            raise call.error
        return call.result

    @property
    def queue_depth(self) -> int:
        return self._slots.used

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if isinstance(job, _Call):
                job.run()
                continue
            if not job.claim():  # cancelled or past its deadline: never run
                job.ticket.release()
                job.loaded.done()
                job.done.set()
                continue
            self._busy_since = time.monotonic()
            try:
                job.result = self._infer(job)
            except BaseException as exc:  # noqa: BLE001 - reported to the client, the worker goes on
                job.error = exc
            finally:
                self._busy_since = None
                self.busy_seconds.observe(time.perf_counter() - job.started)
                job.ticket.release()  # before done.set(): a client that answers at once finds the slot free
                job.loaded.done()
                job.finish()

    def _infer(self, job: _Job) -> tuple[Prediction, bytes | None]:
        det = job.loaded.detector
        t0 = time.perf_counter()
        features = det.extract(job.x)
        t1 = time.perf_counter()
        p = det.score(features, job.x, job.geom)
        p.timings = {"backbone": t1 - t0, **p.timings}
        p.name = job.name
        png = None
        if job.heatmap:
            from ..render import heatmap_panel

            t2 = time.perf_counter()
            buf = io.BytesIO()
            heatmap_panel(p, det.gallery).save(buf, format="PNG", compress_level=1)
            png = buf.getvalue()
            p.timings["heatmap"] = time.perf_counter() - t2
        return p, png

    # --- heat maps ------------------------------------------------------------------------------
    def keep_heatmap(self, rid: str, png: bytes) -> None:
        if not self.config.heatmap_cache:
            return
        with self._heatmaps_lock:
            self._heatmaps[rid] = png
            while len(self._heatmaps) > self.config.heatmap_cache:
                self._heatmaps.popitem(last=False)

    def heatmap(self, rid: str) -> bytes | None:
        with self._heatmaps_lock:
            return self._heatmaps.get(rid)

    # --- shutdown -------------------------------------------------------------------------------
    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop admitting, let admitted requests finish (up to ``drain_timeout``), stop the worker."""
        if self.state != "failed":
            self.state = "stopping"
        sd_notify("STOPPING=1")
        self._slots.wait_idle(drain_timeout)
        self._queue.put(None)
        self._worker.join(timeout=drain_timeout)
        with self._lock:
            last, self._current = self._current, None
        if last is not None:
            last.retire()

    # --- metrics --------------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        """The service's own metrics; adapters add theirs to the same :attr:`registry`."""
        r = self.registry = m.Registry()
        self.busy_seconds = r.add(
            m.Histogram("spade_edge_worker_busy_seconds", "Worker time per image: model, scoring, heat map (seconds).")
        )
        r.add(
            m.Gauge(
                "spade_edge_queue_depth",
                "Requests in the service now (decoding, waiting or running).",
                fn=lambda: self._slots.used,
            )
        )
        r.add(
            m.Gauge(
                "spade_edge_queue_capacity", "Requests admitted at once; past it 503.", fn=lambda: self._slots.capacity
            )
        )
        r.add(
            m.Gauge(
                "spade_edge_ready",
                "1 once the model and gallery are loaded and warmed up.",
                fn=lambda: 1.0 if self.ready else 0.0,
            )
        )
        self._m_generation = r.add(m.Gauge("spade_edge_model_generation", "Loads so far (1 = first, +1 per reload)."))
        self._m_reloads = r.add(
            m.Counter(
                "spade_edge_reloads_total",
                "Reloads (POST /reload, SIGHUP, line RELOAD) by outcome.",
                ("outcome",),
                preset=[{"outcome": "ok"}, {"outcome": "failed"}],
            )
        )
        r.add(
            m.Gauge(
                "process_resident_memory_bytes",
                "Resident memory (VmRSS) of the service process.",
                fn=m.resident_memory_bytes,
            )
        )
        r.add(m.Gauge("process_start_time_seconds", "Start of the service, Unix time.", fn=lambda: self.started_at))
