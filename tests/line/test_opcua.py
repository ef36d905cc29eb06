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
        r = {
            n: await self.var(self.result, n)
            for n in (
                "JobId",
                "ResultState",
                "Evaluation",
                "Score",
                "Threshold",
                "MeasId",
                "PartId",
                "ResultContent",
                "StatusCode",
            )
        }
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


def test_abort_ends_only_opcua_own_job_not_other_adapters_jobs(service, frames):
    """docs/line.md: Abort ends "the running single job". Before: it aborted every running job of
    the line, so 3 jobs started over TCP ended NOT_DECIDABLE (code 33)."""
    from spade_edge.line import Line
    from spade_edge.line.sources import FakeSource

    line = Line(service, FakeSource(frames, delay=0.8), deadline=20)
    a = OpcUaAdapter(line, port=0).start()

    async def main():
        async with Client(a.url, timeout=30) as c:
            v = await Vision(c).setup()
            job = int(await v.call("StartSingleJob", "m1", "p1"))
            others = [line.trigger() for _ in range(3)]  # what the text protocol's TA does
            assert line.running == 4
            await v.call("Abort")
            assert await v.var(v.result, "ResultState") == 3 and int(await v.var(v.result, "JobId")) == job
            return job, others

    try:
        job, others = run(main())
        assert line.result(job).code == 33
        for j in others:
            r = line.wait(j, timeout=30)
            assert r is not None and r.code == 0 and r.verdict in ("OK", "NOT_OK"), r
    finally:
        a.stop()


# --- security (issue 17: secure by default) ---------------------------------------------------------
CLIENT_URI = "urn:spade-edge:test:client"


def make_client_certificate(folder, name):
    """A client's self-signed application certificate (DER) and key (PEM), as a PLC makes them."""
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    folder.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        name,
        {},
        [x509.UniformResourceIdentifier(CLIENT_URI), x509.DNSName("localhost")],
        extended=[x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH],
        days=30,
    )
    (folder / f"{name}.der").write_bytes(cert.public_bytes(Encoding.DER))
    (folder / f"{name}.pem").write_bytes(cert_gen.dump_private_key_as_pem(key))
    return folder / f"{name}.der", folder / f"{name}.pem"


async def secure_client(url, cert, key, mode=None, user_cert=None):
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    c = Client(url, timeout=10)
    c.application_uri = CLIENT_URI
    await c.set_security(
        SecurityPolicyBasic256Sha256, str(cert), str(key), mode=mode or ua.MessageSecurityMode.SignAndEncrypt
    )
    if user_cert is not None:
        await c.load_client_certificate(str(user_cert[0]))
        await c.load_private_key(user_cert[1])
    return c


def test_no_user_name_gets_in_and_no_session_can_forge_a_result_or_delete_nodes(adapter):
    """Before: a client calling itself "admin" (any password) got asyncua's administrator role,
    wrote Evaluation = "OK" over a result and deleted nodes of the address space."""

    async def main():
        c = Client(adapter.url, timeout=10)
        c.set_user("admin")
        c.set_password("anything")
        with pytest.raises(ua.UaStatusCodeError, match="BadIdentityTokenRejected|BadUserAccessDenied"):
            async with c:
                pass
        async with Client(adapter.url, timeout=10) as c:  # anonymous: methods and reads only
            v = await Vision(c).setup()
            _, r = await v.run_job("m", "p")
            evaluation = await v.result.get_child(f"{v.idx}:Evaluation")
            forged = "NotOK" if r["Evaluation"] == "OK" else "OK"
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied|BadNotWritable"):
                await evaluation.write_value(ua.DataValue(ua.Variant(forged, ua.VariantType.String)))
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await c.delete_nodes([evaluation])
            assert await evaluation.read_value() == r["Evaluation"]

    run(main())


class _ignoring_the_endpoint_list:
    """asyncua's client refuses on its side a server without its security mode; a hostile one
    would not: this one goes on with the unsecured channel."""

    async def __aenter__(self):
        self.orig = Client.find_endpoint

        def lenient(endpoints, mode, uri):
            try:
                return self.orig(endpoints, mode, uri)
            except ua.UaError:
                return endpoints[0]

        Client.find_endpoint = staticmethod(lenient)

    async def __aexit__(self, *exc):
        Client.find_endpoint = staticmethod(self.orig)


def test_sign_and_encrypt_refuses_clients_without_security_and_untrusted_ones(line, tmp_path):
    import os
    import stat

    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    from spade_edge.line.opcua_security import SIGN_AND_ENCRYPT, OpcUaSecurity

    pki = tmp_path / "opcua"
    sec = OpcUaSecurity(SIGN_AND_ENCRYPT, pki / "server-cert.der", pki / "server-key.pem", pki / "trusted")
    plc = make_client_certificate(tmp_path / "plc", "plc")
    a = OpcUaAdapter(line, port=0, security=sec).start()
    counts = {"refused": 0, "jobs": 0}

    async def refused(make):
        with pytest.raises(Exception) as e:  # noqa: PT011 - asyncua raises what the transport saw
            c = await make()
            async with c:
                await Vision(c).setup()
        counts["refused"] += 1
        print("refused:", type(e.value).__name__, e.value)
        return e.value

    async def main():
        eps = await Client(a.url, timeout=10).connect_and_get_server_endpoints()
        assert [(e.SecurityPolicyUri, e.SecurityMode) for e in eps] == [
            (SecurityPolicyBasic256Sha256.URI, ua.MessageSecurityMode.SignAndEncrypt)
        ]
        assert [t.TokenType for t in eps[0].UserIdentityTokens] == [
            ua.UserTokenType.Anonymous,
            ua.UserTokenType.Certificate,
        ]

        async def plain():
            return Client(a.url, timeout=10)

        await refused(plain)  # no security at all
        async with _ignoring_the_endpoint_list():  # nor when the client does not check the endpoints
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                async with Client(a.url, timeout=10):
                    pass
        counts["refused"] += 1
        await refused(lambda: secure_client(a.url, *plc, mode=ua.MessageSecurityMode.Sign))  # signed only
        await refused(lambda: secure_client(a.url, *plc))  # not trusted (yet)
        rejected = list((pki / "rejected").iterdir())
        assert len(rejected) == 1 and rejected[0].read_bytes() == plc[0].read_bytes()
        os.replace(rejected[0], pki / "trusted" / "plc.der")  # what the administrator does
        async with _ignoring_the_endpoint_list():  # a trusted certificate on an unsecured channel:
            c = Client(a.url, timeout=10)  # a session, but nothing to read or call
            await c.load_client_certificate(str(plc[0]))
            await c.load_private_key(plc[1])
            async with c:
                with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                    await Vision(c).setup()
                with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                    await c.nodes.objects.read_browse_name()
        counts["refused"] += 1
        async with await secure_client(a.url, *plc) as c:
            v = await Vision(c).setup()
            for i in range(20):
                _, r = await v.run_job(f"m{i}", f"p{i}")
                assert r["ResultState"] == 1 and r["MeasId"] == f"m{i}"
                counts["jobs"] += 1

    try:
        run(main())
    finally:
        a.stop()
    assert stat.S_IMODE((pki / "server-key.pem").stat().st_mode) == 0o600
    cert = (pki / "server-cert.der").read_bytes()
    b = OpcUaAdapter(line, port=0, security=sec).start()  # a restart keeps its certificate
    try:
        assert (pki / "server-cert.der").read_bytes() == cert

        async def again():
            async with await secure_client(b.url, *plc) as c:
                assert (await Vision(c).setup()) and await Vision(c).setup()

        run(again())
    finally:
        b.stop()
    print(f"opcua security: {counts['refused']} connections refused, {counts['jobs']} jobs over the secure channel")


def test_without_anonymous_a_session_needs_a_trusted_certificate(line, tmp_path):
    from spade_edge.line.opcua_security import SIGN_AND_ENCRYPT, OpcUaSecurity

    pki = tmp_path / "opcua"
    plc = make_client_certificate(pki / "trusted", "plc")
    stranger = make_client_certificate(tmp_path / "elsewhere", "stranger")
    sec = OpcUaSecurity(
        SIGN_AND_ENCRYPT, pki / "server-cert.der", pki / "server-key.pem", pki / "trusted", allow_anonymous=False
    )
    a = OpcUaAdapter(line, port=0, security=sec).start()

    async def main():
        eps = await Client(a.url, timeout=10).connect_and_get_server_endpoints()
        assert [t.TokenType for t in eps[0].UserIdentityTokens] == [ua.UserTokenType.Certificate]
        with pytest.raises(ua.UaStatusCodeError, match="BadIdentityTokenRejected"):
            async with await secure_client(a.url, *plc):  # a trusted channel, but anonymous
                pass
        c = await secure_client(a.url, *plc)
        c.set_user("admin")
        c.set_password("admin")
        with pytest.raises(ua.UaStatusCodeError, match="BadIdentityTokenRejected"):
            async with c:
                pass
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            async with await secure_client(a.url, *plc, user_cert=stranger):
                pass
        async with await secure_client(a.url, *plc, user_cert=plc) as c:
            _, r = await (await Vision(c).setup()).run_job("m", "p")
            assert r["ResultState"] == 1

    try:
        run(main())
    finally:
        a.stop()


def test_security_settings_are_checked_with_the_file(tmp_path):
    from spade_edge.line.opcua_security import NONE, SIGN_AND_ENCRYPT, check_section

    def check(**kw):
        section = {
            "host": "0.0.0.0",
            "port": 4840,
            "security": None,
            "certificate": "opcua/server-cert.der",
            "private_key": "opcua/server-key.pem",
            "trusted_certificates": "opcua/trusted",
            "allow_anonymous": True,
            **kw,
        }
        return check_section(section, tmp_path), section

    problems, s = check()
    assert problems == [] and s["security"] == SIGN_AND_ENCRYPT  # off the machine: secure by default
    assert s["certificate"] == str(tmp_path / "opcua" / "server-cert.der")
    assert s["trusted_certificates"] == str(tmp_path / "opcua" / "trusted")
    assert check(host="127.0.0.1")[1]["security"] == NONE  # loopback: nothing else can reach it
    assert check(host="::1")[1]["security"] == NONE
    assert check(host="127.0.0.1", security=SIGN_AND_ENCRYPT)[1]["security"] == SIGN_AND_ENCRYPT
    assert "one of 'none'" in check(security="Basic128Rsa15")[0][0]
    assert "allow_anonymous = false needs security" in check(security="none", allow_anonymous=False)[0][0]
    (tmp_path / "opcua").mkdir()
    (tmp_path / "opcua" / "server-cert.der").write_bytes(b"x")
    assert "private_key" in check()[0][0] and "no such file" in check()[0][0]


def test_security_from_the_configuration_file(line, assets, tmp_path):
    """`[opcua] security = ...` as `spade-edge line` reads it: paths from the file's folder, the
    certificate made there on first start, a client without security refused."""
    import shutil

    from spade_edge.line.config import ConfigError, load_config

    shutil.copy(assets["model"], tmp_path / "model.onnx")
    shutil.copy(assets["gallery_a"], tmp_path / "parts.gallery")
    head = 'model = "model.onnx"\ngallery = "parts.gallery"\n[source]\ntype = "fake"\n'
    (tmp_path / "bad.toml").write_text(
        head + '[opcua]\nhost = "127.0.0.1"\nsecurity = "Basic128"\nallow_anonymous = "no"\n'
    )
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "bad.toml")
    assert any("[opcua] security = 'Basic128': one of 'none'" in p for p in e.value.problems)
    assert any("[opcua] allow_anonymous = 'no': must be bool" in p for p in e.value.problems)
    (tmp_path / "line.toml").write_text(
        head + '[opcua]\nhost = "127.0.0.1"\nport = 0\nsecurity = "Basic256Sha256_SignAndEncrypt"\n'
    )
    section = load_config(tmp_path / "line.toml").section("opcua")
    assert section["certificate"] == str(tmp_path / "opcua" / "server-cert.der")
    plc = make_client_certificate(tmp_path / "opcua" / "trusted", "plc")
    a = OpcUaAdapter.from_section(line, section).start()

    async def main():
        with pytest.raises(ua.UaError, match="No matching endpoints"):
            async with Client(a.url, timeout=10):
                pass
        async with await secure_client(a.url, *plc) as c:
            _, r = await (await Vision(c).setup()).run_job("m", "p")
            assert r["ResultState"] == 1

    try:
        assert (tmp_path / "opcua" / "server-key.pem").is_file()
        run(main())
    finally:
        a.stop()
    (tmp_path / "open.toml").write_text(head + '[opcua]\nhost = "127.0.0.1"\n')
    assert load_config(tmp_path / "open.toml").section("opcua")["security"] == "none"  # loopback only
