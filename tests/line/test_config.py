"""The line configuration file: checked whole, every problem named; and `spade-edge line` /
`spade-edge serve --tcp` run as real processes."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from spade_edge.cli import main
from spade_edge.line.config import ConfigError, load_config

from ..service.conftest import ROOT, request


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "line.toml"
    p.write_text(text)
    return p


@pytest.fixture
def files(tmp_path, assets):
    shutil.copy(assets["model"], tmp_path / "model.onnx")
    shutil.copy(assets["gallery_a"], tmp_path / "parts.gallery")
    (tmp_path / "incoming").mkdir()
    return tmp_path


def test_a_good_file_loads_with_defaults_and_relative_paths(files):
    cfg = load_config(
        write(
            files,
            """
model = "model.onnx"
gallery = "parts.gallery"
[source]
type = "folder"
path = "incoming"
[tcp]
port = 2001
[modbus]
port = 5020
[opcua]
port = 4841
[mqtt]
host = "mes.local"
topic = "plant/line3"
""",
        )
    )
    assert cfg.model == files / "model.onnx" and cfg.adapters == ["tcp", "modbus", "opcua"]
    assert cfg.section("tcp")["result_format"] == "{code},{job},{verdict},{score:.6f}"
    assert cfg.section("modbus")["ack_timeout"] == 10.0 and cfg.section("mqtt")["qos"] == 1
    assert cfg.source_settings() == {"type": "folder", "path": str(files / "incoming"), "settle": 0.2}


def test_every_problem_is_reported_at_once(files):
    with pytest.raises(ConfigError) as e:
        load_config(
            write(
                files,
                """
model = "missing.onnx"
galery = "parts.gallery"
device = "tpu"
[source]
type = "foldr"
[tcp]
port = 2001
result_format = "{verdict},{bogus}"
[modbus]
port = 2001
ack_timeout = "soon"
[opcua]
port = 70000
[mqtt]
host = "mes"
qos = 3
[camera]
x = 1
""",
            )
        )
    text = str(e.value)
    for needle in (
        "missing.onnx': no such file",
        "galery: unknown setting (did you mean 'gallery'?)",
        "gallery: required",
        "device = 'tpu'",
        "[source] type = 'foldr'",
        "(did you mean 'folder'?)",
        "[tcp] result format",
        "[modbus] port = 2001: already used by [tcp]",
        "[modbus] ack_timeout = 'soon': must be int or float",
        "[opcua] port = 70000: must be 0..65535",
        "[mqtt] qos = 3",
        "[camera]: unknown section",
    ):
        assert needle in text, f"{needle!r} not reported:\n{text}"
    assert len(e.value.problems) == 11  # one line per problem (the suggestion is part of its line)


@pytest.mark.parametrize(
    "body,needle",
    [
        ('model = "model.onnx"\ngallery = "parts.gallery"\n', "no adapter"),
        ('model = "model.onnx"\ngallery = "parts.gallery"\n[tcp]\nport = 1\n', "[tcp] triggers need an image source"),
        (
            'model = "model.onnx"\ngallery = "parts.gallery"\n[tcp]\n[source]\ntype = "upload"\n',
            "add an [http] section",
        ),
        (
            'model = "model.onnx"\ngallery = "parts.gallery"\n[tcp]\n[source]\ntype = "folder"\npath = "nowhere"\n',
            "path = 'nowhere': no such folder",
        ),
        (
            'model = "model.onnx"\ngallery = "parts.gallery"\n[tcp]\n[source]\ntype = "upload"\npath = "x"\n[http]\n',
            "path: not a setting of a upload source",
        ),
        ('model = "model.onnx"\ngallery = "parts.gallery"\n[tcp\n', "not valid TOML"),
        ('model = "model.onnx"\ngallery = "parts.gallery"\nmode = "fancy"\n[http]\n', "scoring: mode must be one of"),
        ('model = "model.onnx"\ngallery = "parts.gallery"\nk_image = 0\n[http]\n', "scoring: k_image must be >= 1"),
        ('model = "model.onnx"\ngallery = "parts.gallery"\nlevels = [1]\n[http]\n', "must be a list of level names"),
    ],
)
def test_single_mistakes_are_named(files, body, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(write(files, body))


def test_check_flag_prints_the_plan_and_refuses_bad_files(files):
    good = write(
        files,
        'model = "model.onnx"\ngallery = "parts.gallery"\nk_image = 3\nlevels = "s4, s8"\n'
        '[tcp]\nport = 0\n[source]\ntype = "folder"\npath = "incoming"\n',
    )
    r = CliRunner().invoke(main, ["line", str(good), "--check"])
    assert r.exit_code == 0 and '"tcp"' in r.output and "OK" in r.output
    assert load_config(good).scoring == {"k_image": 3, "levels": ("s4", "s8")}  # as --k-image 3 --levels s4,s8
    bad = files / "bad.toml"
    bad.write_text('model = "model.onnx"\n')
    r = CliRunner().invoke(main, ["line", str(bad), "--check"])
    assert r.exit_code == 1 and "gallery: required" in r.output


def _wait_for(log: Path, proc, pattern: str, timeout: float = 90.0) -> re.Match:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log.read_text(errors="replace")
        mt = re.search(pattern, text)
        if mt:
            return mt
        if proc.poll() is not None:
            raise AssertionError(f"process exited {proc.returncode}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} never appeared:\n{log.read_text()}")


def _ask(port: int, *cmds: str) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rwb")
        out = []
        for c in cmds:
            f.write(c.encode() + b"\r\n")
            f.flush()
            out.append(f.readline().decode().rstrip("\r\n"))
        return out


def _opcua_state(url: str) -> tuple[str, str]:
    import asyncio

    from asyncua import Client

    from spade_edge.line.opcua import NAMESPACE

    async def read():
        async with Client(url, timeout=30) as c:
            idx = await c.get_namespace_index(NAMESPACE)
            sm = await c.nodes.objects.get_child([f"{idx}:VisionSystem", f"{idx}:VisionStateMachine"])
            return tuple(
                [await (await sm.get_child(f"{idx}:{n}")).read_value() for n in ("CurrentState", "OperationalState")]
            )

    return asyncio.run(read())


def test_line_command_runs_the_adapters_of_a_file(files, assets):
    shutil.copy(assets["images"]["normal0.png"], files / "incoming" / "cam-0001.png")
    shutil.copy(assets["images"]["bright.png"], files / "incoming" / "cam-0002.png")
    cfg = write(
        files,
        'model = "model.onnx"\ngallery = "parts.gallery"\ndevice = "cpu"\nthreads = 1\n'
        '[source]\ntype = "folder"\npath = "incoming"\nsettle = 0.0\n'
        '[tcp]\nhost = "127.0.0.1"\nport = 0\n[modbus]\nhost = "127.0.0.1"\nport = 0\n'
        '[opcua]\nhost = "127.0.0.1"\nport = 0\n',
    )
    log = files / "line.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spade_edge", "line", str(cfg)], stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT
        )
    try:
        port = int(_wait_for(log, proc, r"tcp listening on tcp://127\.0\.0\.1:(\d+)").group(1))
        _wait_for(log, proc, r"modbus listening on modbus://127\.0\.0\.1:\d+")
        url = _wait_for(log, proc, r"opcua listening on (opc\.tcp://127\.0\.0\.1:\d+/spade-edge/)").group(1)
        _wait_for(log, proc, "spade-edge line: ready")
        assert _opcua_state(url) == ("Operational", "Ready")  # left Preoperational once the model loaded
        first, second, third = _ask(port, "TRIGGER", "TRIGGER", "TRIGGER")
        assert first.startswith("0,1,OK,") and second.startswith("0,2,NOT_OK,")  # oldest file first
        assert third.startswith("30,3,NOT_DECIDABLE,")  # the folder is empty now: no image
        assert sorted(p.name for p in (files / "incoming" / "done").iterdir()) == ["cam-0001.png", "cam-0002.png"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_serve_with_tcp_takes_uploaded_frames(assets, tmp_path):
    from ..service.conftest import ServerProcess

    srv = ServerProcess(assets["model"], assets["gallery_a"], tmp_path, "--tcp", "0")
    try:
        srv.wait_ready()
        port = int(_wait_for(srv.log, srv.proc, r"text protocol listening on tcp://127\.0\.0\.1:(\d+)").group(1))
        for name in ("normal1.png", "bright.png"):
            status, _, body = request(srv.url, "POST", f"/frames?name={name}", assets["images"][name].read_bytes())
            assert status == 202, body
        status, _, body = request(srv.url, "POST", "/frames", b"not an image")
        assert status == 415 and b"not" in body  # refused like POST /inspect refuses it, nothing queued
        ok, ng = _ask(port, "T", "T")
        assert ok.split(",")[2] == "OK" and ng.split(",")[2] == "NOT_OK"
    finally:
        srv.stop()


def test_every_listener_binds_loopback_unless_the_file_says_where(files):
    """Issue 17: `spade-edge line` bound every adapter to 0.0.0.0 by default, with reload open to
    anyone. Now 127.0.0.1 unless configured, and reload only from this machine by default."""
    cfg = load_config(
        write(
            files,
            'model = "model.onnx"\ngallery = "parts.gallery"\n'
            '[source]\ntype = "folder"\npath = "incoming"\n'
            "[http]\n[tcp]\n[modbus]\n[opcua]\n",
        )
    )
    assert {a: cfg.section(a)["host"] for a in cfg.adapters} == {
        a: "127.0.0.1" for a in ("http", "tcp", "modbus", "opcua")
    }
    assert cfg.section("tcp")["idle_timeout"] == 60.0
    from spade_edge.line.config import reload_settings

    assert reload_settings(cfg) == {"allow": "local", "dirs": (), "token": None}
    (files / "galleries").mkdir()
    cfg = load_config(
        write(
            files,
            'model = "model.onnx"\ngallery = "parts.gallery"\n[http]\nhost = "0.0.0.0"\n'
            '[reload]\nallow = "remote"\ndirs = ["galleries"]\ntoken = "0123456789abcdef"\n',
        )
    )
    assert cfg.section("http")["host"] == "0.0.0.0"
    assert reload_settings(cfg) == {"allow": "remote", "dirs": (str(files / "galleries"),), "token": "0123456789abcdef"}


@pytest.mark.parametrize(
    "body,needle",
    [
        ('[reload]\nallow = "yes"\n', "[reload] allow = 'yes': one of 'off', 'local', 'remote'"),
        ('[reload]\ndirs = ["nowhere"]\n', "[reload] dirs: 'nowhere': no such folder"),
        ('[reload]\ndirs = "galleries"\n', "[reload] dirs = 'galleries': must be list"),
        ('[reload]\ntoken = "short"\n', "[reload] token: at least 16 characters"),
        ('[tcp]\nidle_timeout = -1\n[source]\ntype = "fake"\n', "[tcp] idle_timeout = -1: seconds >= 0"),
    ],
)
def test_reload_and_idle_settings_are_checked(files, body, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(write(files, 'model = "model.onnx"\ngallery = "parts.gallery"\n[http]\nport = 0\n' + body))


def test_line_reloads_only_what_its_file_allows(files, assets):
    """A running `spade-edge line`: listeners on loopback by default; POST /reload needs the token,
    loads only files under [reload] dirs and answers the same for every other path; the text
    protocol's RELOAD is answered for a client on this machine."""
    import json

    (files / "galleries").mkdir()
    shutil.copy(assets["gallery_b"], files / "galleries" / "b.gallery")
    token = "line-3-reload-token"
    cfg = write(
        files,
        'model = "model.onnx"\ngallery = "parts.gallery"\ndevice = "cpu"\nthreads = 1\n'
        '[source]\ntype = "folder"\npath = "incoming"\n[http]\nport = 0\n[tcp]\nport = 0\n'
        f'[reload]\ndirs = ["galleries"]\ntoken = "{token}"\n',
    )
    log = files / "line.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spade_edge", "line", str(cfg)], stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT
        )
    try:
        url = _wait_for(log, proc, r"http listening on (http://127\.0\.0\.1:\d+)").group(1)
        port = int(_wait_for(log, proc, r"tcp listening on tcp://127\.0\.0\.1:(\d+)").group(1))
        _wait_for(log, proc, "spade-edge line: ready")
        auth = {"Authorization": f"Bearer {token}"}
        assert request(url, "POST", "/reload", b"{}")[0] == 401
        answers = {
            request(url, "POST", "/reload", json.dumps({"gallery": p}).encode(), auth)[2]
            for p in ("/etc/passwd", "/nonexistent.gallery", str(files / "parts.gallery"))
        }
        assert len(answers) == 1 and b"not a file this service may load" in answers.pop()
        status, _, body = request(
            url, "POST", "/reload", json.dumps({"gallery": str(files / "galleries" / "b.gallery")}).encode(), auth
        )
        assert status == 200 and json.loads(body)["generation"] == 2, body
        assert _ask(port, "RELOAD") == ["0,RELOADED,3"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
