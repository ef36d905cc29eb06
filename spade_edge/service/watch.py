"""Watch-folder mode: score every image a line drops into a folder (a share, a camera's FTP
target), once, even across restarts.

- Polling, not inotify: network shares (SMB, NFS) do not deliver change events reliably.
- A file is complete when it has stopped changing (same size and modification time over
  ``settle`` seconds) AND it decodes. A copy can stall for longer than ``settle`` (a busy share):
  a file that does not decode is retried while it changes, and is recorded as failed only once it
  has stayed unchanged for ``give_up`` seconds. A file that changes while it is scored is
  neither recorded nor moved: it is looked at again. So a half-copied image is never scored, and
  a file is never moved while it may still be written.
- Symbolic links are not read (nor, with ``recursive``, entered): a link could make the watcher
  read, score and move files outside the folder. Files are opened without following links.
- ``results.jsonl`` in the output folder gets one JSON line per image (the ``infer`` line plus
  ``key``, ``sha256``, ``time``, ``threshold`` and the heat map's path), written and fsync'ed
  before the next image. It is also the record of what was done: an image whose key (relative
  path, size, modification time) is in it is never scored again. A line torn by a crash is cut off
  at start, and that image is scored again: each image gets exactly one complete line.
- An image that cannot be read gets an ``error`` line, once, after ``give_up`` (it is not retried
  forever).
- One watcher per output folder (a lock file); a second one refuses to start.
- ``done_dir``: processed images are moved there (failed ones to ``done_dir/failed``), which
  keeps the watched folder small; without it images stay where they are.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..runtime.images import IMAGE_SUFFIXES

log = logging.getLogger("spade_edge.service.watch")

RESULTS = "results.jsonl"
HEATMAP_MODES = ("all", "not-ok", "none")


@dataclass(frozen=True)
class WatchConfig:
    interval: float = 1.0  # seconds between scans
    settle: float = 1.0  # seconds a file must stay unchanged before it is read
    give_up: float = 60.0  # seconds a file that does not decode must stay unchanged before it is failed
    heatmaps: str = "all"  # all | not-ok | none
    recursive: bool = False
    done_dir: Path | None = None

    def __post_init__(self):
        if self.heatmaps not in HEATMAP_MODES:
            raise ValueError(f"heatmaps must be one of {HEATMAP_MODES}, got {self.heatmaps!r}")
        if self.interval <= 0 or self.settle < 0 or self.give_up < 0:
            raise ValueError("interval must be positive, settle and give_up not negative")


def file_key(rel: str, st: os.stat_result) -> str:
    """What identifies one dropped image: where it is, its size and its modification time (a new
    file under an old name is a new image)."""
    return f"{rel}|{st.st_size}|{st.st_mtime_ns}"


class Results:
    """The results file: append-only JSON lines, and the keys it holds."""

    def __init__(self, path: Path):
        self.path = path
        self._repair()
        self._f = open(path, "ab")

    def _repair(self) -> None:
        """Cut a torn last line (a crash in the middle of a write)."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # find the last newline, reading backwards in blocks
            pos, cut = size, 0
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                block = f.read(step)
                i = block.rfind(b"\n")
                if i >= 0:
                    cut = pos + i + 1
                    break
            log.warning("%s: cutting a torn last line (%d bytes); that image is scored again", self.path, size - cut)
            f.truncate(cut)

    def keys(self, wanted: set[str] | None = None) -> set[str]:
        """Keys recorded so far (only those in ``wanted``, if given: memory stays bounded by the
        folder, not by the history)."""
        out: set[str] = set()
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    k = json.loads(line).get("key")
                except (ValueError, AttributeError):
                    log.warning("%s:%d: not a JSON object, ignored", self.path, n)
                    continue
                if k and (wanted is None or k in wanted):
                    out.add(k)
        return out

    def append(self, record: dict) -> None:
        self._f.write((json.dumps(record) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class FolderLock:
    """An exclusive lock on the output folder (released when the process ends, even by a crash)."""

    def __init__(self, folder: Path):
        self._f = open(folder / ".spade-edge-watch.lock", "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise RuntimeError(f"another 'spade-edge watch' is writing to {folder}; stop it first") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"{os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        self._f.close()


class Watcher:
    """Scores the images in ``folder`` with ``detector``, writing into ``out``."""

    def __init__(
        self,
        detector,
        folder: str | os.PathLike,
        out: str | os.PathLike | None = None,
        config: WatchConfig | None = None,
        emit: Callable[[dict], None] | None = None,
    ):
        self.detector = detector
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder to watch")
        self.out = Path(out).resolve() if out else self.folder / "spade-edge-out"
        self.config = config or WatchConfig()
        self.emit = emit
        self.out.mkdir(parents=True, exist_ok=True)
        self.heatmap_dir = self.out / "heatmaps"
        self._lock = FolderLock(self.out)
        self.results = Results(self.out / RESULTS)
        self._seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, since when unchanged)
        self._undecodable: dict[str, tuple[str, str]] = {}  # key -> (error, sha256): waiting to be given up on
        present = {file_key(self._rel(p), st) for p, st in self._candidates()}
        self.done: set[str] = self.results.keys(present)
        self.processed = 0  # this run
        self.stop_event = threading.Event()
        if self.config.done_dir is not None:
            Path(self.config.done_dir).mkdir(parents=True, exist_ok=True)

    # --- finding files ----------------------------------------------------------------------------
    def _rel(self, p: Path) -> str:
        return p.relative_to(self.folder).as_posix()

    def _candidates(self) -> Iterator[tuple[Path, os.stat_result]]:
        skip = {self.out}
        if self.config.done_dir is not None:
            skip.add(Path(self.config.done_dir).resolve())
        stack = [self.folder]
        while stack:
            d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError as exc:
                log.warning("cannot list %s: %s", d, exc)
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue  # hidden, and the temporary names many copy tools use
                p = Path(e.path)
                try:
                    if e.is_symlink():
                        continue  # never followed: it may lead out of the folder
                    if e.is_dir(follow_symlinks=False):
                        if self.config.recursive and p not in skip:
                            stack.append(p)
                        continue
                    if not e.is_file(follow_symlinks=False) or p.suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    yield p, e.stat(follow_symlinks=False)
                except OSError:
                    continue  # vanished while we looked

    def ready_files(self) -> list[tuple[Path, os.stat_result]]:
        """Files not yet processed that have been unchanged for ``settle`` seconds, oldest first."""
        now = time.monotonic()
        seen, ready, keys = {}, [], set()
        for p, st in self._candidates():
            key = file_key(self._rel(p), st)
            keys.add(key)
            if key in self.done:
                if self.config.done_dir is not None:
                    self._move_done(p, False, st)  # recorded, but the move did not happen (crash)
                continue
            sig = (st.st_size, st.st_mtime_ns)
            prev = self._seen.get(p)
            since = prev[2] if prev is not None and prev[:2] == sig else now
            seen[p] = (*sig, since)
            if now - since >= self.config.settle:
                ready.append((p, st))
        self._seen = seen
        self.done &= keys  # forget files that are gone: memory bounded by the folder
        self._undecodable = {k: v for k, v in self._undecodable.items() if k in keys}
        ready.sort(key=lambda t: (t[1].st_mtime_ns, t[0].name))
        return ready

    # --- processing ---------------------------------------------------------------------------
    def _stable_for(self, path: Path, st: os.stat_result) -> float:
        """Seconds this watcher has seen ``path`` unchanged at ``st``'s size and time."""
        prev = self._seen.get(path)
        return time.monotonic() - prev[2] if prev is not None and prev[:2] == (st.st_size, st.st_mtime_ns) else 0.0

    @staticmethod
    def _unchanged(path: Path, st: os.stat_result) -> bool:
        try:
            now = os.lstat(path)
        except OSError:
            return False
        return stat.S_ISREG(now.st_mode) and (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    @staticmethod
    def _read(path: Path, st: os.stat_result) -> bytes | None:
        """The file's bytes if it is still the regular file ``st`` describes (never through a
        link, never blocking on a FIFO put in its place); None if it changed or vanished."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode) or (before.st_size, before.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                return None
            data = f.read(st.st_size + 1)
        return data if len(data) == st.st_size else None

    def process(self, path: Path, st: os.stat_result) -> dict | None:
        """Score one file and record it; None if it changed, vanished or does not decode yet
        (looked at again later)."""
        from ..runtime.errors import ImageError

        rel = self._rel(path)
        key = file_key(rel, st)
        waited, give_up = self._stable_for(path, st), max(self.config.give_up, self.config.settle)
        rec: dict = {"key": key, "image": rel}
        failed = True
        if key in self._undecodable:  # the same bytes failed before: no need to decode them again
            if waited < give_up:
                return None
            rec["error"], rec["sha256"] = self._undecodable.pop(key)
        else:
            data = self._read(path, st)
            if data is None:
                return None  # still being written after all: wait for it to settle again
            sha = rec["sha256"] = hashlib.sha256(data).hexdigest()
            try:
                p = self.detector.predict(data, name=rel)
            except ImageError as exc:
                if waited < give_up:  # maybe a copy that stalled: retried until it stays unchanged
                    log.debug("%s does not decode yet (%s); retried until unchanged for %.0f s", rel, exc, give_up)
                    self._undecodable[key] = (str(exc), sha)
                    return None
                rec["error"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - recorded once, the watcher goes on
                log.exception("scoring %s failed", rel)
                rec["error"] = f"{type(exc).__name__}: {exc}"
            else:
                failed = False
                rec.update({k: v for k, v in p.to_dict().items() if k != "image"})
                rec["threshold"] = self.detector.gallery.thresholds.get("image")
                mode = self.config.heatmaps
                if mode == "all" or (mode == "not-ok" and p.verdict == "NOT_OK"):
                    rec["heatmap"] = str(self._save_heatmap(p, rel, sha))
        if not self._unchanged(path, st):
            return None  # written to while it was scored: that was not the whole image
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.results.append(rec)  # the commit point: from here on this image is done
        self.done.add(key)
        self.processed += 1
        if self.emit:
            self.emit(rec)
        if self.config.done_dir is not None:
            self._move_done(path, failed, st)
        return rec

    def _save_heatmap(self, pred, rel: str, sha: str) -> Path:
        from ..render import heatmap_panel

        stem = rel.rsplit(".", 1)[0].replace("/", "__")
        path = self.heatmap_dir / f"{stem}_{sha[:8]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        heatmap_panel(pred, self.detector.gallery).save(tmp, format="PNG")
        os.replace(tmp, path)
        return path

    def _move_done(self, path: Path, failed: bool, st: os.stat_result) -> None:
        """Move ``path`` out of the folder, unless it changed since ``st`` (a writer is back: the
        new bytes are a new image, looked at again)."""
        if not self._unchanged(path, st):
            log.warning("%s changed after it was recorded; not moved, looked at again", path)
            return
        assert self.config.done_dir is not None  # called only when there is one
        dest_dir = Path(self.config.done_dir) / ("failed" if failed else "")
        dest = dest_dir / self._rel(path)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
        except OSError as exc:  # another file system: copy then delete
            try:
                import shutil

                shutil.move(str(path), str(dest))
            except OSError:
                log.warning("cannot move %s to %s: %s", path, dest, exc)

    # --- loops --------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Process every file present now (waiting for each to settle), then return how many."""
        n0 = self.processed
        while not self.stop_event.is_set():
            ready = self.ready_files()
            handled = set()
            for p, st in ready:
                if self.stop_event.is_set():
                    break
                if self.process(p, st) is not None:
                    handled.add(p)
            if not set(self._seen) - handled:  # nothing left that is still settling
                break
            self.stop_event.wait(min(self.config.interval, max(self.config.settle, 0.05)))
        return self.processed - n0

    def run(self) -> None:
        """Scan every ``interval`` seconds until :meth:`stop`."""
        log.info("watching %s -> %s", self.folder, self.out)
        while not self.stop_event.is_set():
            for p, st in self.ready_files():
                if self.stop_event.is_set():
                    break
                self.process(p, st)
            self.stop_event.wait(self.config.interval)

    def stop(self) -> None:
        self.stop_event.set()

    def close(self) -> None:
        self.results.close()
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
