"""Gallery generations: every change made through the operator's page (or ``gallery rollback``)
keeps the file it replaces, so that any change can be undone.

Beside ``parts.gallery`` lives ``parts.gallery.history/``: ``log.jsonl`` (one line per change:
generation, what, when, which client) and ``NNNNNN.gallery``, the gallery as it was at generation
NNNNNN (a hard link to the replaced file: a gallery is never written in place, always replaced by
a rename, so the link keeps the old contents at no cost). Generation 0 is the gallery before the
first recorded change. A change is made under the gallery's lock (runtime/build.py
``gallery_lock``), after checking that the generation the client saw is still the current one
(:class:`StaleGeneration` otherwise: another reviewer changed it meanwhile). A rollback is itself a
change: it puts an older generation's file back as a new generation, so it too can be undone.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..runtime.build import writing
from ..runtime.errors import GalleryError

KEEP = 20  # snapshots kept by default (older generations stay in the log, no longer restorable)


class StaleGeneration(GalleryError):
    """The gallery changed since the client read its generation."""

    def __init__(self, expected: int, current: int):
        super().__init__(
            f"the gallery is at generation {current}, not {expected}: another change came first; reload and retry"
        )
        self.expected, self.current = expected, current


def history_dir(gallery: str | os.PathLike) -> Path:
    g = Path(gallery)
    return g.with_name(g.name + ".history")


def _snapshot(gallery: Path, generation: int) -> Path:
    return history_dir(gallery) / f"{generation:06d}.gallery"


def log(gallery: str | os.PathLike) -> list[dict]:
    """The recorded changes, oldest first (empty: never changed through here)."""
    path = history_dir(gallery) / "log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash: the ones before it stand
    return out


def current(gallery: str | os.PathLike) -> int:
    """The gallery's generation: that of the last recorded change, 0 if none."""
    entries = log(gallery)
    return int(entries[-1]["generation"]) if entries else 0


def restorable(gallery: str | os.PathLike) -> list[int]:
    """Generations whose file is kept (the current one is the gallery itself)."""
    d = history_dir(gallery)
    gens = sorted(int(p.stem) for p in d.glob("[0-9]*.gallery") if p.stem.isdigit()) if d.is_dir() else []
    return gens + [current(gallery)]


def _keep_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links: a copy, written then renamed
        tmp = dst.with_suffix(".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _prune(gallery: Path, keep: int) -> None:
    d = history_dir(gallery)
    snaps = sorted(p for p in d.glob("[0-9]*.gallery") if p.stem.isdigit())
    for p in snaps[: max(0, len(snaps) - keep)]:
        p.unlink(missing_ok=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def change(
    gallery: str | os.PathLike,
    action: str,
    apply: Callable[[], object],
    client: str,
    expected: int | None = None,
    detail: dict | None = None,
    keep: int = KEEP,
) -> dict:
    """Make one recorded change: under the gallery's lock, check ``expected`` (the generation the
    client saw; None: no check), keep the current file, run ``apply()`` (which writes the gallery
    without taking the lock again), record it. Returns the log entry."""
    gallery = Path(gallery)
    d = history_dir(gallery)
    with writing(gallery):
        d.mkdir(exist_ok=True)
        gen = current(gallery)
        if expected is not None and int(expected) != gen:
            raise StaleGeneration(int(expected), gen)
        _keep_copy(gallery, _snapshot(gallery, gen))
        apply()
        entry = {
            "generation": gen + 1,
            "previous": gen,
            "action": action,
            "time": _now(),
            "client": client,
            **({"detail": detail} if detail else {}),
        }
        with open(d / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _prune(gallery, keep)
    return entry


def rollback(
    gallery: str | os.PathLike, to: int | None = None, client: str = "cli", expected: int | None = None
) -> dict:
    """Put generation ``to`` (default: the one before the current) back as a new generation."""
    gallery = Path(gallery)
    with writing(gallery):  # read the current generation under the lock, as change() will
        gen = current(gallery)
        entries = log(gallery)
    if to is None:
        if not entries:
            raise GalleryError(f"{gallery}: no recorded change to undo")
        to = int(entries[-1]["previous"])
    to = int(to)
    if to == gen:
        raise GalleryError(f"{gallery}: generation {to} is the current one")
    src = _snapshot(gallery, to)
    if not src.exists():
        raise GalleryError(
            f"{gallery}: generation {to} is not kept (restorable: {', '.join(map(str, restorable(gallery)))})"
        )

    def put_back():
        tmp = gallery.with_name(f".{gallery.name}.rollback.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # the snapshot itself stays: nothing writes a gallery in place
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, gallery)

    return change(
        gallery, "rollback", put_back, client, expected=gen if expected is None else expected, detail={"to": to}
    )


def set_threshold(gallery: Path, value: float) -> None:
    """Rewrite the gallery with image threshold ``value`` (call inside :func:`change`)."""
    from ..runtime.gallery import Gallery

    g = Gallery.load(gallery)
    th = dict(g.manifest.get("thresholds", {}))
    old = th.get("image")
    th["image"] = float(value)
    g.manifest = dict(g.manifest, thresholds=th)
    g.manifest["history"] = list(g.manifest.get("history", [])) + [f"image threshold {old} -> {float(value)}"]
    g.save(gallery)
