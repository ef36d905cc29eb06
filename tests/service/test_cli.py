"""The serve and watch commands as processes: start, reload on SIGHUP, clean stop, clear failures."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import click
from click.testing import CliRunner

from spade_edge.service.cli import serve, watch

from .conftest import ROOT, ServerProcess, request


def test_commands_are_plain_click_commands():
    assert isinstance(serve, click.Command) and isinstance(watch, click.Command)
    assert not isinstance(serve, click.Group)
    r = CliRunner().invoke(serve, ["--help"])
    assert r.exit_code == 0 and "/inspect" in r.output and "--queue-size" in r.output


def test_serve_and_watch_take_the_scoring_options_of_infer():
    from spade_edge.cli import main

    def options(cmd):
        return {o for p in cmd.params for o in p.opts if o.startswith("--")}

    shared = {"--device", "--fp16", "--threads", "--k-image", "--k-gallery", "--kappa", "--mode", "--levels", "--score"}
    infer = main.get_command(None, "infer")
    assert shared <= options(infer) and shared <= options(serve) and shared <= options(watch)
    for name in shared:  # the same help everywhere: one definition (spade_edge/options.py)
        helps = {next(p.help for p in c.params if name in p.opts) for c in (infer, serve, watch)}
        assert len(helps) == 1, name


def test_serve_reloads_on_sighup_and_stops_cleanly(assets, tmp_path):
    srv = ServerProcess(assets["model"], assets["gallery_a"], tmp_path)
    assert srv.wait_ready()["generation"] == 1
    srv.proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + 30
    while json.loads(request(srv.url, path="/health")[2])["generation"] != 2:
        assert time.monotonic() < end
        time.sleep(0.05)
    t0 = time.monotonic()
    assert srv.stop() == 0 and time.monotonic() - t0 < 15
    assert "ready" in srv.log.read_text()


def _run_serve(*args):
    cmd = [sys.executable, "-m", "spade_edge", "serve", "--device", "cpu", "--port", "0", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_serve_fails_clearly(assets):
    r = _run_serve("-m", str(assets["other_model"]), "-g", str(assets["gallery_a"]))
    assert r.returncode == 1 and "cannot start" in r.stderr and "rebuild the gallery" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "spade_edge",
            "serve",
            "-m",
            str(assets["model"]),
            "-g",
            str(assets["gallery_a"]),
            "--port",
            str(port),
        ]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "cannot listen" in r.stderr
    r = _run_serve("-m", str(assets["model"]), "-g", str(assets["gallery_a"]), "--expect-size", "big")
    assert r.returncode == 2 and "WIDTHxHEIGHT" in r.stderr


def test_service_modules_do_not_import_torch():
    code = (
        "import sys, spade_edge.service.server, spade_edge.service.watch, spade_edge.service.cli, "
        "spade_edge.bench.jetson, spade_edge.cli; assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
