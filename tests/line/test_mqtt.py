"""Results published to a real MQTT broker (amqtt, in-process) and read by paho's client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

pytest.importorskip("paho.mqtt", reason="the line extra (paho-mqtt) is not installed")
pytest.importorskip("amqtt", reason="the test broker (amqtt) is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broker():
    from amqtt.broker import Broker

    port = free_port()
    loop = asyncio.new_event_loop()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    started = threading.Event()
    held = {}

    def run():
        asyncio.set_event_loop(loop)  # the broker binds futures to the current loop: build it here
        held["broker"] = Broker(config, loop=loop)
        loop.run_until_complete(held["broker"].start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(30)
    yield port

    async def stop():  # the broker leaves tasks behind: end them here, not at interpreter exit
        await held["broker"].shutdown()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def test_every_result_is_published_once_with_presence(broker, service, frames):
    import paho.mqtt.client as mqtt

    from spade_edge.line import Line
    from spade_edge.line.mqtt import MqttPublisher
    from spade_edge.line.sources import FakeSource

    got, status = [], []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dashboard")
    sub.on_message = lambda c, u, m: (got if m.topic.endswith("/result") else status).append(m.payload.decode())
    sub.connect("127.0.0.1", broker)
    sub.subscribe("plant/line3/#", qos=1)
    sub.loop_start()
    pub = MqttPublisher("127.0.0.1", broker, topic="plant/line3", client_id="device")
    try:
        end = time.monotonic() + 20
        while not pub.connected and time.monotonic() < end:
            time.sleep(0.02)
        assert pub.connected
        line = Line(service, FakeSource(frames), publishers=[pub])
        results = [line.inspect() for _ in range(50)]
        end = time.monotonic() + 20
        while len(got) < 50 and time.monotonic() < end:
            time.sleep(0.02)
        msgs = [json.loads(x) for x in got]
        assert [m["job"] for m in msgs] == [r.job for r in results]  # all, once, in order
        assert [m["verdict"] for m in msgs] == [r.verdict for r in results] == (["OK"] * 4 + ["NOT_OK"]) * 10
        assert all(m["score"] == r.score for m, r in zip(msgs, results))
        assert status[-1] == "online" and pub.published == 50 and pub.dropped == 0
    finally:
        pub.close()
        time.sleep(0.3)
        sub.loop_stop()
        sub.disconnect()
    assert status[-1] == "offline"


def test_a_broker_outage_never_fails_a_job(service, frames):
    from spade_edge.line import Line
    from spade_edge.line.mqtt import MqttPublisher
    from spade_edge.line.sources import FakeSource

    pub = MqttPublisher("127.0.0.1", free_port(), topic="nobody/listens", queue=5)  # no broker there
    try:
        line = Line(service, FakeSource(frames), publishers=[pub])
        assert all(line.inspect().code == 0 for _ in range(8))
        assert pub.published + pub.dropped == 8 and pub.dropped >= 3  # bounded queue: the excess counted
    finally:
        pub._client.loop_stop()
