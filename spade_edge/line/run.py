"""Start and stop what a :class:`~.config.LineConfig` asks for: the inspection service, the HTTP
service, the image source and the line adapters, then the model (so that every adapter can say
'loading'); stopped in the reverse order.

:class:`LineAdapters` is the line side alone, on a service someone else runs: ``spade-edge serve
--tcp`` uses it too, so the text protocol is started one way."""

from __future__ import annotations

import logging
import threading

from ..service.inspector import InspectionService, ServiceConfig
from .config import LineConfig, reload_settings
from .jobs import Line
from .sources import ImageSource

log = logging.getLogger("spade_edge.line")


def _where(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


class _Stack:
    """Things to stop, stopped in reverse order; a failure in one stop does not skip the others."""

    def __init__(self):
        self._stoppers: list = []

    def push(self, fn) -> None:
        self._stoppers.append(fn)

    def stop(self) -> None:
        while self._stoppers:
            fn = self._stoppers.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("while stopping")


class LineAdapters:
    """The image source, the :class:`~.jobs.Line`, MQTT publishing and the tcp / modbus / opcua
    adapters that ``sections`` (checked sections of a :class:`~.config.LineConfig`) name, on
    ``service``. ``listening`` lists what listens where."""

    def __init__(self, service, sections: dict[str, dict]):
        self.service, self.sections = service, sections
        self.source: ImageSource | None = None
        self.line: Line | None = None
        self.listening: dict[str, str] = {}
        self._stack = _Stack()
        self._told_when_loaded: list = []

    def start(self) -> LineAdapters:
        """Start everything (while the model loads, triggers are refused with code 11, Modbus shows
        READY low, OPC UA Preoperational); on a failure stop what started and raise."""
        from .sources import UploadSource, source_from_config

        try:
            src = self.sections.get("source")
            if src:
                self.source = source = source_from_config(src)
                self._stack.push(source.close)
                if isinstance(source, UploadSource):
                    self.service.frames = source
            self.line = line = Line(
                self.service, self.source, deadline=self.service.config.deadline, publishers=self._publishers()
            )
            self._adapters(line)
        except BaseException:
            self.stop()
            raise
        return self

    def _publishers(self) -> list:
        m = self.sections.get("mqtt")
        if not m:
            return []
        from .mqtt import MqttPublisher

        pub = MqttPublisher(m["host"], m["port"], m["topic"], m["qos"], username=m["username"], password=m["password"])
        self._stack.push(pub.close)
        self.listening["mqtt"] = f"mqtt://{m['host']}:{m['port']}/{m['topic']}/result"
        return [pub]

    def _adapters(self, line: Line) -> None:
        if t := self.sections.get("tcp"):
            from .textproto import TextServer

            reload = self.sections.get("reload") or {}
            srv = TextServer(
                line,
                t["host"],
                t["port"],
                t["result_format"],
                t["eol"],
                max_connections=t["max_connections"],
                idle_timeout=t.get("idle_timeout", 60.0),
                reload=reload.get("allow", "local"),
            ).start()
            self._stack.push(srv.stop)
            self.listening["tcp"] = _where("tcp", t["host"], srv.port)
        if m := self.sections.get("modbus"):
            from .modbus import ModbusAdapter

            mb = ModbusAdapter(line, m["host"], m["port"], m["device_id"], m["ack_timeout"]).start()
            self._stack.push(mb.stop)
            self.listening["modbus"] = _where("modbus", m["host"], mb.port)
        if o := self.sections.get("opcua"):
            from .opcua import OpcUaAdapter

            ua = OpcUaAdapter.from_section(line, o).start()
            self._stack.push(ua.stop)
            self._told_when_loaded.append(ua)
            self.listening["opcua"] = ua.url

    def service_changed(self) -> None:
        """Call when the service has finished loading (or failed): OPC UA leaves Preoperational
        (Modbus reads the service's state on every request)."""
        for adapter in self._told_when_loaded:
            adapter.service_changed()

    def stop(self) -> None:
        self._stack.stop()


class LineRunner:
    """Everything of one configuration, running; ``listening`` lists what listens where."""

    def __init__(self, cfg: LineConfig):
        self.cfg = cfg
        self.service: InspectionService | None = None
        self.adapters: LineAdapters | None = None
        self._stack = _Stack()
        self.listening: dict[str, str] = {}

    @property
    def line(self) -> Line | None:
        return self.adapters.line if self.adapters else None

    def start(self) -> LineRunner:
        cfg = self.cfg
        s = cfg.section("service") or {}
        reload = reload_settings(cfg)  # who may reload, and which files
        svc = self.service = InspectionService(
            ServiceConfig(
                queue_size=s.get("queue_size", 8),
                deadline=s.get("deadline", 10.0),
                warmup=s.get("warmup", 2),
                reload=reload["allow"],
                reload_dirs=tuple(reload["dirs"]),
                reload_token=reload["token"],
            ),
            device=cfg.device,
            fp16=cfg.fp16,
            threads=cfg.threads or None,
            **cfg.scoring,
        )
        self._stack.push(lambda: svc.close(drain_timeout=svc.config.deadline + 5))
        try:
            http = cfg.section("http")
            if http:  # first: /health answers 'loading' while the model loads
                from ..service.server import make_server

                httpd = make_server(svc, http["host"], http["port"])
                threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
                self._stack.push(httpd.server_close)
                self._stack.push(httpd.shutdown)  # stopped first
                self.listening["http"] = _where("http", http["host"], httpd.server_address[1])
            sections = {k: v for k, v in cfg.sections.items() if k != "source"}
            if src := cfg.source_settings():
                sections["source"] = src
            self.adapters = adapters = LineAdapters(svc, sections).start()
            self._stack.push(adapters.stop)
            self.listening.update(adapters.listening)
            try:
                svc.load(cfg.model, cfg.gallery)
            finally:
                adapters.service_changed()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop in reverse order; a failure in one stop does not skip the others."""
        self._stack.stop()
