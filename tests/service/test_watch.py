"""Watch-folder mode: each image once, across restarts and crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from spade_edge.runtime.detector import Detector
from spade_edge.service.watch import RESULTS, WatchConfig, Watcher

from .conftest import ROOT


@pytest.fixture(scope="module")
def detector(assets):
    return Detector.load(assets["model"], assets["gallery_a"], device="cpu", threads=1)


def drop(folder, names, seed=0, bright=()):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for n in names:
        arr = (
            np.full((40, 48, 3), 250, np.uint8) if n in bright else rng.integers(100, 140, (40, 48, 3), dtype=np.uint8)
        )
        tmp = folder / f".{n}.part"  # how a careful sender writes: temporary name, then rename
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, folder / n)


def lines(out):
    path = out / RESULTS
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def once(det, folder, out, **cfg):
    with Watcher(det, folder, out, WatchConfig(settle=0, interval=0.05, **cfg)) as w:
        return w.run_once()


def test_each_image_once_across_restarts(detector, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    drop(inbox, [f"p{i}.png" for i in range(5)], bright={"p3.png"})
    (inbox / "notes.txt").write_text("not an image, ignored")
    assert once(detector, inbox, out) == 5
    assert once(detector, inbox, out) == 0  # restart: nothing new
    drop(inbox, [f"q{i}.png" for i in range(3)], seed=1)
    assert once(detector, inbox, out) == 3
    recs = lines(out)
    assert sorted(r["image"] for r in recs) == sorted([f"p{i}.png" for i in range(5)] + [f"q{i}.png" for i in range(3)])
    assert {r["image"]: r["verdict"] for r in recs}["p3.png"] == "NOT_OK"
    for r in recs:
        assert r["key"].startswith(r["image"] + "|") and len(r["sha256"]) == 64 and r["threshold"] > 0
        assert os.path.isfile(r["heatmap"])
    assert len({r["heatmap"] for r in recs}) == 8


def test_not_ok_heatmaps_only_and_replaced_file_is_a_new_image(detector, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    drop(inbox, ["a.png", "b.png"], bright={"b.png"})
    assert once(detector, inbox, out, heatmaps="not-ok") == 2
    recs = {r["image"]: r for r in lines(out)}
    assert "heatmap" not in recs["a.png"] and "heatmap" in recs["b.png"]
    time.sleep(0.01)
    drop(inbox, ["a.png"], seed=5)  # the line reuses a name: a new part, a new result
    st = (inbox / "a.png").stat()
    os.utime(inbox / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert once(detector, inbox, out, heatmaps="not-ok") == 1
    assert Counter(r["image"] for r in lines(out)) == {"a.png": 2, "b.png": 1}


def test_torn_last_line_is_cut_and_that_image_scored_again(detector, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    drop(inbox, [f"p{i}.png" for i in range(4)])
    once(detector, inbox, out)
    path = out / RESULTS
    text = path.read_bytes()
    last = text.rstrip(b"\n").rsplit(b"\n", 1)[1]
    path.write_bytes(text[: len(text) - len(last) // 2 - 1])  # a crash in the middle of the last write
    victim = json.loads(last)["image"]
    assert once(detector, inbox, out) == 1
    recs = lines(out)  # every line parses again
    assert Counter(r["image"] for r in recs) == {f"p{i}.png": 1 for i in range(4)}
    assert recs[-1]["image"] == victim


def test_bad_image_recorded_once_and_files_wait_to_settle(detector, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert once(detector, inbox, out, give_up=0.3) == 1  # failed once unchanged for give_up
    assert "error" in lines(out)[0] and once(detector, inbox, out, give_up=0.3) == 0
    with Watcher(detector, inbox, out, WatchConfig(settle=0.4, interval=0.05)) as w:
        drop(inbox, ["late.png"])
        assert w.ready_files() == []  # just arrived: not read yet
        with open(inbox / "late.png", "ab") as f:
            f.write(b"")
        time.sleep(0.5)
        assert [p.name for p, _ in w.ready_files()] == ["late.png"]
        with open(inbox / "late.png", "ab") as f:  # it changed again: the clock restarts
            f.write(b"\0")
        assert w.ready_files() == []
        time.sleep(0.5)
        assert [p.name for p, _ in w.ready_files()] == ["late.png"]


def test_done_dir_and_one_watcher_per_output(detector, tmp_path):
    inbox, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    inbox.mkdir()
    drop(inbox, ["a.png", "b.png"])
    (inbox / "c.png").write_bytes(b"garbage")
    assert once(detector, inbox, out, done_dir=done, give_up=0.3) == 3
    assert list(inbox.iterdir()) == []
    assert (done / "a.png").exists() and (done / "failed" / "c.png").exists()
    with Watcher(detector, inbox, out):
        with pytest.raises(RuntimeError, match="another 'spade-edge watch'"):
            Watcher(detector, inbox, out)


def _watch_cmd(assets, inbox, out, *extra):
    return [
        sys.executable,
        "-m",
        "spade_edge",
        "watch",
        str(inbox),
        "-m",
        str(assets["model"]),
        "-g",
        str(assets["gallery_a"]),
        "--device",
        "cpu",
        "--threads",
        "1",
        "-o",
        str(out),
        "--settle",
        "0",
        "--interval",
        "0.05",
        *extra,
    ]


def test_killed_watcher_restarts_without_double_processing(assets, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    names = [f"img{i:03d}.png" for i in range(40)]
    drop(inbox, names)
    proc = subprocess.Popen(
        _watch_cmd(assets, inbox, out, "--quiet"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    end = time.monotonic() + 60
    while len(lines(out)) < 3 and time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    done_before = len(lines(out))
    assert done_before >= 3
    print(f"killed after {done_before} of 40 images")
    r = subprocess.run(_watch_cmd(assets, inbox, out, "--once"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed = [json.loads(x) for x in r.stdout.splitlines()]
    assert f"{done_before} images already recorded" in r.stderr or done_before == 40
    recs = lines(out)
    assert Counter(x["image"] for x in recs) == {n: 1 for n in names}  # each exactly once
    assert len(printed) == 40 - done_before
    # and a graceful stop (SIGTERM) of a long-running watcher exits 0
    proc = subprocess.Popen(_watch_cmd(assets, inbox, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3.0)  # past start-up, even on a loaded machine
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0 and proc.stdout.read() == b""


# --- completeness and symlinks (issue 17) ------------------------------------------------------------
def png_bytes(seed=3) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(100, 140, (40, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Running:
    """A watcher scanning in a thread, as `spade-edge watch` runs."""

    def __init__(self, det, inbox, out, **cfg):
        import threading

        self.w = Watcher(det, inbox, out, WatchConfig(interval=0.05, **cfg))
        self.t = threading.Thread(target=self.w.run, daemon=True)

    def __enter__(self):
        self.t.start()
        return self.w

    def __exit__(self, *exc):
        self.w.stop()
        self.t.join(30)
        self.w.close()


def wait_lines(out, n, timeout=30.0):
    end = time.monotonic() + timeout
    while len(lines(out)) < n and time.monotonic() < end:
        time.sleep(0.02)
    return lines(out)


@pytest.mark.parametrize("with_done_dir", [False, True], ids=["in-place", "done-dir"])
def test_a_copy_that_pauses_longer_than_settle_is_scored_once_when_complete(detector, tmp_path, with_done_dir):
    """Before: the half-written file was scored as a broken image after `settle`, then scored again
    once complete; with --done-dir the half file went to failed/ while the copy went on writing
    into it, and the complete image was never scored."""
    inbox, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    inbox.mkdir()
    data = png_bytes()
    extra = {"done_dir": done} if with_done_dir else {}
    with Running(detector, inbox, out, settle=0.2, **extra):
        with open(inbox / "part.png", "wb") as f:  # cp writes under the final name
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(1.2)  # the copy stalls (a busy share) for 6 x settle
            assert lines(out) == []  # not decodable and changed recently: not given up on
            assert (inbox / "part.png").exists()  # and never moved while it may still change
            f.write(data[len(data) // 2 :])
        recs = wait_lines(out, 1)
        time.sleep(0.5)  # time for a wrong second line
    recs = lines(out)
    assert len(recs) == 1 and "error" not in recs[0], recs
    assert recs[0]["image"] == "part.png" and recs[0]["verdict"] in ("OK", "NOT_OK")
    assert recs[0]["key"].split("|")[1] == str(len(data))
    if with_done_dir:
        assert (done / "part.png").read_bytes() == data and not (done / "failed").exists()
        assert list(inbox.iterdir()) == []


def test_an_image_that_never_decodes_is_failed_once_after_the_give_up_time(detector, tmp_path):
    inbox, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    inbox.mkdir()
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated for good")
    with Running(detector, inbox, out, settle=0.1, give_up=1.0, done_dir=done):
        time.sleep(0.6)
        assert lines(out) == [] and (inbox / "broken.png").exists()  # retried, not failed yet
        recs = wait_lines(out, 1)
        time.sleep(0.3)
    recs = lines(out)
    assert len(recs) == 1 and "error" in recs[0] and recs[0]["image"] == "broken.png"
    assert (done / "failed" / "broken.png").exists()


def test_a_file_that_changes_while_it_is_scored_is_neither_recorded_nor_moved(detector, tmp_path):
    inbox, out, done = tmp_path / "in", tmp_path / "out", tmp_path / "done"
    inbox.mkdir()
    drop(inbox, ["a.png"])

    class Appending:  # the writer comes back while the image is being scored
        gallery = detector.gallery

        def __init__(self):
            self.calls = 0

        def predict(self, data, name=None):
            self.calls += 1
            if self.calls == 1:
                with open(inbox / "a.png", "ab") as f:
                    f.write(b"\0" * 10)
                st = (inbox / "a.png").stat()
                os.utime(inbox / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
            return detector.predict(data, name)

    det = Appending()
    with Watcher(det, inbox, out, WatchConfig(settle=0, interval=0.05, done_dir=done)) as w:
        ((p, st),) = w.ready_files()
        assert w.process(p, st) is None  # changed under it: looked at again later
        assert lines(out) == [] and (inbox / "a.png").exists()
        assert w.run_once() == 1
    recs = lines(out)
    assert len(recs) == 1 and recs[0]["key"].split("|")[1] == str((done / "a.png").stat().st_size)


def test_symlinks_are_not_followed(detector, tmp_path):
    """Before: a link in the watched folder to an image outside it was read and scored (and with
    --recursive... links to folders were never entered; now links are not read at all)."""
    inbox, out, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    drop(outside, ["secret.png"])
    drop(inbox, ["real.png"])
    (inbox / "link.png").symlink_to(outside / "secret.png")
    (inbox / "inner.png").symlink_to(inbox / "real.png")
    (inbox / "sub").symlink_to(outside, target_is_directory=True)
    assert once(detector, inbox, out, recursive=True) == 1
    assert [r["image"] for r in lines(out)] == ["real.png"]
    assert (outside / "secret.png").exists()


def test_watch_command_gives_up_on_a_broken_file_after_give_up(assets, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    drop(inbox, ["good.png"])
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n never finished")
    (inbox / "link.png").symlink_to(inbox / "good.png")
    r = subprocess.run(
        _watch_cmd(assets, inbox, out, "--once", "--give-up", "0.3"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    recs = {x["image"]: x for x in lines(out)}
    assert sorted(recs) == ["broken.png", "good.png"] and "error" in recs["broken.png"]
    assert "verdict" in recs["good.png"]
