"""Start and stop what a :class:`~.config.LineConfig` asks for: the inspection service, the HTTP
service, the image source and the line adapters, then the model (so that every adapter can say
'loading'); stopped in the reverse order."""
from __future__ import annotations

import logging
import threading

from .config import LineConfig
from .jobs import Line

log = logging.getLogger("spade_edge.line")


class LineRunner:
    """Everything of one configuration, running; ``listening`` lists what listens where."""

    def __init__(self, cfg: LineConfig):
        self.cfg = cfg
        self.service = self.source = self.line = None
        self._stoppers: list = []
        self._told_when_loaded: list = []
        self.listening: dict[str, str] = {}

    def start(self) -> "LineRunner":
        from ..service.inspector import InspectionService, ServiceConfig
        from .sources import UploadSource, source_from_config

        cfg = self.cfg
        s = cfg.section("service") or {}
        svc = self.service = InspectionService(
            ServiceConfig(queue_size=s.get("queue_size", 8), deadline=s.get("deadline", 10.0), warmup=s.get("warmup", 2)),
            device=cfg.device, fp16=cfg.fp16, threads=cfg.threads or None)
        self._stoppers.append(lambda: svc.close(drain_timeout=svc.config.deadline + 5))
        try:
            http = cfg.section("http")
            if http:  # first: /health answers 'loading' while the model loads
                from ..service.server import make_server

                httpd = make_server(svc, http["host"], http["port"])
                threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
                self._stoppers.append(lambda: (httpd.shutdown(), httpd.server_close()))
                self.listening["http"] = f"http://{http['host']}:{httpd.server_address[1]}"
            src = cfg.source_settings()
            if src:
                self.source = source_from_config(src)
                self._stoppers.append(self.source.close)
                if isinstance(self.source, UploadSource):
                    svc.frames = self.source
            self.line = Line(svc, self.source, deadline=svc.config.deadline, publishers=self._publishers())
            # the adapters listen while the model loads: triggers are refused (code 11), Modbus shows
            # READY low, OPC UA shows Preoperational
            self._adapters()
            try:
                svc.load(cfg.model, cfg.gallery)
            finally:
                for adapter in self._told_when_loaded:  # Modbus reads the service's state on every request
                    adapter.service_changed()
        except BaseException:
            self.stop()
            raise
        return self

    def _publishers(self) -> list:
        m = self.cfg.section("mqtt")
        if not m:
            return []
        from .mqtt import MqttPublisher

        pub = MqttPublisher(m["host"], m["port"], m["topic"], m["qos"], username=m["username"], password=m["password"])
        self._stoppers.append(pub.close)
        self.listening["mqtt"] = f"mqtt://{m['host']}:{m['port']}/{m['topic']}/result"
        return [pub]

    def _adapters(self) -> None:
        cfg = self.cfg
        if t := cfg.section("tcp"):
            from .textproto import TextServer

            srv = TextServer(self.line, t["host"], t["port"], t["result_format"], t["eol"],
                             max_connections=t["max_connections"]).start()
            self._stoppers.append(srv.stop)
            self.listening["tcp"] = f"tcp://{t['host']}:{srv.port}"
        if m := cfg.section("modbus"):
            from .modbus import ModbusAdapter

            mb = ModbusAdapter(self.line, m["host"], m["port"], m["device_id"], m["ack_timeout"]).start()
            self._stoppers.append(mb.stop)
            self.listening["modbus"] = f"modbus://{m['host']}:{mb.port}"
        if o := cfg.section("opcua"):
            from .opcua import OpcUaAdapter

            ua = OpcUaAdapter(self.line, o["host"], o["port"]).start()
            self._stoppers.append(ua.stop)
            self._told_when_loaded.append(ua)
            self.listening["opcua"] = ua.url

    def stop(self) -> None:
        """Stop in reverse order; a failure in one stop does not skip the others."""
        while self._stoppers:
            fn = self._stoppers.pop()
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("while stopping")
