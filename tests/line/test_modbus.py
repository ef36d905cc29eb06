"""The Modbus TCP handshake driven by pymodbus's own client on loopback."""
from __future__ import annotations

import struct
import time

import pytest

pytest.importorskip("pymodbus", reason="the line extra (pymodbus) is not installed")

from spade_edge.line import modbus as mb  # noqa: E402
from spade_edge.line.jobs import Code  # noqa: E402


@pytest.fixture
def client_for():
    from pymodbus.client import ModbusTcpClient

    made = []

    def connect(adapter):
        c = ModbusTcpClient("127.0.0.1", port=adapter.port, timeout=10)
        assert c.connect()
        made.append(c)
        return c

    yield connect
    for c in made:
        c.close()


@pytest.fixture
def adapter(line):
    a = mb.ModbusAdapter(line, port=0, ack_timeout=30).start()
    yield a
    a.stop()


def regs(c) -> list[int]:
    rr = c.read_holding_registers(0, count=mb.REGISTERS, device_id=1)
    assert not rr.isError(), rr
    return rr.registers


def wait_status(c, bit: int, on: bool = True, timeout: float = 20.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = regs(c)
        if bool(r[mb.STATUS] & bit) == on:
            return r
        time.sleep(0.005)
    raise AssertionError(f"status bit {bit} did not become {on}: {regs(c)}")


def handshake(c) -> list[int]:
    """One job the way a PLC runs it; returns the registers read at RESULT_VALID."""
    wait_status(c, mb.READY)
    assert not c.write_register(mb.CONTROL, mb.TRIGGER, device_id=1).isError()
    r = wait_status(c, mb.RESULT_VALID)
    assert not r[mb.STATUS] & mb.BUSY
    assert not c.write_register(mb.CONTROL, mb.TRIGGER | mb.ACK, device_id=1).isError()
    wait_status(c, mb.RESULT_VALID, on=False)
    assert not c.write_register(mb.CONTROL, 0, device_id=1).isError()
    return r


def test_200_handshakes_in_a_row_no_result_lost_or_doubled(adapter, client_for):
    c = client_for(adapter)
    seen = [handshake(c) for _ in range(200)]
    jobs = [r[mb.JOB] for r in seen]
    assert jobs == list(range(jobs[0], jobs[0] + 200))
    assert [r[mb.VERDICT] for r in seen] == ([1] * 4 + [2]) * 40  # 4 normal parts, then the bright one
    for r in seen:
        score = struct.unpack(">f", struct.pack(">HH", r[mb.SCORE_F32], r[mb.SCORE_F32 + 1]))[0]
        assert r[mb.SCORE_X1000] == min(65535, round(score * 1000))
        assert (score > r[mb.THRESHOLD_X1000] / 1000 - 1e-3) == (r[mb.VERDICT] == 2)
        assert r[mb.CODE] == 0 and not r[mb.STATUS] & (mb.TRIGGER_ERROR | mb.JOB_ERROR)
    assert regs(c)[mb.REJECTED] == 0


def test_trigger_while_busy_raises_trigger_error_not_a_silent_drop(service, frames, client_for):
    from spade_edge.line import Line
    from spade_edge.line.sources import FakeSource

    a = mb.ModbusAdapter(Line(service, FakeSource(frames, delay=0.6), deadline=20), port=0).start()
    try:
        c = client_for(a)
        c.write_register(mb.CONTROL, mb.TRIGGER, device_id=1)
        assert regs(c)[mb.STATUS] & mb.BUSY
        c.write_register(mb.CONTROL, 0, device_id=1)
        c.write_register(mb.CONTROL, mb.TRIGGER, device_id=1)  # a second trigger while busy
        r = regs(c)
        assert r[mb.STATUS] & mb.TRIGGER_ERROR and r[mb.CODE] == Code.BUSY and r[mb.REJECTED] == 1
        r = wait_status(c, mb.RESULT_VALID)  # the first job still completes
        assert r[mb.VERDICT] == 1 and r[mb.STATUS] & mb.TRIGGER_ERROR  # the error stays until RESET
        c.write_register(mb.CONTROL, 0, device_id=1)
        c.write_register(mb.CONTROL, mb.TRIGGER, device_id=1)  # before the ACK: refused too
        assert regs(c)[mb.REJECTED] == 2
        c.write_register(mb.CONTROL, mb.TRIGGER | mb.ACK, device_id=1)
        wait_status(c, mb.RESULT_VALID, on=False)
        c.write_register(mb.CONTROL, mb.RESET, device_id=1)
        r = regs(c)
        assert not r[mb.STATUS] & mb.TRIGGER_ERROR and r[mb.CODE] == 0 and r[mb.STATUS] & mb.READY
        c.write_register(mb.CONTROL, 0, device_id=1)
        assert handshake(c)[mb.VERDICT] == 1
    finally:
        a.stop()


def test_unacknowledged_result_is_withdrawn_after_the_timeout(line, client_for):
    a = mb.ModbusAdapter(line, port=0, ack_timeout=0.3).start()
    try:
        c = client_for(a)
        c.write_register(mb.CONTROL, mb.TRIGGER, device_id=1)
        r = wait_status(c, mb.RESULT_VALID)
        job = r[mb.JOB]
        r = wait_status(c, mb.ACK_TIMEOUT, timeout=5)
        assert not r[mb.STATUS] & mb.RESULT_VALID and r[mb.STATUS] & mb.READY
        c.write_register(mb.CONTROL, mb.RESET, device_id=1)
        assert not regs(c)[mb.STATUS] & mb.ACK_TIMEOUT
        c.write_register(mb.CONTROL, 0, device_id=1)
        assert handshake(c)[mb.JOB] == job + 1
    finally:
        a.stop()


def test_malformed_writes_get_modbus_exceptions_and_the_server_keeps_serving(adapter, client_for):
    c = client_for(adapter)
    rr = c.write_register(mb.STATUS, 0xFFFF, device_id=1)  # a read-only register
    assert rr.isError() and rr.exception_code == 2
    rr = c.write_register(mb.CONTROL, 0x80, device_id=1)  # an undefined control bit
    assert rr.isError() and rr.exception_code == 3
    rr = c.write_registers(mb.CONTROL, [mb.TRIGGER, 0], device_id=1)  # spills into STATUS
    assert rr.isError() and rr.exception_code == 2
    rr = c.read_holding_registers(50, count=2, device_id=1)  # outside the map
    assert rr.isError() and rr.exception_code == 2
    r = regs(c)
    assert r[mb.CONTROL] == 0 and not r[mb.STATUS] & mb.BUSY  # nothing was triggered by the bad writes
    assert handshake(c)[mb.VERDICT] == 1
