"""The TCP text protocol driven by a raw socket on loopback."""

from __future__ import annotations

import socket
import time

import pytest

from spade_edge.line.jobs import Code
from spade_edge.line.textproto import TextServer, check_format


class Client:
    def __init__(self, port: int, eol: bytes = b"\r\n"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.eol, self.buf = eol, b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "server closed the connection"
            self.buf += chunk
        out, self.buf = self.buf.split(b"\r\n", 1)
        return out.decode()

    def ask(self, cmd: str) -> str:
        self.send(cmd.encode() + self.eol)
        return self.line()

    def close(self):
        self.sock.close()


@pytest.fixture
def server(line):
    srv = TextServer(line, port=0).start()
    yield srv
    srv.stop()


def test_200_synchronous_triggers_give_200_distinct_results_in_order(server, line):
    c = Client(server.port)
    jobs, verdicts = [], []
    for _ in range(200):
        code, job, verdict, score = c.ask("TRIGGER").split(",")
        assert code == "0" and float(score) > 0
        jobs.append(int(job))
        verdicts.append(verdict)
    assert jobs == list(range(jobs[0], jobs[0] + 200))  # none lost, none twice, in order
    # the fake camera cycles 4 normal images and 1 bright one: the bright ones are the NOT_OK ones
    assert verdicts == (["OK"] * 4 + ["NOT_OK"]) * 40
    assert line.source.grabs == 200
    c.close()
    from ..service.conftest import parse_metrics

    metrics = parse_metrics(line.service.registry.render())  # the service's own metrics count line jobs
    assert metrics['spade_edge_line_jobs_total{outcome="ok"}'] == 160
    assert metrics['spade_edge_line_jobs_total{outcome="not_ok"}'] == 40
    assert metrics["spade_edge_line_job_latency_seconds_count"] == 200


def test_async_trigger_then_get_and_pipelined_commands(server):
    c = Client(server.port, eol=b"\r")  # CR only, as Keyence-style controllers send
    ids = []
    c.send(b"TA\rTA\nTRIGGER ASYNC\r\n")  # three commands in one segment
    for _ in range(3):
        code, job = c.line().split(",")
        assert code == "0"
        ids.append(int(job))
    assert len(set(ids)) == 3
    results = {}
    end = time.monotonic() + 30
    while len(results) < 3 and time.monotonic() < end:
        for j in ids:
            ans = c.ask(f"GET {j}")
            if ans != f"{int(Code.PENDING)},{j},PENDING":
                results[j] = ans
        time.sleep(0.02)
    assert sorted(results) == sorted(ids)
    for j, ans in results.items():
        code, job, verdict, _ = ans.split(",")
        assert (code, int(job), verdict) == ("0", j, "OK")
    c.close()


def test_malformed_commands_get_error_codes_and_the_server_keeps_serving(server):
    c = Client(server.port)
    assert c.ask("FROBNICATE").startswith(f"ER,FROBNICATE,{int(Code.UNKNOWN_COMMAND)},")
    assert c.ask("GET").startswith(f"ER,GET,{int(Code.BAD_ARGUMENT)},")
    assert c.ask("GET abc").startswith(f"ER,GET,{int(Code.BAD_ARGUMENT)},")
    assert c.ask("GET 999999").startswith(f"ER,GET,{int(Code.UNKNOWN_JOB)},")
    assert c.ask("PING now").startswith(f"ER,PING,{int(Code.BAD_ARGUMENT)},")
    c.send(b"\xff\xfe\x00garbage\r\n")
    assert c.line().startswith(f"ER,?,{int(Code.UNKNOWN_COMMAND)},")
    c.send(b"X" * 5000 + b"\r\n")  # over-long: one error, the rest of the line is skipped
    assert c.line().startswith(f"ER,?,{int(Code.BAD_ARGUMENT)},line longer than")
    assert c.ask("ping") == "0,PONG"  # commands are case-insensitive; the connection still works
    assert c.ask("TRIGGER").startswith("0,")
    status = c.ask("STATUS").split(",")
    assert status[0] == "0" and status[1] == "READY"
    c.close()
    other = Client(server.port)  # and new connections too
    assert other.ask("PING") == "0,PONG"
    other.close()


def test_busy_when_the_queue_is_full_and_no_image_when_the_camera_fails(service, frames):
    from spade_edge.line import Line
    from spade_edge.line.sources import FakeSource

    slow = Line(service, FakeSource(frames, delay=0.5), deadline=20)
    srv = TextServer(slow, port=0).start()
    try:
        c = Client(srv.port)
        answers = [c.ask("TA") for _ in range(service.config.queue_size + 2)]
        busy = [a for a in answers if a.startswith("ER,TA,")]
        assert len(busy) == 2 and all(a.split(",")[2] == str(int(Code.BUSY)) for a in busy)
        for a in answers:  # the admitted ones all finish, with a verdict
            if a.startswith("0,"):
                assert slow.wait(int(a.split(",")[1])).code == Code.OK
        c.close()
    finally:
        srv.stop()
    broken = Line(service, FakeSource(frames, fail=lambda n: n == 2), deadline=20)
    srv = TextServer(broken, port=0).start()
    try:
        c = Client(srv.port)
        assert c.ask("T").split(",")[0] == "0"
        code, job, verdict, score = c.ask("T").split(",")
        assert (code, verdict, score) == (str(int(Code.NO_IMAGE)), "NOT_DECIDABLE", "nan")
        assert c.ask("T").split(",")[0] == "0"  # the next trigger works again
        c.close()
    finally:
        srv.stop()


def test_result_format_is_configurable_and_checked(line):
    srv = TextServer(line, port=0, result_format="{judgement};{job};{score:.3f};{threshold:.3f}").start()
    try:
        c = Client(srv.port)
        judgement, job, score, thr = c.ask("T").split(";")
        assert judgement == "OK" and float(score) < float(thr)
        c.close()
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="fields: code, job"):
        check_format("{verdict},{nonsense}")


def test_reload_answers_the_new_generation(server):
    c = Client(server.port)
    assert c.ask("RELOAD") == "0,RELOADED,2"
    assert c.ask("STATUS").split(",")[-1] == "2"
    c.send(b"QUIT\r\n")
    assert c.sock.recv(100) == b""  # QUIT closes the connection without an answer
    c.close()


def test_a_bad_camera_image_is_a_job_outcome_not_a_crash(service, frames):
    from spade_edge.line import Line
    from spade_edge.line.sources import FakeSource

    line = Line(service, FakeSource([b"\x89PNG\r\n\x1a\n broken", b"not an image at all", frames[0]]))
    srv = TextServer(line, port=0).start()
    try:
        c = Client(srv.port)
        answers = [c.ask("T").split(",") for _ in range(3)]
        assert [a[0] for a in answers] == [str(int(Code.BAD_IMAGE))] * 2 + ["0"]
        assert [a[2] for a in answers] == ["NOT_DECIDABLE", "NOT_DECIDABLE", "OK"]
        c.close()
    finally:
        srv.stop()


def test_connections_beyond_the_cap_are_told_and_closed(line):
    srv = TextServer(line, port=0, max_connections=2).start()
    try:
        a, b = Client(srv.port), Client(srv.port)
        assert a.ask("PING") == "0,PONG" and b.ask("PING") == "0,PONG"
        c = Client(srv.port)
        assert c.line() == f"ER,?,{int(Code.BUSY)},2 connections open"
        assert c.sock.recv(10) == b""
        c.close()
        a.close()
        end = time.monotonic() + 5
        while True:  # a slot frees once the closed connection's thread ends
            d = Client(srv.port)
            d.send(b"PING\r\n")
            answer = d.line()
            d.close()
            if answer == "0,PONG" or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert answer == "0,PONG"
        assert b.ask("TRIGGER").startswith("0,")
        b.close()
    finally:
        srv.stop()


def test_idle_connections_are_closed_so_they_cannot_lock_the_plcs_out(line):
    """Issue 17: no idle timeout, so 32 idle connections locked every PLC out for good. Now a
    connection without a byte for idle_timeout seconds is closed and its slot freed."""
    srv = TextServer(line, port=0, max_connections=2, idle_timeout=0.5).start()
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        time.sleep(0.1)
        late = Client(srv.port)
        assert late.line() == f"ER,?,{int(Code.BUSY)},2 connections open"  # the cap still holds meanwhile
        late.close()
        t0 = time.monotonic()
        for s in idle:
            assert s.recv(10) == b""  # closed by the server
        assert 0.3 < time.monotonic() - t0 < 3
        busy = Client(srv.port)
        for _ in range(4):  # a connection in use is never idle: commands 0.3 s apart keep it
            assert busy.ask("PING") == "0,PONG"
            time.sleep(0.3)
        plc = Client(srv.port)
        assert plc.ask("TRIGGER").startswith("0,")
        plc.close()
        busy.close()
    finally:
        srv.stop()


def test_control_characters_and_split_overlong_lines_get_exactly_one_answer(server):
    """Issue 17: a line holding \\x1c-\\x1f (line breaks to str.splitlines, separators to str.split)
    raised IndexError and dropped the connection without an answer; an over-long line got 2 to 5
    ER answers depending on how it was split, putting the PLC out of step."""
    c = Client(server.port)
    for raw in (b"\x1c", b"\x1d\x1e", b"\x1f", b"\x0b", b"\x0c", b" \x1c \t"):
        c.send(raw + b"\r\n")
        assert c.line().startswith(f"ER,?,{int(Code.UNKNOWN_COMMAND)},empty command"), raw
    c.send(b"PING\x1c\r\n")  # a separator after the command
    assert c.line() == "0,PONG"
    for pieces in ([b"X" * 5000], [b"Y" * 1000] * 5, [b"Z" * 200] * 3, [b"W" * 300, b"W" * 4000]):
        for p in pieces:  # each piece its own segment
            c.send(p)
            time.sleep(0.05)
        c.send(b"\r\nPING\r\n")
        assert c.line() == f"ER,?,{int(Code.BAD_ARGUMENT)},line longer than 256 bytes"
        assert c.line() == "0,PONG"  # the next answer is the PING's: one answer for the long line
    c.send(b"A" * 300 + b"\r\nPING\r\n")  # over-long, with its end in the same segment
    assert c.line().startswith(f"ER,?,{int(Code.BAD_ARGUMENT)},line longer")
    assert c.line() == "0,PONG"
    c.close()


def test_a_client_that_half_closes_gets_its_answers_then_the_server_closes(server):
    """`printf 'TRIGGER\\r\\n' | nc -N host 2000`: the client sends its line and EOF; it gets its
    answer, then EOF, so the one-liner ends. A last line without a line end is answered too."""
    for payload, want in ((b"TRIGGER\r\n", "0,"), (b"PING", "0,PONG"), (b"PING\r\nSTATUS", "0,READY")):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(4096):
                got += chunk
        lines = got.decode().split("\r\n")
        assert lines[-1] == "" and lines[-2].startswith(want), (payload, got)


def test_the_readme_one_liner_ends(server):
    """The README's netcat line must return with the answer (netcat-openbsd without -N never did:
    it keeps the connection open after its input ends)."""
    import re
    import shutil
    import subprocess

    from ..service.conftest import ROOT

    if shutil.which("nc") is None:
        pytest.skip("nc (netcat-openbsd) not installed: the README's one-liner was not run")
    readme = (ROOT / "README.md").read_text()
    cmd = re.search(r"^\$ (printf 'TRIGGER\\r\\n' \| nc .*)$", readme, re.MULTILINE).group(1)
    cmd = cmd.replace("jetson", "127.0.0.1").replace(" 2000", f" {server.port}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=20, check=False)
    assert r.returncode == 0 and re.fullmatch(r"0,\d+,(OK|NOT_OK),[0-9.]+\s*", r.stdout), (cmd, r)


def test_an_image_name_cannot_forge_a_result_line(service, frames):
    """Issue 17: POST /frames?name=part1.png%0D%0AOK,0.000,forged.png made TRIGGER answer a second,
    forged line. Fields of an answer cannot hold line ends, control characters or commas."""
    import io

    from PIL import Image

    from spade_edge.line import Line
    from spade_edge.line.sources import UploadSource

    src = UploadSource()
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="PNG")
    src.put(buf.getvalue(), "part1.png\r\nOK,0.000,forged.png")
    srv = TextServer(Line(service, src, deadline=20), port=0, result_format="{code},{job},{verdict},{image}").start()
    try:
        c = Client(srv.port)
        answer = c.ask("T")
        assert answer.startswith("0,") and answer.endswith("part1.png??OK;0.000;forged.png")
        assert c.ask("PING") == "0,PONG"  # nothing else was waiting
        c.close()
    finally:
        srv.stop()


def test_reload_is_refused_unless_allowed_for_the_client(line):
    srv = TextServer(line, port=0, reload="off").start()
    try:
        c = Client(srv.port)
        assert c.ask("RELOAD").startswith(f"ER,RELOAD,{int(Code.RELOAD_FAILED)},reload is not allowed")
        assert c.ask("STATUS").split(",")[-1] == "1"  # nothing was reloaded
        c.close()
    finally:
        srv.stop()
    assert srv.answer(b"RELOAD", local=False).startswith("ER,RELOAD,")  # 'remote' is needed from another host
    with pytest.raises(ValueError, match="reload must be one of"):
        TextServer(line, port=0, reload="yes")
