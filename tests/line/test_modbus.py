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


# --- function codes outside the register map (issue 17) ---------------------------------------------
def raw_request(port: int, pdu: bytes, tid: int = 0x1234, unit: int = 1, timeout: float = 5.0) -> bytes:
    """One Modbus TCP request as raw bytes (MBAP header + ``pdu``); the reply's PDU."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
        head = b""
        while len(head) < 7:
            chunk = s.recv(7 - len(head))
            assert chunk, "connection closed without an answer"
            head += chunk
        rtid, proto, length, runit = struct.unpack(">HHHB", head)
        assert (rtid, proto, runit) == (tid, 0, unit)
        body = b""
        while len(body) < length - 1:
            chunk = s.recv(length - 1 - len(body))
            assert chunk, "connection closed in the middle of an answer"
            body += chunk
        return body


def test_undocumented_function_codes_answer_illegal_function_and_start_nothing(adapter, client_for, line):
    """FC01/02/04/05/15/22/23 and the diagnostics are not in the register map: exception 01 with
    function byte code + 0x80. Before: FC05 started a job, FC01/02/04 read the holding registers."""
    c = client_for(adapter)
    calls = {
        0x01: lambda: c.read_coils(0, count=8, device_id=1),
        0x02: lambda: c.read_discrete_inputs(0, count=8, device_id=1),
        0x04: lambda: c.read_input_registers(0, count=mb.REGISTERS, device_id=1),
        0x05: lambda: c.write_coil(0, True, device_id=1),  # bit 0 of CONTROL would be TRIGGER
        0x0F: lambda: c.write_coils(0, [True, False, True], device_id=1),
        0x16: lambda: c.mask_write_register(address=0, and_mask=0xFFFF, or_mask=mb.TRIGGER, device_id=1),
        0x17: lambda: c.readwrite_registers(
            read_address=0, read_count=2, write_address=0, values=[mb.TRIGGER], device_id=1
        ),
        0x07: lambda: c.read_exception_status(device_id=1),
        0x08: lambda: c.diag_query_data(b"\x12\x34", device_id=1),
        0x11: lambda: c.report_device_id(device_id=1),
        0x2B: lambda: c.read_device_information(device_id=1),
    }
    for fc, call in calls.items():
        rr = call()
        assert rr.isError(), f"FC{fc:02X} answered {rr}"
        assert (rr.function_code, rr.exception_code) == (fc | 0x80, 1), f"FC{fc:02X}: {rr}"
    time.sleep(0.2)  # a job started by a coil write would be running or done by now
    r = regs(c)
    assert r[mb.CONTROL] == 0 and not r[mb.STATUS] & (mb.BUSY | mb.RESULT_VALID) and r[mb.JOB] == 0
    assert line.done_count == 0 and line.running == 0
    assert handshake(c)[mb.VERDICT] == 1  # and the documented codes still work


def test_unknown_function_code_exception_carries_the_code_plus_0x80(adapter):
    """Before: an unknown code got an exception with function byte 0x80 (code 0)."""
    for fc in (0x00, 0x09, 0x41, 0x64, 0x7F, 0x83, 0xC1):  # (0x80 and up: not a request code at all)
        assert raw_request(adapter.port, bytes([fc]) + b"\x00\x01", tid=fc) == bytes([fc | 0x80, 0x01]), hex(fc)
    # a documented code whose request is cut short: 03 (illegal data value), with its own code
    assert raw_request(adapter.port, b"\x03\x00") == b"\x83\x03"
    assert raw_request(adapter.port, b"\x06\x00\x00") == b"\x86\x03"
    # a documented request, raw: the map's 10 registers
    body = raw_request(adapter.port, b"\x03\x00\x00\x00\x0a")
    assert body[:2] == b"\x03\x14" and len(body) == 22


def test_every_documented_error_through_pymodbus(adapter, client_for):
    """docs/line.md's Modbus errors, each through pymodbus's client, the server serving on."""
    c = client_for(adapter)
    cases = [
        (lambda: c.write_register(mb.STATUS, 1, device_id=1), 2),  # read-only register
        (lambda: c.write_register(mb.REJECTED, 1, device_id=1), 2),
        (lambda: c.write_register(mb.REGISTERS, 1, device_id=1), 2),  # past the map
        (lambda: c.write_registers(mb.CONTROL, [0, 0], device_id=1), 2),  # reaches STATUS
        (lambda: c.read_holding_registers(mb.REGISTERS - 1, count=2, device_id=1), 2),  # spills past 9
        (lambda: c.write_register(mb.CONTROL, 8, device_id=1), 3),  # undefined CONTROL bit
        (lambda: c.write_registers(mb.CONTROL, [0x100], device_id=1), 3),
    ]
    for call, code in cases:
        rr = call()
        assert rr.isError() and rr.exception_code == code, rr
    # what pymodbus's client will not send, raw: counts over Modbus's limits (125 read, 123 written)
    assert raw_request(adapter.port, b"\x03\x00\x00\x00\x7e") == b"\x83\x03"
    assert raw_request(adapter.port, b"\x03\x00\x00\x00\x00") == b"\x83\x03"
    assert raw_request(adapter.port, b"\x10\x00\x00\x00\x7c\xf8" + bytes(248)) == b"\x90\x03"
    assert regs(c)[mb.REJECTED] == 0
    assert handshake(c)[mb.VERDICT] == 1


def test_a_set_device_id_answers_only_its_own_unit(line, client_for):
    a = mb.ModbusAdapter(line, port=0, device_id=7).start()
    try:
        c = client_for(a)
        assert not c.read_holding_registers(0, count=mb.REGISTERS, device_id=7).isError()
        rr = c.read_holding_registers(0, count=mb.REGISTERS, device_id=8)
        assert rr.isError() and rr.exception_code == 0x0B  # gateway target failed to respond
        rr = c.write_coil(0, True, device_id=7)
        assert rr.isError() and rr.exception_code == 1
    finally:
        a.stop()
