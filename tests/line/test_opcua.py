"""The OPC UA server driven by asyncua's own client on loopback."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("asyncua", reason="the line extra (asyncua) is not installed")

from asyncua import Client, ua  # noqa: E402

from spade_edge.line.opcua import NAMESPACE, OpcUaAdapter  # noqa: E402


@pytest.fixture
def adapter(line):
    a = OpcUaAdapter(line, port=0).start()
    yield a
    a.stop()


class Vision:
    """The client side: browse paths resolved once."""

    def __init__(self, client: Client):
        self.c = client

    async def setup(self):
        idx = await self.c.get_namespace_index(NAMESPACE)
        system = await self.c.nodes.objects.get_child(f"{idx}:VisionSystem")
        self.sm = await system.get_child(f"{idx}:VisionStateMachine")
        self.result = await system.get_child(f"{idx}:Result")
        self.idx = idx
        return self

    async def var(self, obj, name):
        return await (await obj.get_child(f"{self.idx}:{name}")).read_value()

    async def state(self):
        return await self.var(self.sm, "CurrentState"), await self.var(self.sm, "OperationalState")

    async def call(self, method, *args):
        return await self.sm.call_method(f"{self.idx}:{method}", *args)

    async def wait_state(self, want, timeout=20.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if await self.state() == want:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"state {await self.state()} never became {want}")

    async def run_job(self, meas, part):
        job = await self.call("StartSingleJob", meas, part)
        await self.wait_state(("Operational", "Ready"))
        r = {n: await self.var(self.result, n) for n in ("JobId", "ResultState", "Evaluation", "Score", "Threshold",
                                                         "MeasId", "PartId", "ResultContent", "StatusCode")}
        return job, r


def run(coro):
    return asyncio.run(coro)


def test_200_single_jobs_in_a_row_each_with_its_own_result(adapter):
    async def main():
        async with Client(adapter.url, timeout=30) as c:
            v = await Vision(c).setup()
            assert await v.state() == ("Operational", "Ready")
            out = [await v.run_job(f"m{i}", f"part-{i}") for i in range(200)]
            return out

    out = run(main())
    jobs = [int(j) for j, _ in out]
    assert jobs == list(range(jobs[0], jobs[0] + 200))
    for i, (job, r) in enumerate(out):
        assert r["JobId"] == job and r["MeasId"] == f"m{i}" and r["PartId"] == f"part-{i}"
        assert r["ResultState"] == 1 and r["StatusCode"] == 0
        assert [x.Value for x in r["ResultContent"]] == [r["Evaluation"], r["Score"], r["Threshold"]]  # Variant[]
    assert [r["Evaluation"] for _, r in out] == (["OK"] * 4 + ["NotOK"]) * 40
    assert all((r["Score"] > r["Threshold"]) == (r["Evaluation"] == "NotOK") for _, r in out)


def test_state_machine_abort_reset_halt_and_refusals(service, frames):
    from spade_edge.line import Line
    from spade_edge.line.sources import FakeSource

    a = OpcUaAdapter(Line(service, FakeSource(frames, delay=0.8), deadline=20), port=0).start()

    async def main():
        async with Client(a.url, timeout=30) as c:
            v = await Vision(c).setup()
            job = await v.call("StartSingleJob", "m1", "p1")
            assert await v.state() == ("Operational", "SingleExecution")
            assert await v.var(v.result, "ResultState") == 2  # Processing
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await v.call("StartSingleJob", "m2", "p2")  # not Ready: refused, nothing changes
            await v.call("Abort")
            assert await v.state() == ("Operational", "Initialized")
            assert await v.var(v.result, "ResultState") == 3  # Aborted
            assert await v.var(v.result, "JobId") == job
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await v.call("StartSingleJob", "m3", "p3")  # Initialized: Reset first
            await v.call("Reset")
            assert await v.state() == ("Operational", "Ready")
            _, r = await v.run_job("m4", "p4")
            assert r["ResultState"] == 1 and r["Evaluation"] in ("OK", "NotOK")
            await v.call("Halt")
            assert await v.state() == ("Halted", "")
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await v.call("StartSingleJob", "m5", "p5")
            await v.call("Reset")
            _, r = await v.run_job("m6", "p6")
            assert r["ResultState"] == 1
            await asyncio.sleep(1.0)  # the aborted job's late answer must not overwrite anything
            assert await v.var(v.result, "MeasId") == "m6" and await v.state() == ("Operational", "Ready")

    try:
        run(main())
    finally:
        a.stop()


def test_malformed_calls_get_status_codes_and_the_server_keeps_serving(adapter):
    async def main():
        async with Client(adapter.url, timeout=30) as c:
            v = await Vision(c).setup()
            with pytest.raises(ua.UaStatusCodeError, match="BadTypeMismatch"):
                await v.call("StartSingleJob", 17, "p")
            with pytest.raises(ua.UaStatusCodeError, match="BadArgumentsMissing"):
                await v.call("StartSingleJob", "only-one")
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await v.call("Reset")  # Ready: nothing to reset
            assert await v.state() == ("Operational", "Ready")
            _, r = await v.run_job("m", "p")
            assert r["ResultState"] == 1

    run(main())


def test_preoperational_while_the_model_loads(assets, frames):
    from spade_edge.line import Line
    from spade_edge.line.sources import FakeSource
    from spade_edge.service.inspector import InspectionService, ServiceConfig

    svc = InspectionService(ServiceConfig(warmup=0), device="cpu", threads=1)  # not loaded yet
    a = OpcUaAdapter(Line(svc, FakeSource(frames)), port=0).start()

    async def before():
        async with Client(a.url, timeout=30) as c:
            v = await Vision(c).setup()
            assert await v.state() == ("Preoperational", "")
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await v.call("StartSingleJob", "m", "p")

    async def after():
        async with Client(a.url, timeout=30) as c:
            v = await Vision(c).setup()
            assert await v.state() == ("Operational", "Ready")
            _, r = await v.run_job("m", "p")
            assert r["ResultState"] == 1

    try:
        run(before())
        svc.load(assets["model"], assets["gallery_a"])
        a.service_changed()
        run(after())
    finally:
        a.stop()
        svc.close(drain_timeout=5)
