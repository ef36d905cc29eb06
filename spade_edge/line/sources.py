"""Image sources behind one interface: ``grab(timeout) -> (image, name)``, called once per trigger.

- :class:`FolderSource`: the oldest new image file dropped in a folder (a camera that saves files);
- :class:`UploadSource`: images pushed over HTTP (``POST /frames`` on the line's HTTP port);
- :class:`GStreamerSource`: a GStreamer pipeline through OpenCV (CSI with nvarguscamerasrc, USB with
  v4l2src), when OpenCV was built with GStreamer (JetPack's is);
- :class:`AravisSource`: GenICam cameras (GigE Vision, USB3 Vision) through Aravis, with a software
  or a hardware trigger;
- :class:`FakeSource`: generated or given images, for tests and dry runs.

GStreamer and Aravis need a camera and system libraries; they are not run here (docs/line.md).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..runtime.errors import SpadeError
from ..runtime.images import IMAGE_SUFFIXES


class SourceError(SpadeError):
    """The source could not give an image (none in time, camera gone, bad setting)."""


class ImageSource(ABC):
    """Where a trigger's image comes from."""

    kind = "base"

    @abstractmethod
    def grab(self, timeout: float) -> tuple[bytes | np.ndarray, str]:
        """The next image (encoded bytes or an RGB uint8 array) and a name for it, within
        ``timeout`` seconds; raises :class:`SourceError` otherwise."""

    def describe(self) -> dict:
        return {"kind": self.kind}

    def close(self) -> None:
        """Release the camera or the folder."""


class FolderSource(ImageSource):
    """Each grab takes the oldest image file that appeared in ``folder`` and moves it to
    ``folder/done`` (so a restart never inspects it twice). Files younger than ``settle``
    seconds are left alone: the camera may still be writing them."""

    kind = "folder"

    def __init__(self, folder: str | os.PathLike, settle: float = 0.2, poll: float = 0.02):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"image folder {self.folder} does not exist")
        self.done = self.folder / "done"
        self.done.mkdir(exist_ok=True)
        self.settle, self.poll = float(settle), float(poll)
        self._lock = threading.Lock()

    def _oldest(self) -> Path | None:
        now = time.time()
        files = []
        with os.scandir(self.folder) as it:
            for e in it:
                if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES:
                    st = e.stat()
                    if now - st.st_mtime >= self.settle:
                        files.append((st.st_mtime, e.name))
        return self.folder / min(files)[1] if files else None

    def grab(self, timeout: float):
        end = time.monotonic() + timeout
        while True:
            with self._lock:  # two triggers never take the same file
                path = self._oldest()
                if path is not None:
                    data = path.read_bytes()
                    os.replace(path, self.done / path.name)
                    return data, path.name
            if time.monotonic() >= end:
                raise SourceError(f"no image arrived in {self.folder} within {timeout:.1f} s")
            time.sleep(self.poll)

    def describe(self) -> dict:
        return {"kind": self.kind, "folder": str(self.folder)}


class UploadSource(ImageSource):
    """Images pushed by :meth:`put` (``POST /frames`` of the line's HTTP server); a grab takes
    the oldest. At most ``capacity`` wait: a push beyond it is refused, never silently dropped."""

    kind = "upload"

    def __init__(self, capacity: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=int(capacity))
        self._n = 0

    def put(self, data: bytes, name: str | None = None) -> int:
        """Queue one image; returns how many wait now. Raises :class:`SourceError` when full."""
        self._n += 1
        try:
            self._q.put_nowait((bytes(data), name or f"upload-{self._n}"))
        except queue.Full:
            raise SourceError(f"{self._q.maxsize} uploaded images already wait for a trigger") from None
        return self._q.qsize()

    def grab(self, timeout: float):
        try:
            return self._q.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise SourceError(f"no image was uploaded within {timeout:.1f} s") from None

    def describe(self) -> dict:
        return {"kind": self.kind, "waiting": self._q.qsize(), "capacity": self._q.maxsize}


# --- cameras -------------------------------------------------------------------------------------
PIPELINES = {
    # Jetson CSI camera: Argus ISP, converted to BGR in the VIC; appsink keeps only the newest frame
    "csi": (
        "nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={width},height={height},"
        "framerate={fps}/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    ),
    "usb": (
        "v4l2src device={device} ! video/x-raw,width={width},height={height},framerate={fps}/1 ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
    ),
}


class GStreamerSource(ImageSource):
    """Frames of a GStreamer pipeline ending in an appsink, read with OpenCV (``pipeline``, or a
    preset: ``csi`` / ``usb`` filled from ``settings``). The newest frame is taken at each grab
    (stale buffered frames are dropped by the appsink)."""

    kind = "gstreamer"

    def __init__(self, pipeline: str = "csi", **settings):
        try:
            import cv2
        except ImportError as exc:
            raise SourceError(
                "the GStreamer source needs OpenCV built with GStreamer "
                "(JetPack's python3-opencv; pip's opencv wheels lack it)"
            ) from exc
        if "GStreamer:                   YES" not in cv2.getBuildInformation():
            raise SourceError(
                f"this OpenCV ({cv2.__version__}) was built without GStreamer; use JetPack's python3-opencv"
            )
        defaults = {"sensor": 0, "device": "/dev/video0", "width": 1920, "height": 1080, "fps": 30}
        self.pipeline = PIPELINES[pipeline].format(**{**defaults, **settings}) if pipeline in PIPELINES else pipeline
        self._cv2 = cv2
        self._cap = cv2.VideoCapture(self.pipeline, cv2.CAP_GSTREAMER)
        if not self._cap.isOpened():
            raise SourceError(f"GStreamer pipeline did not start: {self.pipeline}")
        self._n = 0

    def grab(self, timeout: float):
        ok, frame = self._cap.read()
        if not ok:
            raise SourceError("the GStreamer pipeline gave no frame")
        self._n += 1
        return np.ascontiguousarray(frame[..., ::-1]), f"frame-{self._n}"  # BGR -> RGB

    def describe(self) -> dict:
        return {"kind": self.kind, "pipeline": self.pipeline}

    def close(self) -> None:
        self._cap.release()


class AravisSource(ImageSource):
    """A GenICam camera through Aravis (``gi.repository.Aravis``, Debian/Ubuntu package
    gir1.2-aravis-0.8). ``trigger``: "software" (each grab fires the camera's software trigger),
    a hardware line such as "Line0" (each grab waits for the frame the PLC's pulse exposed), or
    "free" (free run: the newest frame)."""

    kind = "aravis"

    def __init__(self, camera: str | None = None, trigger: str = "software", buffers: int = 4):
        try:
            import gi

            gi.require_version("Aravis", "0.8")
            from gi.repository import Aravis
        except (ImportError, ValueError) as exc:
            raise SourceError(
                "the Aravis source needs Aravis 0.8 and PyGObject (apt install gir1.2-aravis-0.8 python3-gi)"
            ) from exc
        self._arv = Aravis
        try:
            self._camera = Aravis.Camera.new(camera)
        except Exception as exc:  # noqa: BLE001 - GLib.Error: no such camera
            raise SourceError(f"no GenICam camera {camera or '(first found)'}: {exc}") from exc
        self.trigger = trigger
        if trigger == "software":
            self._camera.set_trigger("Software")
        elif trigger != "free":
            self._camera.set_trigger(trigger)  # hardware line: TriggerMode On, TriggerSource = trigger
        self._stream = self._camera.create_stream(None, None)
        payload = self._camera.get_payload()
        for _ in range(buffers):
            self._stream.push_buffer(Aravis.Buffer.new_allocate(payload))
        self._camera.start_acquisition()
        self._n = 0

    def grab(self, timeout: float):
        if self.trigger == "software":
            self._camera.software_trigger()
        buf = self._stream.timeout_pop_buffer(int(timeout * 1e6))
        if buf is None:
            raise SourceError(f"the camera sent no frame within {timeout:.1f} s (trigger {self.trigger})")
        try:
            if buf.get_status() != self._arv.BufferStatus.SUCCESS:
                raise SourceError(f"incomplete frame from the camera ({buf.get_status().value_nick})")
            h, w = buf.get_image_height(), buf.get_image_width()
            bits = (buf.get_image_pixel_format() >> 16) & 0xFF
            img = np.frombuffer(buf.get_data(), np.uint8 if bits == 8 else np.uint16).reshape(h, w, -1)
            if bits != 8:
                img = (img >> (bits - 8)).astype(np.uint8)
            img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
            self._n += 1
            return np.ascontiguousarray(img), f"frame-{self._n}"
        finally:
            self._stream.push_buffer(buf)

    def describe(self) -> dict:
        return {"kind": self.kind, "camera": self._camera.get_model_name(), "trigger": self.trigger}

    def close(self) -> None:
        self._camera.stop_acquisition()


class FakeSource(ImageSource):
    """Images from ``frames`` (arrays or encoded bytes, cycled) or, if None, seeded noise of
    ``size``; ``delay`` seconds per grab, like an exposure; ``fail`` makes grab number n fail
    when ``fail(n)`` is true. Counts its grabs."""

    kind = "fake"

    def __init__(
        self,
        frames: Iterable | None = None,
        size: tuple[int, int] = (48, 40),
        delay: float = 0.0,
        fail: Callable[[int], bool] | None = None,
        seed: int = 0,
    ):
        self.frames = list(frames) if frames is not None else None
        self.size, self.delay, self.fail = size, float(delay), fail
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.grabs = 0

    def grab(self, timeout: float):
        with self._lock:
            self.grabs += 1
            n = self.grabs
            frame = (
                self.frames[(n - 1) % len(self.frames)]
                if self.frames
                else self._rng.integers(100, 140, (self.size[1], self.size[0], 3), dtype=np.uint8)
            )
        if self.delay:
            time.sleep(min(self.delay, timeout))
        if self.fail is not None and self.fail(n):
            raise SourceError(f"fake camera: grab {n} failed")
        return frame, f"fake-{n}"

    def describe(self) -> dict:
        return {"kind": self.kind, "grabs": self.grabs}


def source_from_config(cfg: dict) -> ImageSource:
    """Build the source a ``[source]`` table of the line configuration describes."""
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind == "folder":
        return FolderSource(cfg.pop("path"), **cfg)
    if kind == "upload":
        return UploadSource(**cfg)
    if kind == "gstreamer":
        return GStreamerSource(**cfg)
    if kind == "aravis":
        return AravisSource(**cfg)
    if kind == "fake":
        return FakeSource(**cfg)
    raise SourceError(f"unknown source type {kind!r}")
