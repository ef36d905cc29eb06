"""Results to an MQTT broker for MES dashboards (paho-mqtt; extra ``line``).

Every finished job is published as JSON on ``<topic>/result`` (QoS 1 by default), and the
line's presence as a retained ``online`` / ``offline`` on ``<topic>/status`` (``offline`` is also
the broker-held last will, so a dashboard sees a crashed device). Publishing never blocks or
fails a job: paho reconnects in its own thread and queues up to ``queue`` messages meanwhile;
past that new results are refused and counted (``dropped``), so memory stays bounded.
"""

from __future__ import annotations

import json
import logging
import socket
import threading

from ..runtime.errors import require
from .jobs import JobResult

log = logging.getLogger("spade_edge.line")


class MqttPublisher:
    """Call with a :class:`~.jobs.JobResult` (a ``Line`` publisher)."""

    def __init__(
        self,
        host: str = "localhost",
        port: int = 1883,
        topic: str = "spade-edge",
        qos: int = 1,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        queue: int = 1000,
    ):
        self._mqtt = mqtt = require("paho.mqtt.client", "line", "MQTT publishing")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        self.topic, self.qos = topic.rstrip("/"), qos
        self.host, self.port = host, int(port)  # before paho's thread starts: its callbacks read them
        self.published = self.dropped = 0
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"spade-edge-{socket.gethostname()}"
        )
        # an exception in a callback would end paho's network thread, silently: nothing sent again
        self._client.suppress_exceptions = True
        self._client.enable_logger(log)
        if username:
            self._client.username_pw_set(username, password)
        self._client.max_queued_messages_set(queue)
        self._client.will_set(f"{self.topic}/status", "offline", qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.connect_async(host, self.port, keepalive=keepalive)
        self._client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("mqtt: %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        log.info("mqtt: connected to %s:%d", self.host, self.port)
        client.publish(f"{self.topic}/status", "online", qos=1, retain=True)

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def __call__(self, result: JobResult) -> None:
        info = self._client.publish(f"{self.topic}/result", json.dumps(result.to_dict()), qos=self.qos)
        with self._lock:
            if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE:
                self.dropped += 1
            else:
                self.published += 1

    def close(self) -> None:
        self._client.publish(f"{self.topic}/status", "offline", qos=1, retain=True).wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()
