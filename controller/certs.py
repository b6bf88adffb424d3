"""Certificates for a TLS fleet: one CA, a server certificate, a client certificate per role.

``trainfleet deploy certs DIR`` writes, with ``cryptography``:

* ``ca.pem`` / ``ca-key.pem``: the fleet CA (reused when DIR already holds one, so adding a
  role or renewing a certificate does not invalidate the ones already handed out);
* ``server.pem`` / ``server-key.pem``: nats-server's certificate, its hostnames as SANs;
* ``<role>.pem`` / ``<role>-key.pem``: one client certificate per role, subject ``CN=trainfleet-<role>``
  and nothing else (no SANs), so that under ``verify_and_map`` nats-server maps it to the user
  named by its subject DN, ``CN=trainfleet-<role>`` (see :func:`mapped_user`);
* ``tls.conf``: a nats-server config include with the ``tls {}`` block (absolute paths).

Keys are ECDSA P-256 (quick to make, supported by nats-server and every client) and every
private key file is written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_ROLES = ("admin", "controller", "operator", "agent", "viewer")
DEFAULT_DAYS = 825  # the longest validity clients commonly accept for a server certificate
CA_NAME = "trainfleet CA"
SERVER_NAME = "trainfleet-server"
ROLE_CN_PREFIX = "trainfleet-"
TLS_CONF = "tls.conf"
ROLE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def role_cn(role: str) -> str:
    """The subject common name of ``role``'s client certificate (``agent`` → ``trainfleet-agent``)."""
    return f"{ROLE_CN_PREFIX}{role}"


def mapped_user(role: str) -> str:
    """The user name nats-server gives a client presenting ``role``'s certificate under
    ``verify_and_map``: the certificate's subject DN in RFC 2253 form (the cert has no SANs)."""
    return _name(role_cn(role)).rfc4514_string()


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass
class CertSet:
    """What :func:`write_cert_set` wrote: every path, and the user each role's cert maps to."""

    directory: Path
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    tls_conf: Path
    ca_reused: bool = False
    roles: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # role → (cert, key)

    def mapped_users(self) -> dict[str, str]:
        """role → the verify_and_map user name of its certificate."""
        return {role: mapped_user(role) for role in self.roles}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, valid_from: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    # Back-dated a little so a host whose clock lags behind ours still accepts a fresh cert.
    start = valid_from or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    return start, start + dt.timedelta(days=days)


def new_ca(*, days: int = DEFAULT_DAYS, common_name: str = CA_NAME, valid_from: dt.datetime | None = None) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, valid_from)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(
    ca: Issued,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    server: bool = False,
    days: int = DEFAULT_DAYS,
    valid_from: dt.datetime | None = None,
) -> Issued:
    """A leaf certificate signed by ``ca``: a server certificate for ``hosts`` (SANs) when
    ``server``, else a client certificate whose subject is ``CN=<common_name>`` only.
    ``valid_from`` (default: now) lets tests make an expired or not-yet-valid certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(days, valid_from)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


# -- files -------------------------------------------------------------------------
def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), also when it already existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        fh.write(data)


def write_issued(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """The certificate as PEM (0644) and its unencrypted key as PKCS#8 PEM (0600)."""
    write_private(key_path, key_pem(issued.key))
    cert_path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, 0o644)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_issued(cert_path: Path, key_path: Path) -> Issued:
    """A certificate and key written by :func:`write_issued` (or any PEM pair with an EC key)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC private key")
    return Issued(cert, key)


def tls_conf(server_cert: Path, server_key: Path, ca: Path, *, timeout_s: float = 2.0) -> str:
    """A nats-server ``tls {}`` block: client certificates required and mapped to users."""
    return (
        "# Written by `trainfleet deploy certs`. Include it from nats-server.conf (an include path is\n"
        "# relative to the including file's directory), or paste the block in.\n"
        "# verify_and_map: every client must present a certificate signed by ca_file, and is the\n"
        '# user named by its subject DN (e.g. "CN=trainfleet-agent"): list those users with their\n'
        "# permissions in the authorization block.\n"
        "tls {\n"
        f"  cert_file: {json.dumps(str(server_cert))}\n"
        f"  key_file: {json.dumps(str(server_key))}\n"
        f"  ca_file: {json.dumps(str(ca))}\n"
        "  verify_and_map: true\n"
        f"  timeout: {timeout_s:g}\n"
        "}\n"
    )


def write_cert_set(
    directory: str | os.PathLike[str],
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    roles: Sequence[str] = DEFAULT_ROLES,
    days: int = DEFAULT_DAYS,
) -> CertSet:
    """Write the CA (or reuse the one already in ``directory``), the server certificate, one
    client certificate per role, and ``tls.conf`` into ``directory``."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    if not hosts:
        raise ValueError("at least one server hostname is needed")
    for role in roles:
        if not ROLE_NAME.fullmatch(role):
            raise ValueError(f"role {role!r}: use letters, digits, '-' and '_' only (it names files and a CN)")
    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = CertSet(
        directory=out,
        ca=out / "ca.pem",
        ca_key=out / "ca-key.pem",
        server=out / "server.pem",
        server_key=out / "server-key.pem",
        tls_conf=out / TLS_CONF,
    )
    if paths.ca.exists() and paths.ca_key.exists():
        ca = load_issued(paths.ca, paths.ca_key)
        paths.ca_reused = True
    else:
        ca = new_ca(days=days)
        write_issued(ca, paths.ca, paths.ca_key)
    write_issued(issue(ca, SERVER_NAME, hosts=hosts, server=True, days=days), paths.server, paths.server_key)
    for role in roles:
        cert_path, key_path = out / f"{role}.pem", out / f"{role}-key.pem"
        write_issued(issue(ca, role_cn(role), days=days), cert_path, key_path)
        paths.roles[role] = (cert_path, key_path)
    paths.tls_conf.write_text(tls_conf(paths.server, paths.server_key, paths.ca))
    return paths
