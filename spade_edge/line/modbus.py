"""Modbus TCP server with the classic PLC handshake (pymodbus; extra ``line``).

Holding registers (0-based; "4x0001" is address 0). The PLC writes only CONTROL; the rest is
read-only and a write there is refused with exception 02 (illegal address), an undefined
CONTROL bit with 03 (illegal value). Only the function codes of holding registers are answered
(:data:`FUNCTION_CODES`: 03 read, 06 write one, 16 write several); every other code, coils and
diagnostics included, gets exception 01 (illegal function) with function byte code + 0x80, and a
request too short or with a count past Modbus's limits 03. With ``device_id`` set, another unit
id gets 0x0B (gateway target failed to respond).

    0  CONTROL          bit0 TRIGGER, bit1 ACK, bit2 RESET (acted on at their rising edge)
    1  STATUS           bit0 READY, bit1 BUSY, bit2 RESULT_VALID, bit3 TRIGGER_ERROR,
                        bit4 JOB_ERROR, bit5 ACK_TIMEOUT
    2  VERDICT          0 none, 1 OK, 2 NOT_OK, 3 NOT_DECIDABLE
    3  SCORE_X1000      score x 1000, rounded, saturating at 65535
    4  JOB              job number of the result (low 16 bits)
    5  CODE             status code of the last result or refusal (:class:`~.jobs.Code`)
    6  THRESHOLD_X1000  the gallery's image threshold x 1000
    7-8 SCORE_F32       the score as IEEE-754 float32, high word first
    9  REJECTED         triggers refused so far (wraps at 65536)

Handshake: the PLC sets TRIGGER; the device sets BUSY (READY drops) and grabs an image from the
configured source (Modbus carries none); with the result it writes VERDICT...SCORE_F32, sets
RESULT_VALID and clears BUSY. The PLC reads, sets ACK; the device clears RESULT_VALID. The PLC
clears TRIGGER and ACK. A TRIGGER while BUSY or before the ACK sets TRIGGER_ERROR (CODE 10) and
is counted in REJECTED, never dropped silently; RESET clears the error bits. A result not
acknowledged within ``ack_timeout`` seconds is withdrawn (RESULT_VALID drops, ACK_TIMEOUT set).
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
from typing import TYPE_CHECKING

from ..runtime.errors import require
from .jobs import Code, JobResult, Line, LineError
from .loop import LoopThread

if TYPE_CHECKING:
    from pymodbus.server import ModbusTcpServer

log = logging.getLogger("spade_edge.line")

CONTROL, STATUS, VERDICT, SCORE_X1000, JOB, CODE, THRESHOLD_X1000, SCORE_F32, REJECTED = 0, 1, 2, 3, 4, 5, 6, 7, 9
REGISTERS = 10
TRIGGER, ACK, RESET = 1, 2, 4
READY, BUSY, RESULT_VALID, TRIGGER_ERROR, JOB_ERROR, ACK_TIMEOUT = 1, 2, 4, 8, 16, 32
VERDICT_CODES = {"OK": 1, "NOT_OK": 2, "NOT_DECIDABLE": 3}
# the function codes the register map documents; anything else answers exception 01
FUNCTION_CODES = {0x03: "read holding registers", 0x06: "write single register", 0x10: "write multiple registers"}
ILLEGAL_FUNCTION, ILLEGAL_VALUE = 0x01, 0x03


def _x1000(v: float | None) -> int:
    return 0 if v is None or v != v else max(0, min(65535, round(v * 1000)))


@functools.cache
def _pymodbus_parts():
    """The decoder that admits only :data:`FUNCTION_CODES` (defined here so that importing this
    module never imports pymodbus).

    pymodbus's own decoder knows every public function code, and its simulator maps coils, discrete
    inputs and input registers onto the same shared block as the holding registers: FC05 would
    write CONTROL's TRIGGER bit. A code it does not know makes it answer an exception with
    function byte 0x80, the code lost. Here every request decodes to something that answers with
    its own code: a documented one as pymodbus decodes it, else an exception request."""
    from pymodbus.exceptions import NoSuchIdException
    from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

    class Refused(ModbusPDU):
        """A request answered with ``exception`` whatever the registers say."""

        def __init__(self, function_code: int, exception: int):
            super().__init__()
            self.function_code, self.exception = function_code, exception

        def encode(self) -> bytes:
            return b""

        def decode(self, data: bytes) -> None:
            pass

        async def datastore_update(self, context, device_id: int):
            if device_id not in context.device_ids() and 0 not in context.device_ids():
                raise NoSuchIdException(f"device id {device_id}")  # answered 0x0B by pymodbus
            return ExceptionResponse(self.function_code, self.exception)

    class RegisterMapDecoder(DecodePDU):
        def decode(self, frame: bytes):
            if not frame:
                return None
            fc = frame[0]
            if fc not in FUNCTION_CODES:
                return Refused(fc & 0x7F, ILLEGAL_FUNCTION)
            pdu = super().decode(frame)  # None: too short, or a count past Modbus's limits
            return Refused(fc, ILLEGAL_VALUE) if pdu is None else pdu

    class Units:
        """pymodbus's simulator context, with an unknown unit id refused as pymodbus's own
        context refuses it (the simulator raises KeyError, answered 04 server failure)."""

        def __init__(self, core):
            self.core = core

        def device_ids(self) -> list[int]:
            return self.core.device_ids()

        def _check(self, device_id: int) -> None:
            ids = self.core.device_ids()
            if device_id not in ids and 0 not in ids:
                raise NoSuchIdException(f"device id {device_id}")

        async def async_getValues(self, device_id, *args, **kwargs):
            self._check(device_id)
            return await self.core.async_getValues(device_id, *args, **kwargs)

        async def async_setValues(self, device_id, *args, **kwargs):
            self._check(device_id)
            return await self.core.async_setValues(device_id, *args, **kwargs)

    return RegisterMapDecoder, Units


class ModbusAdapter:
    """The register map above on ``(host, port)``; ``device_id`` 0 answers every unit id."""

    def __init__(
        self, line: Line, host: str = "127.0.0.1", port: int = 502, device_id: int = 0, ack_timeout: float = 10.0
    ):
        require("pymodbus", "line", "The Modbus adapter")
        self.line, self.host, self.port, self.device_id = line, host, int(port), int(device_id)
        self.ack_timeout = float(ack_timeout)
        self.regs = [0] * REGISTERS
        self._lock = threading.RLock()
        self._job: int | None = None
        self._ack_timer: threading.Timer | None = None
        self._loop = LoopThread("line-modbus")
        self._server: ModbusTcpServer | None = None

    # --- the handshake (under the lock; called from pymodbus's loop and from job threads) ---------
    def _status(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        self.regs[STATUS] = (self.regs[STATUS] | set_bits) & ~clear_bits

    def _refresh_ready(self) -> None:
        ready = self.line.service.ready and not self.line.halted and not self.regs[STATUS] & (BUSY | RESULT_VALID)
        self._status(READY if ready else 0, 0 if ready else READY)

    def write_control(self, value: int) -> None:
        with self._lock:
            rising = value & ~self.regs[CONTROL]
            self.regs[CONTROL] = value
            if rising & RESET:
                self._status(clear_bits=TRIGGER_ERROR | JOB_ERROR | ACK_TIMEOUT)
                self.regs[CODE] = int(Code.OK)
            if rising & ACK and self.regs[STATUS] & RESULT_VALID:
                self._withdraw()
            if rising & TRIGGER:
                self._trigger()
            self._refresh_ready()

    def _trigger(self) -> None:
        if self.regs[STATUS] & (BUSY | RESULT_VALID):
            return self._reject(Code.BUSY, "busy" if self.regs[STATUS] & BUSY else "result not acknowledged")
        try:
            job = self.line.trigger()
        except LineError as e:
            return self._reject(e.code, e.message)
        self._job = job
        self._status(BUSY, JOB_ERROR)
        threading.Thread(target=self._wait, args=(job,), name=f"modbus-job-{job}", daemon=True).start()

    def _reject(self, code: Code, why: str) -> None:
        log.warning("modbus: trigger refused (%s)", why)
        self._status(TRIGGER_ERROR)
        self.regs[CODE] = int(code)
        self.regs[REJECTED] = (self.regs[REJECTED] + 1) & 0xFFFF

    def _wait(self, job: int) -> None:
        result = self.line.wait(job)
        if result is None:
            result = JobResult(
                job, "NOT_DECIDABLE", None, None, int(Code.DEADLINE), "no result in time", None, 0.0, 0.0
            )
        with self._lock:
            hi, lo = struct.unpack(">HH", struct.pack(">f", float("nan") if result.score is None else result.score))
            self.regs[VERDICT] = VERDICT_CODES[result.verdict]
            self.regs[SCORE_X1000] = _x1000(result.score)
            self.regs[JOB] = result.job & 0xFFFF
            self.regs[CODE] = result.code
            self.regs[THRESHOLD_X1000] = _x1000(result.threshold)
            self.regs[SCORE_F32], self.regs[SCORE_F32 + 1] = hi, lo
            self._status(RESULT_VALID | (JOB_ERROR if result.code else 0), BUSY)
            self._refresh_ready()
            self._ack_timer = threading.Timer(self.ack_timeout, self._ack_timed_out, args=(job,))
            self._ack_timer.daemon = True
            self._ack_timer.start()

    def _withdraw(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._status(clear_bits=RESULT_VALID)

    def _ack_timed_out(self, job: int) -> None:
        with self._lock:
            if self._job == job and self.regs[STATUS] & RESULT_VALID:
                log.warning("modbus: job %d not acknowledged within %.1f s; result withdrawn", job, self.ack_timeout)
                self._withdraw()
                self._status(ACK_TIMEOUT)
                self._refresh_ready()

    # --- pymodbus ----------------------------------------------------------------------------------
    async def _action(self, function_code, start_address, address, count, registers, values):
        from pymodbus.constants import ExcCodes

        with self._lock:
            if values is not None:  # a write: only CONTROL is writable (the datastore refuses the rest)
                value = int(values[0])
                if value & ~(TRIGGER | ACK | RESET):
                    return ExcCodes.ILLEGAL_VALUE
                self.write_control(value)
            else:
                self._refresh_ready()
            registers[:REGISTERS] = self.regs
        return None

    def start(self) -> ModbusAdapter:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        device = SimDevice(
            self.device_id,
            simdata=[
                SimData(CONTROL, values=0, datatype=DataType.REGISTERS),
                SimData(STATUS, count=REGISTERS - 1, values=0, datatype=DataType.REGISTERS, readonly=True),
            ],
            action=self._action,
        )
        decoder, units = _pymodbus_parts()

        async def listen():  # pymodbus builds its transport on the running loop
            self._server = ModbusTcpServer(device, address=(self.host, self.port))
            self._server.decoder = decoder(True)  # each connection's framer takes the server's
            self._server.context = units(self._server.context)
            await self._server.serve_forever(background=True)
            self.port = self._server.transport.sockets[0].getsockname()[1]

        try:
            self._loop.start(listen, timeout=30)
        except Exception as exc:
            raise OSError(f"Modbus server could not listen on {self.host}:{self.port}: {exc}") from exc
        with self._lock:
            self._refresh_ready()
        return self

    def stop(self) -> None:
        server = self._server  # None if start() failed before the server was made
        self._loop.stop(None if server is None else lambda: server.shutdown())
        if self._ack_timer is not None:
            self._ack_timer.cancel()
