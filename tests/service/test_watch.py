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
        arr = np.full((40, 48, 3), 250, np.uint8) if n in bright else rng.integers(100, 140, (40, 48, 3), dtype=np.uint8)
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
    assert once(detector, inbox, out) == 1
    assert "error" in lines(out)[0] and once(detector, inbox, out) == 0
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
    assert once(detector, inbox, out, done_dir=done) == 3
    assert list(inbox.iterdir()) == []
    assert (done / "a.png").exists() and (done / "failed" / "c.png").exists()
    with Watcher(detector, inbox, out):
        with pytest.raises(RuntimeError, match="another 'spade-edge watch'"):
            Watcher(detector, inbox, out)


def _watch_cmd(assets, inbox, out, *extra):
    return [sys.executable, "-m", "spade_edge.service", "watch", str(inbox), "-m", str(assets["model"]),
            "-g", str(assets["gallery_a"]), "--device", "cpu", "--threads", "1", "-o", str(out),
            "--settle", "0", "--interval", "0.05", *extra]


def test_killed_watcher_restarts_without_double_processing(assets, tmp_path):
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    names = [f"img{i:03d}.png" for i in range(40)]
    drop(inbox, names)
    proc = subprocess.Popen(_watch_cmd(assets, inbox, out, "--quiet"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
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
