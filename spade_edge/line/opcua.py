"""OPC UA server shaped on the Machine Vision companion specification (OPC 40100-1), through
asyncua (extra ``line``): what a client needs to run single jobs and read their results.

Address space (namespace ``urn:spade-edge:vision``), under Objects/VisionSystem:

    VisionStateMachine/
        CurrentState            String   Preoperational | Operational | Halted | Error
        OperationalState        String   Initialized | Ready | SingleExecution ("" when not Operational)
        StartSingleJob(MeasIdIn: String, PartIdIn: String) -> JobIdOut: String
        Stop()  Abort()  Halt()  Reset()
    Result/                      the newest result (40100 ResultType's mandatory members, as variables)
        ResultId, JobId, MeasId, PartId   String
        ResultState             Int32    1 Completed, 2 Processing, 3 Aborted, 4 Failed (40100 table 153)
        IsPartial               Boolean  always false
        CreationTime            DateTime
        ResultContent           Variant[]  [Evaluation, Score, Threshold]
        Evaluation              String   OK | NotOK | NotDecidable (OPC 40001-101 names)
        Score, Threshold        Double
        StatusCode              Int32    the line's status code (0 OK; docs/line.md)

Transitions: Preoperational while the model loads (the server listens from the start), then
Operational/Initialized (:meth:`OpcUaAdapter.service_changed`), and Initialized
-> Ready at once (the gallery is the one prepared recipe). StartSingleJob: Ready ->
SingleExecution -> Ready with the result. Stop: the running job finishes, Ready. Abort: the
running single job (this adapter's own: jobs other adapters started run on) ends with ResultState
Aborted, Initialized; Reset: Initialized / Halted / Error -> Ready. Halt: Operational -> Halted (triggers refused). A method called in the wrong state
answers BadInvalidState and changes nothing. Left out (docs/line.md): recipe, configuration and
safety management, continuous execution, result retrieval methods, the ResultReady event and
the 40100 type definitions (the nodes are plain objects and variables).

Security (endpoint, certificates, trusted clients, anonymous sessions): :mod:`.opcua_security`.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
from typing import TYPE_CHECKING

from ..runtime.errors import require
from .jobs import Code, JobResult, Line, LineError
from .loop import LoopThread
from .opcua_security import OpcUaSecurity, ensure_certificate, secured_server

if TYPE_CHECKING:
    from asyncua import Server

log = logging.getLogger("spade_edge.line")

NAMESPACE = "urn:spade-edge:vision"
COMPLETED, PROCESSING, ABORTED, FAILED = 1, 2, 3, 4
EVALUATION = {"OK": "OK", "NOT_OK": "NotOK", "NOT_DECIDABLE": "NotDecidable"}


class _Refused(Exception):
    """A method call answered with an OPC UA status code (asyncua reports raised errors as
    BadUnexpectedError, so refusals are returned, not raised)."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _ua_method(fn):
    @functools.wraps(fn)
    async def call(self, parent, *args):
        from asyncua import ua

        try:
            return await fn(self, parent, *args)
        except _Refused as r:
            return ua.StatusCode(r.status)

    return call


def _node_id(object_id: int):
    """``ua.NodeId`` of a standard object id (asyncua annotates the identifier as its own Int32 class,
    while its ObjectIds are plain ints)."""
    from asyncua import ua

    return ua.NodeId(object_id)  # type: ignore[arg-type]


class OpcUaAdapter:
    """The server above on ``opc.tcp://host:port/spade-edge/`` (``port`` 0: any free port), with
    ``security`` (:class:`~.opcua_security.OpcUaSecurity`; None: no security, anonymous)."""

    def __init__(self, line: Line, host: str = "127.0.0.1", port: int = 4840, security: OpcUaSecurity | None = None):
        require("asyncua", "line", "The OPC UA adapter")
        self.line, self.host, self.port = line, host, int(port)
        self.security = security or OpcUaSecurity()
        self.state, self.operational = "Preoperational", ""
        self._job: int | None = None  # the job of SingleExecution
        self._latest: int | None = None  # the newest job started: only its result is written
        self._published: int | None = None
        self._loop = LoopThread("line-opcua")
        self._server: Server | None = None
        self.nodes: dict = {}

    @classmethod
    def from_section(cls, line: Line, section: dict) -> OpcUaAdapter:
        """The adapter of a checked ``[opcua]`` table (:func:`~.config.load_config`)."""
        return cls(line, section["host"], section["port"], OpcUaSecurity.from_section(section))

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/spade-edge/"

    # --- address space -----------------------------------------------------------------------------
    async def _build(self) -> None:
        from asyncua import ua

        server = secured_server(self.security)
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("spade-edge vision system")
        await server.setup()
        idx = await server.register_namespace(NAMESPACE)
        system = await server.nodes.objects.add_object(idx, "VisionSystem")
        sm = await system.add_object(idx, "VisionStateMachine")
        result = await system.add_object(idx, "Result")
        V = ua.VariantType
        n, self._types = self.nodes, {}
        for parent, name, val, vt in (
            (sm, "CurrentState", self.state, V.String),
            (sm, "OperationalState", "", V.String),
            (result, "ResultId", "", V.String),
            (result, "JobId", "", V.String),
            (result, "MeasId", "", V.String),
            (result, "PartId", "", V.String),
            (result, "ResultState", 0, V.Int32),
            (result, "IsPartial", False, V.Boolean),
            (result, "CreationTime", datetime.datetime.now(datetime.timezone.utc), V.DateTime),
            (result, "Evaluation", "", V.String),
            (result, "Score", float("nan"), V.Double),
            (result, "Threshold", float("nan"), V.Double),
            (result, "StatusCode", 0, V.Int32),
        ):
            n[name], self._types[name] = await parent.add_variable(idx, name, val, vt), vt
        n["ResultContent"] = await result.add_variable(
            idx, "ResultContent", ua.Variant([], V.Variant), datatype=_node_id(ua.ObjectIds.BaseDataType)
        )
        await sm.add_method(
            idx,
            "StartSingleJob",
            self._start_single_job,
            [
                ua.Argument(Name="MeasIdIn", DataType=_node_id(ua.ObjectIds.String), ValueRank=-1),
                ua.Argument(Name="PartIdIn", DataType=_node_id(ua.ObjectIds.String), ValueRank=-1),
            ],
            [ua.Argument(Name="JobIdOut", DataType=_node_id(ua.ObjectIds.String), ValueRank=-1)],
        )
        for name, fn in (("Stop", self._stop), ("Abort", self._abort), ("Halt", self._halt), ("Reset", self._reset)):
            await sm.add_method(idx, name, fn, [], [])
        self._server = server

    async def _set(self, **values) -> None:
        from asyncua import ua

        for name, v in values.items():
            node = self.nodes[name]
            if name == "ResultContent":
                await node.write_value(ua.Variant([ua.Variant(x) for x in v], ua.VariantType.Variant))
            else:
                await node.write_value(ua.DataValue(ua.Variant(v, self._types[name])))

    async def _enter(self, state: str, operational: str = "") -> None:
        self.state, self.operational = state, operational if state == "Operational" else ""
        await self._set(CurrentState=self.state, OperationalState=self.operational)

    def _bad_state(self, method: str):
        from asyncua import ua

        log.info("opcua: %s refused in %s/%s", method, self.state, self.operational)
        raise _Refused(ua.StatusCodes.BadInvalidState)

    # --- methods (run on the server's loop) ----------------------------------------------------------
    @_ua_method
    async def _start_single_job(self, parent, *args):
        from asyncua import ua

        if len(args) != 2:
            raise _Refused(ua.StatusCodes.BadArgumentsMissing if len(args) < 2 else ua.StatusCodes.BadTooManyArguments)
        meas, part = args
        if not all(isinstance(v.Value, str) for v in (meas, part)):
            raise _Refused(ua.StatusCodes.BadTypeMismatch)
        if (self.state, self.operational) != ("Operational", "Ready"):
            self._bad_state("StartSingleJob")
        try:
            job = self.line.trigger()
        except LineError as e:
            log.warning("opcua: StartSingleJob refused: %s", e.message)
            raise _Refused(
                ua.StatusCodes.BadResourceUnavailable if e.code == Code.BUSY else ua.StatusCodes.BadInvalidState
            ) from None
        self._job = self._latest = job
        await self._enter("Operational", "SingleExecution")
        await self._set(JobId=str(job), MeasId=meas.Value, PartId=part.Value, ResultState=PROCESSING)
        threading.Thread(target=self._wait, args=(job,), name=f"opcua-job-{job}", daemon=True).start()
        return [ua.Variant(str(job), ua.VariantType.String)]

    def _wait(self, job: int) -> None:
        result = self.line.wait(job)
        self._loop.submit(self._finished(job, result))

    async def _finished(self, job: int, r: JobResult | None) -> None:
        if job != self._latest or self._published == job:
            return  # a late answer to an older job (aborted), or already written: keep the newest result
        self._published = job
        if r is None:
            r = JobResult(job, "NOT_DECIDABLE", None, None, int(Code.DEADLINE), "no result in time", None, 0.0, 0.0)
        state = COMPLETED if r.code == Code.OK else ABORTED if r.code == Code.ABORTED else FAILED
        nan = float("nan")
        await self._set(
            ResultId=f"{job}",
            JobId=str(job),
            ResultState=state,
            Evaluation=EVALUATION[r.verdict],
            Score=nan if r.score is None else r.score,
            Threshold=nan if r.threshold is None else r.threshold,
            StatusCode=r.code,
            CreationTime=datetime.datetime.now(datetime.timezone.utc),
            ResultContent=[
                EVALUATION[r.verdict],
                nan if r.score is None else r.score,
                nan if r.threshold is None else r.threshold,
            ],
        )
        if self._job == job and (self.state, self.operational) == ("Operational", "SingleExecution"):
            self._job = None
            await self._enter("Operational", "Ready")

    @_ua_method
    async def _stop(self, parent):
        if self.state != "Operational":
            self._bad_state("Stop")
        return []  # a single job is let finish (its result brings Ready); there is no continuous mode

    @_ua_method
    async def _abort(self, parent):
        if self.state != "Operational" or self.operational not in ("SingleExecution", "Ready"):
            self._bad_state("Abort")
        await self._end_job()
        await self._enter("Operational", "Initialized")
        return []

    async def _end_job(self) -> None:
        """Abort this adapter's running single job (only it: jobs other adapters started run on)
        and write its Aborted result now."""
        job, self._job = self._job, None
        if job is not None:
            try:
                self.line.abort(job)
                result = self.line.result(job)
            except LineError:  # dropped from the line's memory meanwhile: nothing left to end
                return
            await self._finished(job, result)

    @_ua_method
    async def _halt(self, parent):
        if self.state != "Operational":
            self._bad_state("Halt")
        await self._end_job()
        self.line.halted = True
        await self._enter("Halted")
        return []

    @_ua_method
    async def _reset(self, parent):
        if not (self.state in ("Halted", "Error") or (self.state, self.operational) == ("Operational", "Initialized")):
            self._bad_state("Reset")
        self.line.halted = False
        await self._enter("Preoperational")
        await self._become_operational()
        return []

    async def _become_operational(self) -> None:
        state = self.line.service.state
        if state == "ready":
            await self._enter("Operational", "Initialized")
            await self._enter("Operational", "Ready")  # the gallery is the prepared recipe
        else:  # still loading: Preoperational until service_changed(); a failed load: Error
            await self._enter("Preoperational" if state == "starting" else "Error")

    def service_changed(self) -> None:
        """Call when the service has finished loading (or failed): leave Preoperational."""

        async def update():
            if self.state == "Preoperational":
                await self._become_operational()

        self._loop.call(update())

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> OpcUaAdapter:
        async def boot():
            await self._build()
            await self._server.start()
            self.port = self._server.bserver.port
            await self._become_operational()

        try:
            if self.security.secure:
                tp = ensure_certificate(self.security, self.host)
                log.info(
                    "opcua: %s, certificate %s (sha256 %s), trusted clients in %s",
                    self.security.mode,
                    self.security.certificate,
                    tp[:16],
                    self.security.trusted_certificates,
                )
            self._loop.start(boot)
        except Exception as exc:
            raise OSError(f"OPC UA server could not start on {self.url}: {exc}") from exc
        return self

    def stop(self) -> None:
        server = self._server  # None if start() failed before the server was built
        self._loop.stop(None if server is None else lambda: server.stop())
