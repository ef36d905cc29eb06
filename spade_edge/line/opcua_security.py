"""Security of the OPC UA adapter: which endpoint it offers, its certificate, which clients it
lets in and as whom (docs/line.md, "OPC UA security").

- ``security = "none"``: the one endpoint is unsecured (no signature, no encryption, anonymous
  sessions). The default only when the adapter listens on a loopback address, which nothing off
  the machine can reach.
- ``security = "Basic256Sha256_SignAndEncrypt"`` (the default on any other address): the one
  endpoint signs and encrypts; a client without security, or with a weaker mode, is refused.
  The server's certificate and private key are ``certificate`` and ``private_key`` (DER or PEM),
  made once, self-signed, if neither file exists. A client is let in only if its application
  certificate is one of those in ``trusted_certificates`` (a folder, read again at every
  connection); a refused client's certificate is written to ``rejected/`` beside that folder, for
  an administrator to move into it.
- ``allow_anonymous = false`` (needs security): a session must also identify itself with a
  trusted certificate (an X509 user identity token, signed with its key); user names and
  passwords are never accepted (there is no user database), and no session gets the
  address-space administrator role (asyncua grants it to any user called "admin").

Only this module knows asyncua's security classes; asyncua is imported where they are used.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("spade_edge.line")

NONE, SIGN_AND_ENCRYPT = "none", "Basic256Sha256_SignAndEncrypt"
SECURITY_MODES = (NONE, SIGN_AND_ENCRYPT)
APPLICATION_URI = "urn:spade-edge:vision:server"
CERTIFICATE_DAYS = 3650  # a line device outlives a one-year certificate; replace it with your own if you must
CERT_SUFFIXES = (".der", ".cer", ".crt", ".pem")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OpcUaSecurity:
    """Checked security settings; incompatible ones are refused, never rewritten."""

    mode: str = NONE
    certificate: Path | None = None
    private_key: Path | None = None
    trusted_certificates: Path | None = None
    allow_anonymous: bool = True

    def __post_init__(self):
        if self.mode not in SECURITY_MODES:
            raise ValueError(f"security = {self.mode!r}: one of {', '.join(repr(m) for m in SECURITY_MODES)}")
        if self.mode == NONE and not self.allow_anonymous:
            raise ValueError(
                "allow_anonymous = false needs security = 'Basic256Sha256_SignAndEncrypt' "
                "(without it a client can only be anonymous)"
            )
        if self.secure and not (self.certificate and self.private_key and self.trusted_certificates):
            raise ValueError("security needs certificate, private_key and trusted_certificates")

    @property
    def secure(self) -> bool:
        return self.mode != NONE

    def paths(self) -> tuple[Path, Path, Path]:
        """``certificate``, ``private_key`` and ``trusted_certificates``: all set when ``secure``."""
        if self.certificate is None or self.private_key is None or self.trusted_certificates is None:
            raise ValueError("security needs certificate, private_key and trusted_certificates")
        return self.certificate, self.private_key, self.trusted_certificates

    @classmethod
    def from_section(cls, section: dict, base: Path | None = None) -> OpcUaSecurity:
        """From an ``[opcua]`` table (relative paths start at ``base``); ``security`` unset: none
        on a loopback host, sign and encrypt on any other."""
        mode = section.get("security") or (NONE if is_loopback(section.get("host", "")) else SIGN_AND_ENCRYPT)

        def path(key):
            v = section.get(key)
            return None if not v else Path(v) if base is None else base / v

        return cls(
            mode,
            path("certificate"),
            path("private_key"),
            path("trusted_certificates"),
            bool(section.get("allow_anonymous", True)),
        )


def check_section(section: dict, base: Path) -> list[str]:
    """The ``[opcua]`` table's security problems (for ``--check``); on none, the table's
    ``security`` is set to what applies and its paths are made absolute."""
    try:
        sec = OpcUaSecurity.from_section(section, base)
    except ValueError as exc:
        return [str(exc)]
    section["security"] = sec.mode
    for key in ("certificate", "private_key", "trusted_certificates"):
        value = getattr(sec, key)
        section[key] = None if value is None else str(value)
    if sec.secure:
        certificate, private_key, trusted = sec.paths()
        have = [p.is_file() for p in (certificate, private_key)]
        if any(have) and not all(have):
            missing = "private_key" if have[0] else "certificate"
            return [
                (
                    f"{missing} = {str(getattr(sec, missing))!r}: no such file (the other one exists: "
                    "give both, or neither to have them made)"
                )
            ]
        if trusted.exists() and not trusted.is_dir():
            return [f"trusted_certificates = {str(trusted)!r}: not a folder"]
    return []


def thumbprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def first_der(data: bytes) -> bytes:
    """The first certificate of a DER chain (OPC UA sends chains concatenated)."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    if data[1] & 0x80:
        n = data[1] & 0x7F
        length = 2 + n + int.from_bytes(data[2 : 2 + n], "big")
    else:
        length = 2 + data[1]
    return data[:length]


def _certificates_in(path: Path) -> list[bytes]:
    """DER of the certificates in one file (DER, or PEM with one or more)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(data)]
    return [x509.load_der_x509_certificate(first_der(data)).public_bytes(Encoding.DER)]


class TrustList:
    """The folder of trusted client certificates, read again at every check (an administrator's
    copy takes effect at the client's next attempt). Exact certificates: the self-signed
    application certificates of OPC UA; certificate authorities are not followed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.rejected = self.folder.parent / "rejected"

    def thumbprints(self) -> set[str]:
        out: set[str] = set()
        try:
            files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in CERT_SUFFIXES and p.is_file())
        except OSError as exc:
            log.warning("opcua: cannot read the trusted certificates in %s: %s", self.folder, exc)
            return out
        for p in files:
            try:
                out.update(thumbprint(d) for d in _certificates_in(p))
            except (OSError, ValueError) as exc:
                log.warning("opcua: %s is not a certificate (%s); ignored", p, exc)
        return out

    def admits(self, der: bytes | None, what: str) -> bool:
        """True if ``der`` (a client's certificate) is trusted; else keep it in ``rejected/``."""
        if not der:
            return False
        der = first_der(bytes(der))
        tp = thumbprint(der)
        if tp in self.thumbprints():
            return True
        saved = self.rejected / f"{tp[:16]}.der"
        try:
            self.rejected.mkdir(parents=True, exist_ok=True)
            if not saved.exists():
                saved.write_bytes(der)
            where = f"saved as {saved}: move it into {self.folder} to trust it"
        except OSError as exc:
            where = f"not saved ({exc})"
        log.warning("opcua: %s refused: its certificate (sha256 %s) is not trusted; %s", what, tp[:16], where)
        return False


def ensure_certificate(sec: OpcUaSecurity, host: str) -> str:
    """Make the server's self-signed certificate and key if neither exists (the key readable by
    its owner alone); returns the certificate's SHA-256 thumbprint."""
    from asyncua.crypto import cert_gen
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert, key, _ = sec.paths()
    if not cert.exists() and not key.exists():
        for folder in {cert.parent, key.parent}:
            folder.mkdir(parents=True, exist_ok=True)
        pk = cert_gen.generate_private_key()
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(APPLICATION_URI),
            x509.DNSName(socket.gethostname()),
        ]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host:
                names.append(x509.DNSName(host))
        c = cert_gen.generate_self_signed_app_certificate(
            pk,
            "spade-edge vision system",
            {},
            names,
            extended=[x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH],
            days=CERTIFICATE_DAYS,
        )
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cert_gen.dump_private_key_as_pem(pk))
        cert.write_bytes(c.public_bytes(Encoding.DER))
        log.warning(
            "opcua: made a self-signed certificate %s (valid until %s), key %s",
            cert,
            (datetime.date.today() + datetime.timedelta(days=CERTIFICATE_DAYS)).isoformat(),
            key,
        )
    elif not (cert.is_file() and key.is_file()):
        raise FileNotFoundError(f"OPC UA certificate {cert} and private key {key}: one exists without the other")
    return thumbprint(_certificates_in(cert)[0])


@functools.cache
def _asyncua_parts():
    """The asyncua subclasses (defined here so that importing this module never imports asyncua)."""
    from asyncua import Server, ua
    from asyncua.crypto.permission_rules import User, UserRole
    from asyncua.crypto.security_policies import (
        SecurityPolicyFactory,
        SecurityPolicyNone,
    )
    from asyncua.server.user_managers import UserManager

    class TrustedClientsOnly(SecurityPolicyFactory):
        """Builds a secure channel only for a client whose certificate is trusted: the check is
        on the certificate the channel itself is secured with (asyncua's certificate validator
        sees only the one a client names in CreateSession, which need not be its own)."""

        def __init__(self, factory, trust: TrustList):
            super().__init__(
                factory.cls,
                factory.mode,
                factory.certificate,
                factory.private_key,
                factory.permission_ruleset,
                factory.certificate_chain,
            )
            self.trust = trust

        def create(self, peer_certificate):
            if not self.trust.admits(peer_certificate, "a client"):
                raise ua.uaerrors.BadUserAccessDenied  # asyncua closes the connection at once
            return super().create(peer_certificate)

    class DiscoveryOnly:
        """The permissions of an unsecured channel on a secured server: discovery (GetEndpoints,
        FindServers, which asyncua never checks) and nothing else. asyncua answers an unsecured
        channel even when no endpoint offers one, and checks nothing on it."""

        def check_validity(self, user, action_type_id, body):
            return False

    class Users(UserManager):
        """Who a session is: never the administrator; by certificate only if it is trusted;
        anonymous only if allowed; never by user name."""

        def __init__(self, sec: OpcUaSecurity, trust: TrustList | None):
            self.sec, self.trust = sec, trust

        def get_user(self, iserver, username=None, password=None, certificate=None):
            # the token's type was checked against the offered ones already (anonymous only if
            # allowed); ``certificate`` is an X509 token's, or for an anonymous one the channel's
            if username is not None:
                return None
            if certificate:
                ok = self.trust is not None and self.trust.admits(certificate, "a session's certificate")
                return User(role=UserRole.User, name="certificate") if ok else None
            return User(role=UserRole.User) if self.sec.allow_anonymous and not self.sec.secure else None

    class SecuredServer(Server):
        def __init__(self, sec: OpcUaSecurity):
            self.trust = TrustList(sec.paths()[2]) if sec.secure else None
            super().__init__(user_manager=Users(sec, self.trust))
            self.sec = sec

        async def setup(self) -> None:
            """Policies, identity tokens and certificate (after ``init()``)."""
            sec = self.sec
            self.allow_remote_admin(False)
            await self.set_application_uri(APPLICATION_URI)
            tokens: list[type] = [ua.AnonymousIdentityToken] if sec.allow_anonymous else []
            if sec.secure:
                assert self.trust is not None  # made in __init__ when secure
                tokens.append(ua.X509IdentityToken)
                self.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
                await self.load_certificate(str(sec.certificate))
                await self.load_private_key(str(sec.private_key))
                self.trust.folder.mkdir(parents=True, exist_ok=True)
                if not self.trust.thumbprints():
                    log.warning(
                        "opcua: no trusted client certificate in %s: every client is refused until "
                        "its certificate is copied there",
                        sec.trusted_certificates,
                    )
            else:
                self.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            self.set_identity_tokens(tokens)

        async def _setup_server_nodes(self) -> None:  # asyncua builds its policy factories here
            await super()._setup_server_nodes()
            if self.trust is not None:
                self._policies = [
                    TrustedClientsOnly(p, self.trust) for p in self._policies if p.cls is not SecurityPolicyNone
                ]
                self._policies.append(
                    SecurityPolicyFactory(  # for discovery: no endpoint lists it
                        SecurityPolicyNone,
                        ua.MessageSecurityMode.None_,
                        self.iserver.certificate,
                        self.iserver.private_key,
                        permission_ruleset=DiscoveryOnly(),
                    )
                )

    return SecuredServer


def secured_server(sec: OpcUaSecurity):
    """An asyncua ``Server`` set up for ``sec``; call its ``init()`` then ``setup()``."""
    return _asyncua_parts()(sec)
