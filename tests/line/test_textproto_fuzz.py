"""Raw-socket fuzzing of the TCP text protocol on loopback: random bytes, control characters,
valid and broken commands, over-long lines, all sent in random split writes. Asserted: exactly one
answer per line (an empty or blank line none, an over-long one a single ER), in order, no answer
line holding a line end, no connection dropped, no exception in the server. Seeded and bounded
in time and count; the counts are printed (``pytest -s``).

SPADE_EDGE_FUZZ_SEED and SPADE_EDGE_FUZZ_SECONDS change the seed and the time budget."""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import time

import pytest

from spade_edge.line.jobs import Code
from spade_edge.line.textproto import TextServer

SEED = int(os.environ.get("SPADE_EDGE_FUZZ_SEED", "17"))
SECONDS = float(os.environ.get("SPADE_EDGE_FUZZ_SECONDS", "15"))
MAX_LINES = 20_000
MAX_LINE = 256
SENTINEL = b"GET 987654321"  # answered 'ER,GET,22,no job 987654321...': a line no fuzz input can answer
_SENTINEL_ANSWER = f"ER,GET,{int(Code.UNKNOWN_JOB)},no job 987654321"
_COMMANDS = [
    b"PING",
    b"ping",
    b"STATUS",
    b"TA",
    b"TRIGGER ASYNC",
    b"T",
    b"SW8",
    b"GET 1",
    b"GET",
    b"GET abc",
    b"GET -5",
    b"GET 99999999999999999999",
    b"RELOAD",
    b"PING now",
    b"FLY",
    b"  status  ",
    b"\tPING\t",
    b"T1",
    b"trigger",
    b"TA x",
    b"STATUS\x1c",
    b"GE\x00T 1",
]
_CONTROL = bytes(c for c in range(32) if c not in (10, 13)) + b"\x7f"


def _line(rng: random.Random) -> bytes:
    """One line's bytes, without its end (it may still hold CR or LF when ``raw``)."""
    kind = rng.random()
    if kind < 0.30:
        return rng.choice(_COMMANDS)
    if kind < 0.50:  # control characters among letters
        return bytes(rng.choice(_CONTROL + b"PINGTA ") for _ in range(rng.randint(1, 12)))
    if kind < 0.70:  # any bytes: line ends inside make several lines
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
    if kind < 0.80:  # over-long, or right at the limit
        n = rng.choice([MAX_LINE, MAX_LINE + 1, rng.randint(MAX_LINE + 1, 5000)])
        return bytes([rng.choice(b"XYZ \t\x1c")]) * n
    if kind < 0.90:  # UTF-8 and Latin-1 text
        return rng.choice(["PİNG", "STATUS é", "T\u2028", "GET ٣", "ТА"]).encode(rng.choice(["utf-8", "utf-16-le"]))
    return b""  # an empty line


def _segments(stream: bytes) -> list[bytes]:
    """The lines the server cuts ``stream`` into (at CR or LF), the last one (unterminated) left out."""
    return re.split(rb"[\r\n]", stream)[:-1]


def _expected(stream: bytes) -> list[str | None]:
    """Per answered line: the exact answer when it is known (over-long lines), else None."""
    out = []
    for seg in _segments(stream):
        if len(seg) > MAX_LINE:
            out.append(f"ER,?,{int(Code.BAD_ARGUMENT)},line longer than {MAX_LINE} bytes")
        elif seg.strip(b" \t"):
            out.append(None)
    return out


def _quits(stream: bytes) -> bool:
    for seg in _segments(stream):
        try:
            words = seg.decode("ascii").split()
        except UnicodeDecodeError:
            continue
        if words and words[0].upper() == "QUIT" and len(seg) <= MAX_LINE:
            return True
    return False


class Conn:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send_split(self, data: bytes, rng: random.Random) -> int:
        """Send ``data`` in 1 to 8 writes cut at random places; the number of writes."""
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 7)))) if len(data) > 1 else []
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        for p in pieces:
            self.sock.sendall(p)
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.004)
        return len(pieces)

    def line(self) -> str:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "the server dropped the connection"
            self.buf += chunk
        out, self.buf = self.buf.split(b"\r\n", 1)
        text = out.decode("utf-8")
        assert "\r" not in text and "\n" not in text
        return text


@pytest.fixture
def server(line):
    srv = TextServer(line, host="127.0.0.1", port=0, reload="off", idle_timeout=30).start()
    yield srv
    srv.stop()


def test_fuzzed_lines_get_exactly_one_answer_each(server, caplog):
    rng = random.Random(SEED)
    counts = {
        "connections": 0,
        "batches": 0,
        "lines": 0,
        "answers": 0,
        "bytes": 0,
        "writes": 0,
        "over_long": 0,
        "dropped": 0,
        "crashes": 0,
    }
    end = time.monotonic() + SECONDS
    caplog.set_level(logging.ERROR, logger="spade_edge.line")
    while time.monotonic() < end and counts["lines"] < MAX_LINES:
        conn = Conn(server.port)
        counts["connections"] += 1
        for _ in range(rng.randint(5, 30)):
            if time.monotonic() >= end:
                break
            while True:
                lines = [_line(rng) for _ in range(rng.randint(1, 25))]
                stream = b"".join(ln + rng.choice([b"\r\n", b"\n", b"\r"]) for ln in lines)
                if not _quits(stream):
                    break
            expected = _expected(stream)
            counts["writes"] += conn.send_split(stream + SENTINEL + b"\r\n", rng)
            got = [conn.line() for _ in range(len(expected) + 1)]
            assert got[-1].startswith(_SENTINEL_ANSWER), (
                SEED,
                stream[:300],
                got,
            )  # in step: nothing more, nothing less
            for want, answer in zip(expected, got):
                if want is not None:
                    assert answer == want, (SEED, stream[:300], got)
                else:
                    assert re.match(r"^(ER,[A-Z0-9?]{1,16},\d+,|\d+,)", answer), answer
            counts["batches"] += 1
            counts["lines"] += len(_segments(stream)) + 1
            counts["answers"] += len(got)
            counts["bytes"] += len(stream)
            counts["over_long"] += sum(1 for w in expected if w is not None)
        conn.sock.sendall(b"PING\r\n")
        try:
            assert conn.line() == "0,PONG"  # the connection is still there
        except (AssertionError, OSError):
            counts["dropped"] += 1
            raise
        conn.sock.settimeout(0.2)
        try:  # and nothing more is waiting
            extra = conn.sock.recv(100)
        except TimeoutError:
            extra = None
        assert extra is None and not conn.buf, (extra, conn.buf)
        conn.sock.close()
    counts["crashes"] = sum(1 for r in caplog.records if r.levelno >= logging.ERROR)
    print(
        f"\ntext protocol fuzz (seed {SEED}, {SECONDS:.0f} s budget): {counts['lines']} lines tried "
        f"({counts['bytes']} bytes in {counts['writes']} writes, {counts['over_long']} over-long) over "
        f"{counts['connections']} connections; {counts['answers']} answers, {counts['dropped']} connections dropped, "
        f"{counts['crashes']} server exceptions"
    )
    assert counts["crashes"] == 0, [r.getMessage() for r in caplog.records]
    assert counts["lines"] >= 200 and counts["dropped"] == 0
